"""Shared fixtures."""
import string

import pytest

from helpers import make_dataset, quiet


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(text encoder folder, image encoder folder): a 1-layer BERT with a character vocabulary
    (every word tokenises, so every text embeds differently) and a 1-layer ViT."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("models")
    chars = string.ascii_lowercase + string.digits
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]) + "\n")
    torch.manual_seed(0)
    text, image = root / "text", root / "image"
    transformers.BertTokenizerFast(str(vocab)).save_pretrained(text)
    transformers.BertModel(transformers.BertConfig(vocab_size=77, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=37)).save_pretrained(text)
    transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=37)).save_pretrained(image)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(image)
    return str(text), str(image)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """(folder, data.load_mmrec's dict) of helpers.make_dataset's toy dataset."""
    import data
    folder = make_dataset(tmp_path_factory.mktemp("toy") / "toy")
    return folder, data.load_mmrec(str(folder), log=quiet)

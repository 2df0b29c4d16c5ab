"""Data in, features out: everything MMCPR reads from disk.

Loading half: a dataset folder in the MMRec layout (the one MMRec ships for
Amazon Baby, Sports, Clothing), checked strictly, returned as plain numpy
arrays. The paper's inputs (Sec. 3.1) are a user-item interaction matrix, the
users' review texts and the items' description texts and images; here they
arrive as

    NAME.inter          tab-separated, header, columns userID itemID x_label
                        (0 train, 1 valid, 2 test); other columns ignored
    <m>_feat.npy        one item content modality m (text, image, audio...),
                        one row per item
    review_feat.npy     the user review modality, one row per user

Any problem with the input raises DataError with one line that names the file.
This module imports nothing from the rest of the project.
"""
import glob
import os
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
    for j, s in enumerate(parts):
        if len(parts[s][0]) == 0:
            raise DataError(f"{name}: the {s} split (x_label {j}) is empty")
    has_train = np.zeros(n_users, bool)
    has_train[parts["train"][0]] = True
    held_out = np.unique(np.concatenate([parts["valid"][0], parts["test"][0]]))
    n_cold = int((~has_train[held_out]).sum())
    for s in ("valid", "test"):
        u, i = parts[s]
        parts[s] = (u[has_train[u]], i[has_train[u]])

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

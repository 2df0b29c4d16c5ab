"""The dataset: a folder in the MMRec layout, loaded and split into plain numpy arrays.

The paper's inputs are a user-item interaction matrix, the users' review texts and the
items' description texts and images. In the MMRec layout (the one MMRec ships for Amazon
Baby, Sports, Clothing) they arrive as

    NAME.inter          tab-separated, header, columns userID itemID x_label
                        (0 train, 1 valid, 2 test); other columns ignored
    <m>_feat.npy        one item content modality m (text, image, audio...),
                        one row per item
    review_feat.npy     the user review modality, one row per user
    <b>_tag.npy         optional item tags, multi-hot (category, year): read by
                        the new-item head only, not a modality of the paper's

load_mmrec(folder) checks the folder strictly and returns the warm split as
given; load_mmrec(folder, cold_items=F) also holds out a share F of the items as
new items, with every pair of theirs (ColdRec's item cold-start split), and
cold_users=F a share F of the users as new users, who leave training entirely. A raw
folder (reviews, metadata, images) is converted into this layout by features.py.

Any problem with the input raises DataError with one line that names the file.
numpy alone; this module imports nothing from the rest of the project.
"""
import glob
import os
import re
import warnings

import numpy as np


class DataError(Exception):
    """Bad input data; the message is one line naming the file and the problem."""


def read_inter(path):
    """(users, items, x_label) int64 arrays from an MMRec .inter file."""
    name = os.path.basename(path)
    try:  # the header, then the rows: one UTF-8 check for both
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        cols = []
        for col in ("userID", "itemID", "x_label"):
            if col not in header:
                raise DataError(f"{name}: missing column '{col}' (header: {' '.join(header)})")
            cols.append(header.index(col))
        with warnings.catch_warnings():  # an empty file is reported below, as one line
            warnings.simplefilter("ignore", UserWarning)
            raw = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=cols, dtype=np.float64, ndmin=2,
                             encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise DataError(f"{name}: unreadable row ({str(e).splitlines()[-1]})") from None
    if len(raw) == 0:
        raise DataError(f"{name}: no interactions")
    for j, col in enumerate(("userID", "itemID", "x_label")):
        v = raw[:, j]  # float64 holds every integer below 2**53 exactly; above, two ids could merge
        bad = ~np.isfinite(v) | (v != np.round(v)) | (v < 0) | (v >= 2 ** 53)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{name}: {col} must be a non-negative integer below 2**53, got {v[row]!r} on data "
                            f"row {row + 1}")
        n = len(np.unique(v))
        if j < 2 and v.max() >= 2 * n + 10_000:  # a row per id up to the largest: ids far apart cost memory
            raise DataError(f"{name}: {col} runs to {int(v.max())} for {n} distinct ids; the MMRec layout numbers "
                            "them from 0 (renumber them, or give the raw files to convert)")
    users, items, split = raw.T.astype(np.int64)
    if not np.isin(split, (0, 1, 2)).all():
        raise DataError(f"{name}: x_label must be 0, 1 or 2, got {sorted(set(split.tolist()) - {0, 1, 2})}")
    return users, items, split


def read_feat(path, n_rows, what):
    name = os.path.basename(path)
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise DataError(f"{name}: not a numpy array file ({e})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{name}: expected a 2-d numeric array, got shape {x.shape} dtype {x.dtype}")
    if x.shape[0] != n_rows:
        raise DataError(f"{name}: {x.shape[0]} rows but the data has {n_rows} {what}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{name}: contains NaN or inf")
    return x


def load_mmrec(folder, cold_items=0.0, split_seed=0, log=print, cold_users=0.0):
    """Load an MMRec-layout folder.

    Returns a dict: name, n_users, n_items, train/valid/test as (users, items)
    int64 arrays, item_feats {modality: float32 [n_items, f]}, user_feat
    (float32 [n_users, f] or None), n_cold: users with held-out items but no
    training items, whose valid/test pairs are dropped (as MMRec leaves them
    out of evaluation), and cold (None, or the item cold-start split below).

    cold_items F > 0: ColdRec's item cold-start split. The items with any pair
    in the file are ordered by np.random.default_rng(split_seed).permutation;
    the first c = round(F n) are new items, the first c // 2 of them
    cold-valid, the rest cold-test. Every pair of a new item, whatever its
    x_label, leaves train/valid/test (which then hold the warm task); the
    new items keep their rows of item_feats, as a new item arrives with its
    content. cold = dict(valid_items, test_items: sorted int64 item ids,
    valid, test: (users, items), their pairs of users with a training pair).

    cold_users F > 0: new users, who arrive after training with a few interactions.
    The users with a training pair (after the new items leave) are ordered by
    np.random.default_rng([split_seed, 1]).permutation (a draw of its own: the same
    split seed draws the new items too); the first c = round(F n) are new users. Every
    pair of theirs leaves train/valid/test, and their pairs with new items are dropped
    (a new user meeting a new item is neither task). cold_users (the returned
    key): None, or dict(users:
    sorted int64 ids, history: (users, items), their training-split pairs, seen only
    at ranking time; valid, test: (users, items), their held-out pairs).

    item_tags {block: float32 [n_items, k]}: the multi-hot <block>_tag.npy
    files (features.convert_raw writes category and year), empty blocks left out.

    user_ids, item_ids: str arrays, a row's own id in the dataset: the .inter's
    numbers (a converted raw folder's own ids: features.raw_ids).

    catalogue: the sorted item ids with a pair in any split, the items of the
    dataset; an id below n_items that no split has (item 0 where ids start at 1)
    is none, and notes (a list of lines) says how many there are.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    if not 0 <= cold_items < 1:
        raise DataError(f"cold_items must be in [0, 1), got {cold_items}")
    if not 0 <= cold_users < 1:
        raise DataError(f"cold_users must be in [0, 1), got {cold_users}")
    inters = sorted(glob.glob(os.path.join(folder, "*.inter")))
    if len(inters) != 1:
        found = ", ".join(os.path.basename(p) for p in inters) or "none"
        raise DataError(f"{folder}: expected exactly one *.inter file, found {found}")
    path = inters[0]
    name = os.path.basename(path)
    users, items, split = read_inter(path)

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
    catalogue = np.unique(items)  # the items of the dataset: an id that no split has is none
    absent = np.setdiff1d(np.arange(n_items), catalogue)
    notes = [f"{len(absent)} item ids below {n_items} appear in no split (such as {absent[0]}): no item of the "
             "dataset, never ranked, drawn as a negative or recommended"] if len(absent) else []
    order = np.random.default_rng(split_seed).permutation(catalogue)
    c = round(cold_items * len(order))
    if cold_items and c < 2:
        raise DataError(f"{name}: --cold-items {cold_items} makes {c} of {len(order)} items new; "
                        "cold-valid and cold-test need one each")
    cold_sets = np.sort(order[:c // 2]), np.sort(order[c // 2:c])  # empty when cold_items is 0
    new = np.isin(items, order[:c])
    parts = {s: (users[(split == j) & ~new], items[(split == j) & ~new]) for j, s in enumerate(("train", "valid", "test"))}
    has_train = np.zeros(n_users, bool)
    has_train[parts["train"][0]] = True
    held_out = np.unique(np.concatenate([parts["valid"][0], parts["test"][0]]))
    n_cold = int((~has_train[held_out]).sum())
    new_users = None
    if cold_users:  # new users: drawn among those with a training pair, then out of every split
        known = np.flatnonzero(has_train)
        c_u = round(cold_users * len(known))
        if c_u < 1 or c_u == len(known):
            raise DataError(f"{name}: --cold-users {cold_users} makes {c_u} of {len(known)} users new; "
                            "at least one must be new and one trained")
        ids = np.sort(np.random.default_rng([split_seed, 1]).permutation(known)[:c_u])
        is_new = np.zeros(n_users, bool)
        is_new[ids] = True
        new_users = dict(users=ids)
        for s in parts:
            u, i = parts[s]
            new_users["history" if s == "train" else s] = (u[is_new[u]], i[is_new[u]])
            if s != "train" and not is_new[u].any():
                raise DataError(f"{name}: --cold-users {cold_users}: no new user has a {s} pair")
        has_train &= ~is_new
    for j, s in enumerate(parts):
        u, i = parts[s]
        parts[s] = (u[has_train[u]], i[has_train[u]])
        if len(u) == 0:
            raise DataError(f"{name}: the {s} split (x_label {j}) is empty")
        if not has_train[u].any():
            raise DataError(f"{name}: no user of the {s} split (x_label {j}) has training interactions")
    cold = None
    if cold_items:
        cold = dict(valid_items=cold_sets[0], test_items=cold_sets[1])
        for s, ids in zip(("valid", "test"), cold_sets):
            m = np.isin(items, ids) & has_train[users]
            if not m.any():
                raise DataError(f"{name}: --cold-items {cold_items}: no cold-{s} item has a pair of a user "
                                "with training interactions")
            cold[s] = (users[m], items[m])

    item_feats, user_feat = {}, None
    for p in sorted(glob.glob(os.path.join(folder, "*_feat.npy"))):
        modality = os.path.basename(p)[: -len("_feat.npy")]
        if not re.fullmatch(r"[A-Za-z0-9_]+", modality):  # modalities name torch module-dict keys
            raise DataError(f"{os.path.basename(p)}: modality names may use letters, digits and _ only")
        if modality == "graph":
            raise DataError(f"{os.path.basename(p)}: 'graph' names the ID modality (a node's place in its graph); "
                            "rename the file")
        x = read_feat(p, n_users if modality == "review" else n_items, "users" if modality == "review" else "items")
        if x.shape[1] == 0:
            raise DataError(f"{os.path.basename(p)}: no columns: a modality needs at least one")
        if modality == "review":
            user_feat = x
        else:
            item_feats[modality] = x
    item_tags = {os.path.basename(p)[: -len("_tag.npy")]: read_feat(p, n_items, "items")
                 for p in sorted(glob.glob(os.path.join(folder, "*_tag.npy")))}
    item_tags = {b: x for b, x in item_tags.items() if x.shape[1]}

    log(f"loaded {name}: {n_users} users, {n_items} items, "
        + " / ".join(f"{len(parts[s][0])} {s}" for s in parts)
        + f"; item modalities: {', '.join(item_feats) or 'none'}; reviews: {'yes' if user_feat is not None else 'no'}"
        + (f"; item tags: {', '.join(item_tags)}" if item_tags else "")
        + (f"; {n_cold} users with held-out items but no training items are left out of evaluation" if n_cold else "")
        + (f"; new items (split seed {split_seed}): {len(cold_sets[0])} cold-valid, {len(cold_sets[1])} cold-test, "
           f"their {int(new.sum())} pairs out of training" if cold_items else "")
        + (f"; new users (split seed {split_seed}): {len(new_users['users'])}, their "
           f"{len(new_users['history'][0])} training pairs a history seen only at ranking time" if cold_users else "")
        + "".join(f"; note: {n}" for n in notes))
    return dict(name=os.path.splitext(name)[0], n_users=n_users, n_items=n_items, **parts,
                item_feats=item_feats, user_feat=user_feat, item_tags=item_tags,
                user_ids=np.arange(n_users).astype(str), item_ids=np.arange(n_items).astype(str), n_cold=n_cold,
                cold=cold, cold_users=new_users, catalogue=catalogue, notes=notes)

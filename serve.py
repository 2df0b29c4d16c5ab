"""Serving a finished run: tomorrow's new items ranked for its users, and its new users given
their lists, without retraining.

    python run.py --serve RUN --new-items DIR [--out OUT] [--recommend-k K]   (run.py wires serve())
    python run.py --serve RUN --new-users FILE [--out OUT] [--recommend-k K]  (serve_users())

A run folder (runfolder.py) holds the model it kept, `model.npz`. When that model can rank
new items (MMCPR with item content), `model.npz` also holds its content head (newitems.py),
so that a catalogue's new items, which no one has interacted with yet, are ranked from
their content alone: read and encoded as the catalogue's items were
(features.read_new_items), placed by the head (newitems.served_vectors), written as each
user's top K among them. This is the paper's content pathway at work after training
(ColdRec's item cold-start protocol).

New users arrive as a history, a TSV of (user, item) pairs in the dataset's own ids
(read_new_users); the run's new-user method (newusers.py) places them from the trained items
and users (newusers.served_scores), and each gets the top K of the ranked items they have not given.
"""
import numpy as np
import torch

import features
import newitems
import newusers
import recommender
import runfolder
from data import DataError


def serve(run_dir, new_dir, k=20, device="cpu", log=print):
    """Rank the new items of new_dir for every user of the finished run in run_dir (each with a
    training pair) with its content head. Returns the outputs for runfolder.write_atomic:
    recommendations.tsv (each user's top k new items) and new_items.npz: item_ids, item_vec
    [n, d + F], the new items' head vectors [x W, x̂], to index beside the head's user vectors
    newitems.head_users: [head_user_emb / sd_head, beta head_profile / sd_prof]."""
    m = runfolder.load_run(run_dir)
    if "head_W" not in m:
        raise DataError(f"{run_dir}: its model has no content head to rank new items with "
                        "(MMCPR with item content has one)")
    widths = dict(zip(m["head_blocks"].tolist(), m["head_widths"].tolist()))
    ends = np.cumsum(m["head_widths"])
    part = lambda x: {b: x[e - w:e] for (b, w), e in zip(widths.items(), ends)}  # [F] -> {block: [w]}
    tags = {b[:-len(" tags")]: w for b, w in widths.items() if b.endswith(" tags")}
    encoders = dict(text=str(m["encoder_text"]) or None, image=str(m["encoder_image"]) or None,
                    precision=str(m["precision"])) if "precision" in m else None
    new = features.read_new_items(new_dir, {b: w for b, w in widths.items() if not b.endswith(" tags")},
                                  {b: (w, m[f"tag_{b}"].tolist() if f"tag_{b}" in m else None) for b, w in tags.items()},
                                  encoders, part(m["head_fill"]), m["item_ids"][m["ranked_items"]], device=device,
                                  log=log)
    ids = new["item_ids"]
    content = {**new["item_feats"], **{f"{b} tags": x for b, x in new["item_tags"].items()}}
    users, items = newitems.served_vectors(m, content)  # [U, d + F], [n, d + F]
    top, scores = recommender.recommend(users.to(device), items.to(device), m["ranked_users"],
                                        (np.zeros(0, np.int64),) * 2, k)
    log(f"served {len(ids)} new items to {len(m['ranked_users'])} users, in the space of the fine-tuned model "
        f"{m['head_start']}")
    tsv = runfolder.recommendations_tsv(m["user_ids"], ids, m["ranked_users"], top, scores)
    return {"recommendations.tsv": lambda f: f.write(tsv),
            "new_items.npz": lambda f: np.savez(f, item_ids=ids, item_vec=items.numpy())}


def read_new_users(path, user_ids, item_ids):
    """(new user ids [n] str, sorted; history (rows into them, item rows), unique pairs) from a TSV
    with the header user<TAB>item and one (user, item) pair a row, in the dataset's own ids.
    user_ids: the users the run trained, refused (their lists are in recommendations.tsv);
    item_ids [I]: the run's items, every id that may be given (its ranked items), the rest -1.
    Any problem is a DataError of one line naming the file and the row."""
    name = path
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{name}: unreadable ({e.strerror})") from None
    if not lines:
        raise DataError(f"{name}: empty, expected the header user<TAB>item and one row a (user, item) pair")
    if lines[0] != "user\titem":
        raise DataError(f"{name}: the first line must be the header user<TAB>item, got {lines[0][:60]!r}")
    rows = np.array(lines[1:], dtype=str)
    if len(rows) == 0:
        raise DataError(f"{name}: no (user, item) pairs after the header")
    bad = np.char.count(rows, "\t") != 1
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(f"{name}: line {k + 2} has {rows[k].count(chr(9)) + 1} tab-separated fields, expected 2 "
                        "(user, item; an id may not hold a tab)")
    parts = np.char.partition(rows, "\t")
    users, items = parts[:, 0], parts[:, 2]
    bad = (np.char.str_len(users) == 0) | (np.char.str_len(items) == 0)
    if bad.any():
        raise DataError(f"{name}: line {int(np.argmax(bad)) + 2} has an empty id")
    trained = np.isin(users, user_ids)
    if trained.any():
        k = int(np.argmax(trained))
        raise DataError(f"{name}: user {users[k]!r} (line {k + 2}) was trained by the run: its list is in the run's "
                        "recommendations.tsv (updating a known user is not served)")
    order = np.argsort(item_ids)
    pos = np.searchsorted(item_ids, items, sorter=order).clip(max=len(item_ids) - 1)
    rows_of = order[pos]
    bad = item_ids[rows_of] != items
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(f"{name}: item {items[k]!r} (line {k + 2}) is not one of the items the run ranks")
    ids, user_rows = np.unique(users, return_inverse=True)
    key = np.unique(user_rows.astype(np.int64) * len(item_ids) + rows_of)
    return ids, (key // len(item_ids), key % len(item_ids))


def serve_users(run_dir, path, k=20, device="cpu", log=print):
    """Rank the run's items for the new users whose histories are in the TSV `path`
    (read_new_users) with its new-user method (newusers.py). Returns the outputs for
    runfolder.write_atomic: recommendations.tsv (each new user's top k of the ranked items they
    have not given, the columns of a run's) and new_users.npz: user_ids [n] str, user_vec [n, d]
    and knn_weight [n] float32, the parts of a new user's score of item i,
        s_u(i) = user_vec_u . newuser_item_emb[i] + knn_weight_u sum_{j in H_u} w_ji,
    user_vec = (p / |p| + beta n / |n|) / sd_u, p = |H_u|^-1/2 sum_{j in H_u} newuser_items[j], n the
    trained neighbours' mean (of their newuser_user_emb rows), w_ji = c_ji / (c_j c_i)^(alpha / 2)
    with c the co-interaction counts of model.npz's newuser_train_* pairs, or EASE's B_ji over those
    pairs where newuser_ease (lambda) is not 0 (its inverse on `device`); alpha, beta: newuser_alpha,
    newuser_beta (newusers.served_scores); knn_weight 0: a dot product."""
    m = runfolder.load_run(run_dir)
    missing = [a for a in newusers.ARRAYS if a not in m]
    if missing:
        raise DataError(f"{run_dir}: its model.npz has no new-user arrays (no {', '.join(missing)}): a run from "
                        "before new users were served; rerun it")
    rankable = np.full(len(m["item_ids"]), "", dtype=m["item_ids"].dtype)
    rankable[m["ranked_items"]] = m["item_ids"][m["ranked_items"]]  # a new item of --cold-items is not given
    ids, history = read_new_users(path, m["user_ids"][m["ranked_users"]], rankable)
    S, user_vec, knn_weight = newusers.served_scores(m, history, len(ids), device)
    top, scores = top_k(S, history, k, m["ranked_items"])
    log(f"served {len(ids)} new users from {len(history[0])} history pairs")
    tsv = runfolder.recommendations_tsv(ids, m["item_ids"], np.arange(len(ids)), top, scores)
    return {"recommendations.tsv": lambda f: f.write(tsv),
            "new_users.npz": lambda f: np.savez(f, user_ids=ids, user_vec=user_vec.numpy(),
                                                knn_weight=knn_weight.numpy())}


def top_k(S, known, k, candidates):
    """(items [n, k] int64, scores [n, k] float32): each row's top k of S [n, I] among `candidates`
    (item ids), best first, without its known (rows, items) pairs; -1 and -inf past the end."""
    cand = torch.as_tensor(np.asarray(candidates, np.int64))
    col = np.full(S.shape[1], -1)
    col[candidates] = np.arange(len(candidates))
    S = S[:, cand]  # a copy
    r, c = np.asarray(known[0]), col[np.asarray(known[1])]
    S[torch.as_tensor(r[c >= 0]), torch.as_tensor(c[c >= 0])] = -torch.inf
    s, j = S.topk(min(k, len(cand)), dim=1)
    return torch.where(s == -torch.inf, -1, cand[j]).numpy(), s.numpy()

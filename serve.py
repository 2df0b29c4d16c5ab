"""A run as a recommender: the new-item head it fits, what it keeps, and new items served later.

    python run.py --serve RUN --new-items DIR [--out OUT] [--recommend-k K]   (run.py wires serve())

A run folder (run.py) holds the model it kept, `model.npz`, and every user's top-K list,
`recommendations.tsv`, both in the dataset's own ids. When the model can rank new items (MMCPR
with item content: the content head, recommender.fit_content_head, fitted by fit_head),
`model.npz` also holds every array the head needs, so that a catalogue's new items, which no
one has interacted with yet, are ranked from their content alone: read and encoded as the
catalogue's items were (features.read_new_items), placed by the head, written as each user's
top K among them (serve). This is the paper's content pathway at work after training
(ColdRec's item cold-start protocol).

model.npz (numpy only: np.load(path, allow_pickle=False)); U users, I items, d, F content columns:
    user_emb [U, d], item_emb [I, d]   float32, the kept model's final embeddings: score = dot
    user_ids [U], item_ids [I]         str, the dataset's own ids, in row order
    ranked_users, ranked_items         int64 rows: the users with a training pair (they get
                                       recommendations), the items ranked (with --cold-items, the warm ones)
and, where there is a content head:
    head_blocks [B], head_widths [B]   the content blocks in order (modalities, then '<b> tags'), widths
    head_mean [F], head_sd [F]         float64 standardisation on the catalogue (sd inf: a constant column)
    head_fill [F]                      float32, each block's mean row: what an item missing a modality gets
    head_W [F + 1, d]                  float64 ridge weights from content (last row: the bias) to item_emb's space
    head_user_emb [U, d], head_profile [U, F], head_sd_head, head_sd_prof, head_beta, head_ridge
                                       the head's users: score = e_u . x W / sd_head + beta p_u . x̂ / sd_prof
    head_start                         str, the fine-tuned model the head serves from: 'pretrained', or with
                                       --start best possibly 'scratch' where the kept model is the other
    tag_<b> [k]                        str, the columns of tag block b (raw data)
    encoder_text, encoder_image, precision   str, how the catalogue was encoded ('' : the packaged model)
"""
import os
import zipfile

import numpy as np
import torch

import features
import recommender


def fit_head(data, model, item_feats, trained, *, ks, holdout=0.1, split_seed=0, tags=True, device="cpu"):
    """The content head that ranks new items (recommender.fit_content_head: MMCPR with item content
    only) and what model.npz keeps of it, for run.py. Content: the item modalities and, if tags, the
    item tags (categories, release year; a block each). The paper's text modality holds those
    words too, through a sentence encoder; read as tags they are worth more to a linear head
    (README, New items). `trained`: {start: train()'s result}, the fine-tuned models it may serve
    from (--start best: the pre-trained start's and the random start's, "scratch").
    Its settings (ridge, profile weight, start) are chosen on cold-valid Recall@20 with
    --cold-items. Without, a catalogue still gets new items tomorrow, so they are chosen on
    pseudo-new items: a share `holdout` of the trained items, drawn by split_seed, whose training
    pairs become the targets and leave the head's fit and the users' profiles; the head is then
    refitted on every trained item with the settings chosen. Test is never read.
    Returns (the metrics entry, or None when there is neither a head nor a cold split; model.npz's
    head arrays, {} without a head)."""
    c = data["cold"]
    entry = c and dict(valid_items=c["valid_items"].tolist(), test_items=c["test_items"].tolist(), valid=None,
                       test=None, note=None)
    if model != "mmcpr" or not item_feats:
        if entry:
            entry["note"] = (f"{model} alone cannot rank an item without pairs" if model != "mmcpr"
                             else "no item content modality: a new item has nothing to be ranked by")
        return entry, {}
    tag_blocks = {f"{b} tags": x for b, x in data["item_tags"].items()} if tags else {}
    blocks = {**item_feats, **tag_blocks}  # tags: a block each, as a modality
    fit_items, train = np.unique(data["train"][1]), data["train"]  # the items with a trained embedding
    evaluator = lambda train, target, items: recommender.Evaluator(data["n_items"], train, target, ks, device=device,
                                                                   candidates=items)
    if c:
        ev = {s: evaluator(train, c[s], c[f"{s}_items"]) for s in ("valid", "test")}
        entry.update(chosen_on="cold-valid")
    else:  # pseudo-new items choose the settings
        held = np.sort(np.random.default_rng(split_seed).choice(fit_items, max(1, round(holdout * len(fit_items))),
                                                                replace=False))
        new = np.isin(train[1], held)
        fit_items, train = np.setdiff1d(fit_items, held), (train[0][~new], train[1][~new])
        ev = dict(valid=evaluator(train, (data["train"][0][new], data["train"][1][new]), held))
        entry = dict(chosen_on=f"pseudo-new items: {len(held)} of the trained items, their {int(new.sum())} "
                               "training pairs the targets")
    user_emb = {s: torch.as_tensor(r["user_emb"], device=device) for s, r in trained.items()}
    stats = recommender.content_stats(blocks, fit_items)
    X = recommender.content_matrix(blocks, stats).to(device)
    heads = {s: recommender.fit_content_head(X, r["item_emb"], fit_items, user_emb[s], train, ev["valid"])
             for s, r in trained.items()}
    valid = {s: h["beta_grid"][h["beta"]] for s, h in heads.items()}  # Recall@20 of each start's head
    start = max(valid, key=valid.get)  # on a tie the first, the pre-trained start
    head = heads[start]
    if len(heads) > 1:
        print(f"new items, start kept: {start} (recall@20: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items()) + ")")
    entry.update(content=list(blocks), start=start, start_grid=valid, ridge=head["ridge"], profile_weight=head["beta"],
                 ridge_grid={f"{k:g}": r for k, r in head["ridge_grid"].items()},
                 profile_grid={f"{k:g}": r for k, r in head["beta_grid"].items()})
    if c:
        users, items = recommender.head_users(head, user_emb[start]), recommender.head_items(X, head["W"])
        entry["valid"], entry["test"] = (ev[s].evaluate(users, items) for s in ("valid", "test"))
    else:  # the settings chosen, the head is fitted on every trained item
        fit_items, train = np.unique(data["train"][1]), data["train"]
        stats = recommender.content_stats(blocks, fit_items)
        head = recommender.fit_content_head(recommender.content_matrix(blocks, stats), trained[start]["item_emb"],
                                            fit_items, user_emb[start], train, None, (head["ridge"],), (head["beta"],))
    names = {b: data["item_tag_names"].get(b) for b in (data["item_tags"] if tags else [])}
    return entry, head_arrays(head, stats, blocks, trained[start]["user_emb"], names, data.get("encoders")) | dict(
        head_start=np.array(start))


def head_arrays(head, stats, blocks, user_emb, tag_names, encoders):
    """model.npz's head_* (and tag_*, encoder_*) arrays from recommender.fit_content_head's head,
    content_stats' stats and the blocks {name: [I, f]} it was fitted on."""
    cat = lambda xs: np.concatenate([np.asarray(x) for x in xs])
    out = dict(head_blocks=np.array(list(stats), dtype=str), head_widths=np.array([len(m) for m, _ in stats.values()]),
               head_mean=cat(m.cpu() for m, _ in stats.values()), head_sd=cat(s.cpu() for _, s in stats.values()),
               head_fill=cat(np.asarray(blocks[b], np.float32).mean(0) for b in stats),
               head_W=head["W"].cpu().numpy(), head_user_emb=np.asarray(user_emb, np.float32),
               head_profile=head["profile"].cpu().numpy(),
               **{f"head_{k}": np.float64(head[k]) for k in ("sd_head", "sd_prof", "beta", "ridge")})
    out.update({f"tag_{b}": np.array(names, dtype=str) for b, names in tag_names.items() if names is not None})
    if encoders:
        out.update(encoder_text=encoders["text"] or "", encoder_image=encoders["image"] or "",
                   precision=encoders["precision"])
    return out


def recommendations_tsv(user_ids, item_ids, users, items, scores):
    """recommendations.tsv's bytes: columns user, item, rank, score, tab-separated, best first, in
    the dataset's own ids. users [n] rows, items [n, k] rows (-1: none left), scores [n, k]."""
    n, k = items.shape
    keep = items.ravel() >= 0
    rows = zip(np.repeat(user_ids[users], k)[keep], item_ids[items.ravel()[keep]], np.tile(np.arange(1, k + 1), n)[keep],
               scores.ravel()[keep].tolist())
    return ("user\titem\trank\tscore\n" + "".join(f"{u}\t{i}\t{r}\t{s:.7g}\n" for u, i, r, s in rows)).encode()


def load_run(folder):
    """model.npz of a finished run folder, as {name: array}; DataError if it is not one."""
    path = os.path.join(folder, "model.npz")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, "metrics.json"))):
        raise features.DataError(f"{folder}: not a finished run folder (no model.npz and metrics.json)")
    try:
        with np.load(path, allow_pickle=False) as z:
            m = dict(z)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise features.DataError(f"{path}: unreadable ({e})") from None
    missing = [k for k in ("user_emb", "item_emb", "user_ids", "item_ids", "ranked_users", "ranked_items") if k not in m]
    if missing:
        raise features.DataError(f"{path}: not a run's model (no {', '.join(missing)})")
    return m


def head_stats(m):
    """content_stats' {block: (mean, divisor)} back from model.npz's arrays m, for content_matrix."""
    ends = np.cumsum(m["head_widths"])
    return {b: (torch.as_tensor(m["head_mean"][e - w:e]), torch.as_tensor(m["head_sd"][e - w:e]))
            for b, w, e in zip(m["head_blocks"].tolist(), m["head_widths"], ends)}


def serve(run_dir, new_dir, k=20, device="cpu", log=print):
    """Rank the new items of new_dir for every user of the finished run in run_dir (each with a
    training pair) with its content head. Returns the outputs for write_atomic:
    recommendations.tsv (each user's top k new items) and new_items.npz: item_ids, item_vec
    [n, d + F], the new items' head vectors [x W, x̂], to index beside the head's user vectors
    recommender.head_users: [head_user_emb / sd_head, beta head_profile / sd_prof]."""
    m = load_run(run_dir)
    if "head_W" not in m:
        raise features.DataError(f"{run_dir}: its model has no content head to rank new items with "
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
    stats = head_stats(m)
    items = recommender.head_items(recommender.content_matrix(content, stats), m["head_W"])  # [n, d + F]
    head = dict(profile=m["head_profile"], sd_head=m["head_sd_head"], sd_prof=m["head_sd_prof"], beta=m["head_beta"])
    users = recommender.head_users(head, torch.as_tensor(m["head_user_emb"]))  # [U, d + F]
    top, scores = recommender.recommend(users.to(device), items.to(device), m["ranked_users"],
                                        (np.zeros(0, np.int64),) * 2, k)
    log(f"served {len(ids)} new items to {len(m['ranked_users'])} users, from the {m['head_start']} start's space")
    tsv = recommendations_tsv(m["user_ids"], ids, m["ranked_users"], top, scores)
    return {"recommendations.tsv": lambda f: f.write(tsv),
            "new_items.npz": lambda f: np.savez(f, item_ids=ids, item_vec=items.numpy())}

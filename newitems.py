"""New items: the content head that ranks items no one has interacted with yet.

A catalogue adds items with a text and an image before anyone has interacted with them.
They have no pair, so no trained embedding: only the content can rank them, so the
paper's content pathway serves them (ColdRec's item cold-start protocol):

    content_stats,     the head's input: each content block z-scored on the trained items,
    content_matrix     L2-normalised within the block, concatenated, plus a bias column
    fit_content_head   a ridge map from content into the fine-tuned model's item space
                       (DeepMusic's regression), plus a content profile per user
                       (content-kNN); head_users and head_items give their vectors, whose
                       inner product is a new item's score
    fit_head           the head of a run: its settings (ridge, profile weight, start) chosen
                       on cold-valid (--cold-items), else on pseudo-new items, never on test
    head_arrays        what model.npz keeps of it (runfolder.py lists the arrays) ...
    head_stats,        ... and the head back from them: a finished run scores new items
    served_vectors     without retraining (serve.py)

Imports recommender.py for its Evaluator and one_se_rule, and nothing else of the project.
"""
import numpy as np
import torch
import torch.nn.functional as F

import recommender


def content_stats(feats, fit_items):
    """{block: (mean [f], sd [f])} of each content block on the fit items (the catalogue known at
    training time, so a new item's features change nothing fitted), float64. A column constant on
    the fit items (up to float rounding) gets sd = inf, so it maps to 0, as in mmcpr's prepare:
    divided by its rounding-sized spread, a new item's small offset there would swamp the rest."""
    stats = {}
    for b, x in feats.items():
        x = torch.as_tensor(np.asarray(x, np.float32)[fit_items], dtype=torch.float64)
        mu, sd = x.mean(0), x.std(0, correction=0)
        stats[b] = mu, torch.where(sd > 1e-5 * (1 + mu.abs()), sd + 1e-6, torch.inf)
    return stats


def content_matrix(feats, stats):
    """Item content {block: [n, f]} -> X [n, F + 1] float64: each block z-scored by its content_stats,
    each row L2-normalised within the block so that no block outweighs another by its width,
    concatenated, then a constant 1 (the head's bias)."""
    blocks = [F.normalize((torch.as_tensor(np.asarray(feats[b], np.float32), dtype=torch.float64) - mu) / sd, dim=1)
              for b, (mu, sd) in stats.items()]
    return torch.cat(blocks + [torch.ones(len(blocks[0]), 1, dtype=torch.float64)], 1)


def head_items(X, W):
    """A content head's item vectors [n, d + F] = [x W, x̂]: X [n, F + 1] (content_matrix), W [F + 1, d]."""
    W = torch.as_tensor(W, dtype=torch.float64, device=X.device)
    return torch.cat([(X @ W).float(), F.normalize(X[:, :-1].float(), dim=1)], 1)


def head_users(head, user_emb):
    """A content head's user vectors [U, d + F] = [e_u / σ_head, β p_u / σ_prof] (fit_content_head)."""
    user_emb = torch.as_tensor(user_emb)
    p = torch.as_tensor(head["profile"], device=user_emb.device)
    return torch.cat([user_emb / float(head["sd_head"]), float(head["beta"]) * p / float(head["sd_prof"])], 1)


RIDGE = tuple(float(v) for v in 10.0 ** np.arange(-2, 3.01, 0.5))  # the content head's strengths, chosen on cold-valid
PROFILE = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # the content profile's weights, chosen on cold-valid


def fit_content_head(X, item_emb, fit_items, user_emb, train_pairs, evaluator=None, ridge=RIDGE, profile=PROFILE,
                     log=print):
    """Serve new items: a new item has no pair, so no trained embedding; its content is all
    there is. Two scores, fitted on the items with training pairs:

    1. a linear head into the trained space (DeepMusic's regression): W = argmin |X W - E|²
       + ridge |W|² maps content X [n_items, F + 1] (content_matrix's: its last column the
       bias, shrunk like the rest) to the final item embeddings E [n_items, d],
       and s_head(u, i) = e_u . x_i W, the users unchanged;
    2. a content profile (content-kNN): p_u = the normalised mean of the content x̂ (X less its
       bias column, normalised) of u's training items, and s_prof(u, i) = p_u . x̂_i; on the user
       side it pools the user's items' content, as the paper pools a user's reviews.
    A new item scores s_head / σ_head + β s_prof / σ_prof, each σ its score's sd over the
    training pairs: one inner product of head_users [e_u / σ_head, β p_u / σ_prof] and
    head_items [x_i W, x̂_i]. The strength is kept first (β = 0), then β, each the best
    Recall@20 on `evaluator` (new items, never test; None: one value each, nothing to choose).
    β = 0 keeps the head alone. One eigendecomposition of XᵀX serves every strength.
    Returns the head: dict(W [F + 1, d] float64, profile [n_users, F] float32, sd_head, sd_prof,
    ridge, beta, ridge_grid, beta_grid: {value: valid Recall@20}), on user_emb's device."""
    if evaluator is None and (len(ridge), len(profile)) != (1, 1):
        raise ValueError("fit_content_head: choosing among several strengths needs an evaluator")
    device = user_emb.device
    X, E = X.to(device), torch.as_tensor(item_emb, device=device, dtype=torch.float64)
    fit = torch.as_tensor(fit_items, device=device)
    e, Q = torch.linalg.eigh(X[fit].T @ X[fit])  # XᵀX = Q diag(e) Qᵀ
    QtXtE = Q.T @ (X[fit].T @ E[fit])  # [F + 1, d]
    W = {lam: Q @ (QtXtE / (e + lam)[:, None]) for lam in ridge}  # (XᵀX + λI)⁻¹ XᵀE
    score = lambda users, items: evaluator.evaluate(users, items)["recall@20"] if evaluator else None
    ridge_grid = {lam: score(user_emb, (X @ w).float()) for lam, w in W.items()}
    lam = max(ridge_grid, key=ridge_grid.get) if evaluator else ridge[0]
    u, i = (torch.as_tensor(np.asarray(a, np.int64), device=device) for a in train_pairs)
    x = F.normalize(X[:, :-1].float(), dim=1)  # [n_items, F]
    head = dict(W=W[lam], profile=F.normalize(torch.zeros(len(user_emb), x.shape[1], device=device)
                                              .index_add_(0, u, x[i]), dim=1), ridge=lam)
    items = head_items(X, W[lam])
    head["sd_head"] = (user_emb[u] * items[i, :E.shape[1]]).sum(1).std().clamp_min(1e-12).item()  # over training pairs
    head["sd_prof"] = (head["profile"][u] * x[i]).sum(1).std().clamp_min(1e-12).item()
    beta_grid = {b: score(head_users(head | dict(beta=b), user_emb), items) for b in profile}
    head.update(beta=max(beta_grid, key=beta_grid.get) if evaluator else profile[0], ridge_grid=ridge_grid,
                beta_grid=beta_grid)
    if evaluator:
        log("new items, recall@20 by ridge strength: " + ", ".join(f"{k:g}: {r:.4f}" for k, r in ridge_grid.items())
            + f"; kept {lam:g}; by profile weight: " + ", ".join(f"{k:g}: {r:.4f}" for k, r in beta_grid.items())
            + f"; kept {head['beta']:g}")
    return head


def fit_head(data, model, item_feats, trained, *, ks, holdout=0.1, split_seed=0, tags=True, select="one-se",
             device="cpu"):
    """The content head that ranks new items (fit_content_head: MMCPR with item content
    only) and what model.npz keeps of it, for run.py. Content: the item modalities and, if tags, the
    item tags (categories, release year; a block each). The paper's text modality holds those
    words too, through a sentence encoder; read as tags they are worth more to a linear head
    (README, New items). `trained`: {name: train()'s result}, the fine-tuned models it may serve
    from (run.py's candidates: "pretrained", and "scratch" from the random start, each "+view"
    with the content view).
    Its settings (ridge, profile weight, start) are chosen on cold-valid Recall@20 with
    --cold-items, and a tag is a column only where two or more trained items carry it (the
    conversion counts every item, new ones too). Without, a catalogue still gets new items tomorrow, so they are chosen on
    pseudo-new items: a share `holdout` of the trained items, drawn by split_seed, whose training
    pairs become the targets and leave the head's fit and the users' profiles; the head is then
    refitted on every trained item with the settings chosen. Test is never read. The start is the
    first of `trained` unless another clears it by more than the paired standard error of their
    per-user Recall@20 (select "one-se", recommender.one_se_rule, as run.py's fine-tunings; "best":
    the best, on a tie the first).
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
    fit_items, train = np.unique(data["train"][1]), data["train"]  # the items with a trained embedding
    item_tags = data["item_tags"] if tags else {}
    names = {b: data["item_tag_names"].get(b) for b in item_tags}
    if c and item_tags:  # a tag is a column where two trained items carry it: new items shape no vocabulary
        keep = {b: (x[fit_items] > 0).sum(0) >= 2 for b, x in item_tags.items()}
        if not all(k.all() for k in keep.values()):
            print(f"new items: {sum(int((~k).sum()) for k in keep.values())} tag columns that fewer than two trained "
                  "items carry are left out")
        item_tags = {b: x if keep[b].all() else x[:, keep[b]] for b, x in item_tags.items() if keep[b].any()}
        names = {b: n and [t for t, k in zip(n, keep[b]) if k] for b, n in names.items() if b in item_tags}
    blocks = {**item_feats, **{f"{b} tags": x for b, x in item_tags.items()}}  # tags: a block each, as a modality
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
    n_new = len(c["valid_items"]) if c else len(held)
    if n_new <= 20:  # each of them ranks within the top 20 of so few, whatever the setting
        entry["warning"] = (f"the head's settings were chosen on {n_new} new items, which every setting ranks within "
                            "the top 20: Recall@20 chooses nothing, and each grid's first value is kept")
        print(f"new items: {entry['warning']}")
    user_emb = {s: torch.as_tensor(r["user_emb"], device=device) for s, r in trained.items()}
    stats = content_stats(blocks, fit_items)
    X = content_matrix(blocks, stats).to(device)
    heads = {s: fit_content_head(X, r["item_emb"], fit_items, user_emb[s], train, ev["valid"])
             for s, r in trained.items()}
    valid = {s: h["beta_grid"][h["beta"]] for s, h in heads.items()}  # Recall@20 of each start's head
    start, margin = max(valid, key=valid.get), None  # on a tie the first (by default the pre-trained start)
    if select == "one-se":  # does another clear the first by more than valid's noise?
        per_user = lambda s: ev["valid"].evaluate(head_users(heads[s], user_emb[s]), head_items(X, heads[s]["W"]),
                                                  per_user=True)["recall@20"]
        start, margin = recommender.one_se_rule(valid, per_user)
    head = heads[start]
    if len(heads) > 1:
        why = "" if margin is None else f"; {margin['challenger']}'s gap {margin['gap']:+.4f}, paired SE {margin['se']:.4f}"
        print(f"new items, start kept: {start} (recall@20: " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items())
              + why + ")")
    entry.update(content=list(blocks), start=start, start_grid=valid, margin=margin, ridge=head["ridge"],
                 profile_weight=head["beta"],
                 ridge_grid={f"{k:g}": r for k, r in head["ridge_grid"].items()},
                 profile_grid={f"{k:g}": r for k, r in head["beta_grid"].items()})
    if c:
        users, items = head_users(head, user_emb[start]), head_items(X, head["W"])
        entry["valid"], entry["test"] = (ev[s].evaluate(users, items) for s in ("valid", "test"))
    else:  # the settings chosen, the head is fitted on every trained item
        fit_items, train = np.unique(data["train"][1]), data["train"]
        stats = content_stats(blocks, fit_items)
        head = fit_content_head(content_matrix(blocks, stats), trained[start]["item_emb"],
                                            fit_items, user_emb[start], train, None, (head["ridge"],), (head["beta"],))
    return entry, head_arrays(head, stats, blocks, trained[start]["user_emb"], names, data.get("encoders")) | dict(
        head_start=np.array(start))


def head_arrays(head, stats, blocks, user_emb, tag_names, encoders):
    """model.npz's head_* (and tag_*, encoder_*) arrays from fit_content_head's head,
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


def head_stats(m):
    """content_stats' {block: (mean, divisor)} back from model.npz's arrays m, for content_matrix."""
    ends = np.cumsum(m["head_widths"])
    return {b: (torch.as_tensor(m["head_mean"][e - w:e]), torch.as_tensor(m["head_sd"][e - w:e]))
            for b, w, e in zip(m["head_blocks"].tolist(), m["head_widths"], ends)}


def served_vectors(m, content):
    """(users [U, d + F], items [n, d + F]) from model.npz's arrays m and the new items' content
    {block: [n, f]} (its modalities, then '<b> tags'): a new item's score is their inner product,
    the vectors of head_users and head_items."""
    items = head_items(content_matrix(content, head_stats(m)), m["head_W"])
    head = dict(profile=m["head_profile"], sd_head=m["head_sd_head"], sd_prof=m["head_sd_prof"], beta=m["head_beta"])
    return head_users(head, torch.as_tensor(m["head_user_emb"])), items

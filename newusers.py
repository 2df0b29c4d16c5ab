"""New users: recommendations from a user's first interactions, without retraining.

A user who joined after training has no row in the model, only a history: the items they
have given so far. LightGCN already says what a user is made of: e_u = mean over layers
k = 0..K of e_u^(k), where layer 1 is the normalised sum of the user's items' layer-0
embeddings, layer 2 that of their layer-1 embeddings, and so on. Everything but the user's
own layer 0 follows from the history and the trained item side, so a new user is placed by
the propagation itself; their co-interaction neighbours among the trained users (the
paper's user graph) may add what the trained users learned in their own layer 0; and an
item-to-item term over the trained pairs, blended in at the score, adds the items the
history co-occurs with, which a few items' embeddings average away:

    propagation_items   G [I, d]: the new user's final embedding, less its layer 0,
                        is |H|^-1/2 sum_{i in H} G_i (H: the history)
    neighbours          N: the count-weighted mean of the final embeddings of the k trained
                        users who share the most items with the history
    user_vectors        v = p / |p| + beta n / |n|, scored against the trained item_emb
    item_knn            k_u(i) = sum_{j in H} c_ij / (c_i c_j)^(alpha / 2), c: co-interaction
                        counts over the trained pairs (alpha 1: ItemKNN's cosine)
    ease                or k_u(i) = sum_{j in H} B_ji, EASE's item-to-item regression (Steck,
                        2019) over the same pairs, where valid prefers it (dense data)
    scores              s_u(i) = v_u . e_i / sd_u + gamma k_u(i) / sd'_u, each term divided
                        by its spread over the ranked items (so gamma is a share, not a scale)
    anchors             popularity and ItemKNN on the same users and histories
    fit                 a run's: the item-to-item term (alpha or EASE's lambda), the fine-tuned
                        model that places them (a run's candidates), beta, gamma, chosen on the
                        new users' valid pairs
                        (--cold-users), or without them on pseudo-new users; test is reported,
                        never chosen on
    served_scores       the same scores from model.npz's arrays (serve.py)

Vectorised over users and pairs: no Python loop over users, items or interactions.
Imports recommender.py (its Evaluator, the LightGCN adjacency and one_se_rule) and nothing else of the project.
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import recommender

BETA = (0.0, 0.25, 0.5, 1.0, 2.0)  # the neighbours' weights, chosen on valid
ALPHA = (0.0, 0.25, 0.5, 1.0)  # the item-to-item term's popularity damping, chosen on valid
GAMMA = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # the item-to-item term's weight, chosen on valid
EASE = (100.0, 300.0, 1000.0, 3000.0)  # EASE's L2 weight lambda, chosen on valid beside ItemKNN's alpha
EASE_MAX = 10_000  # larger catalogues leave EASE out: its inverse takes I^3 time and I^2 float64 memory
KNN = 50  # trained neighbours a new user's n averages
PSEUDO = 0.1  # without --cold-users: the share of the trained users that stand in for new ones


def propagation_items(ego, n_users, train_pairs, layers):
    """G [n_items, d] float32 from LightGCN's layer-0 table ego [n_users + n_items, d] and its
    training pairs: G_i = sum_{k<K} e_i^(k) / sqrt(d_i + 1) / (K + 1), with e^(k) the item
    embeddings of layer k on the trained graph and d_i the item's training degree (+ 1: the new
    user joins it). A new user with history H then has the final embedding
    e_u = e_u^(0) / (K + 1) + |H|^-1/2 sum_{i in H} G_i, LightGCN's eq. 7 and 8 with the items
    fixed; its unknown layer 0 is left out. MF (layers 0) has no propagation: G_i = e_i / sqrt(d_i + 1),
    the normalised sum of the history's item embeddings."""
    ego = torch.as_tensor(np.asarray(ego, np.float32))
    n_items = len(ego) - n_users
    users, items = (np.asarray(a, np.int64) for a in train_pairs)
    deg = np.bincount(np.unique(users * n_items + items) % n_items, minlength=n_items)
    if layers == 0:
        acc, div = ego[n_users:].clone(), 1
    else:
        adj = recommender.bipartite_adjacency(n_users, n_items, users, items)
        acc, h, div = torch.zeros(n_items, ego.shape[1]), ego, layers + 1
        for _ in range(layers):
            acc += h[n_users:]
            h = adj @ h
    return (acc / torch.as_tensor(np.sqrt(deg + 1.0), dtype=torch.float32)[:, None] / div).numpy()


def _sparse(rows, cols, shape):
    """Binary [shape] torch sparse COO of the unique (row, col) pairs."""
    key = np.unique(np.asarray(rows, np.int64) * shape[1] + np.asarray(cols, np.int64))
    idx = torch.as_tensor(np.stack([key // shape[1], key % shape[1]]))
    return torch.sparse_coo_tensor(idx, torch.ones(len(key)), shape).coalesce()


def quiet(f):
    """f with torch's 'sparse support is in beta' warnings silenced."""
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return f(*args, **kwargs)
    wrapped.__doc__, wrapped.__name__ = f.__doc__, f.__name__
    return wrapped


@quiet
def neighbours(history, n_new, user_emb, train_pairs, n_items, knn=KNN, batch=2048):
    """N [n_new, d]: for each new user (history = (rows 0..n_new-1, items)), the final embeddings
    of the knn trained users with the most items in common, weighted by that count (c_uv), over
    their sum: sum_v c_uv e_v / sum_v c_uv. A user sharing no item with anyone gets 0."""
    user_emb = torch.as_tensor(np.asarray(user_emb, np.float32))
    R = _sparse(*train_pairs, (len(user_emb), n_items)).t().coalesce()  # [I, U]
    H = _sparse(*history, (n_new, n_items))
    out = torch.zeros(n_new, user_emb.shape[1])
    rows, cols = H.indices()
    bounds = np.searchsorted(rows.numpy(), np.arange(0, n_new + batch, batch))
    for b, lo in enumerate(range(0, n_new, batch)):  # batches of users bound the [B, U] counts
        s = slice(bounds[b], bounds[b + 1])
        Hb = torch.sparse_coo_tensor(torch.stack([rows[s] - lo, cols[s]]), torch.ones(s.stop - s.start),
                                     (min(batch, n_new - lo), n_items))
        C = torch.sparse.mm(Hb, R).to_dense()  # [B, U] items in common
        w, v = C.topk(min(knn, C.shape[1]), dim=1)
        out[lo:lo + len(C)] = (w[:, :, None] * user_emb[v]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
    return out


def user_vectors(history, n_new, G, beta=0.0, user_emb=None, train_pairs=None, knn=KNN):
    """v [n_new, d] float32 = p / |p| + beta n / |n| (a zero term stays zero): p = |H|^-1/2 sum_{i in H} G_i
    (propagation_items), n the neighbours' mean (neighbours, needed only for beta > 0). history:
    (rows 0..n_new-1, item ids), unique pairs; a new user's score of item i is v_u . item_emb[i]."""
    rows, items = (torch.as_tensor(np.asarray(a, np.int64)) for a in history)
    G = torch.as_tensor(G)
    deg = torch.bincount(rows, minlength=n_new).clamp_min(1)
    p = torch.zeros(n_new, G.shape[1]).index_add_(0, rows, G[items]) / deg.sqrt()[:, None]
    v = F.normalize(p, dim=1)
    if beta:
        v = v + beta * F.normalize(neighbours(history, n_new, user_emb, train_pairs, len(G), knn), dim=1)
    return v


def local(users, pairs):
    """(users' rows 0..n-1, items) of pairs whose users are the sorted ids `users`."""
    return np.searchsorted(users, pairs[0]), np.asarray(pairs[1], np.int64)


@quiet
def item_knn(history, n_new, train_pairs, n_items, alpha):
    """K [n_new, n_items] float32: k_u(i) = sum_{j in H_u} c_ij / (c_i c_j)^(alpha / 2), with c_ij the
    number of trained users who gave both i and j, c_i those who gave i (at least 1). alpha 1 is
    ItemKNN's cosine, 0 the raw co-interaction counts. Two sparse products, H D Rᵀ then R D."""
    users, items = (np.asarray(a, np.int64) for a in train_pairs)
    key = np.unique(users * n_items + items)
    R = _sparse(key // n_items, key % n_items, (int(users.max()) + 1, n_items))
    damp = torch.as_tensor(np.maximum(np.bincount(key % n_items, minlength=n_items), 1) ** (-alpha / 2),
                           dtype=torch.float32)
    HR = torch.sparse.mm(_sparse(*history, (n_new, n_items)) * damp[None, :], R.t()).to_dense()  # [n, U]
    return torch.sparse.mm(R.t(), HR.t().contiguous()).t() * damp[None, :]  # [n, I]


@quiet
def ease(train_pairs, n_items, lam, device="cpu"):
    """B [n_items, n_items] float32, EASE's item-to-item weights (Steck, 2019) over the trained pairs:
    B = argmin |R - R B|^2 + lam |B|^2 with diag(B) = 0, in closed form B = I - P / diag(P) (column j
    divided by P_jj), P = (R^T R + lam I)^-1, R the binary [users, items] matrix. A new user's score
    of i is sum_{j in H} B_ji. The Gram matrix from sparse R, its inverse by float64 Cholesky on
    `device`; B comes back on the CPU."""
    users, items = (np.asarray(a, np.int64) for a in train_pairs)
    key = np.unique(users * n_items + items)
    R = _sparse(key // n_items, key % n_items, (int(users.max()) + 1, n_items))
    G = torch.sparse.mm(R.t(), R).to_dense().to(device, torch.float64)  # [I, I] co-interaction counts
    G.diagonal().add_(lam)
    L = torch.linalg.cholesky(G)
    del G  # two [I, I] float64 at a time at most
    P = torch.cholesky_inverse(L)
    del L
    P /= -P.diagonal().clone()[None, :]
    P.diagonal().zero_()
    return P.float().cpu()


@quiet
def item_term(history, n_new, train_pairs, n_items, alpha, lam=0.0, device="cpu"):
    """K [n_new, n_items]: EASE's sum_{j in H} B_ji for lam > 0 (ease, its inverse on `device`), else
    item_knn at alpha."""
    if not lam:
        return item_knn(history, n_new, train_pairs, n_items, alpha)
    return torch.sparse.mm(_sparse(*history, (n_new, n_items)), ease(train_pairs, n_items, lam, device))


def scores(v, item_emb, K=None, gamma=0.0, candidates=None):
    """(S [n, I], user_vec [n, d], knn_weight [n]): s_u(i) = user_vec_u . e_i + knn_weight_u K_u(i), with
    user_vec = v / sd_u and knn_weight = gamma / sd'_u, sd_u and sd'_u the spreads of v_u . e_i and of
    K_u(i) over the ranked items (candidates, default all; at least 1e-12)."""
    item_emb = torch.as_tensor(item_emb)
    cand = slice(None) if candidates is None else torch.as_tensor(np.asarray(candidates, np.int64))
    sd = lambda x: x[:, cand].std(1, keepdim=True).clamp_min(1e-12)
    dot = v @ item_emb.T
    user_vec = v / sd(dot)
    if not gamma:
        return user_vec @ item_emb.T, user_vec, torch.zeros(len(v))
    w = gamma / sd(K)
    return user_vec @ item_emb.T + w * K, user_vec, w[:, 0]


def anchors(history, evs, n_new, train_pairs, n_items, alpha):
    """{name: {split: metrics}} of the anchors on the same users and histories (evs: {split: Evaluator}
    over those users' local rows): popularity (the trained pairs' item counts), ItemKNN (item_knn with
    alpha 1, the cosine: a user's score of i the sum over their history of cos(j, i)) and ItemKNN at
    the alpha valid chose for the method (itemknn_tuned), a stronger anchor where popular items
    matter."""
    users, items = (np.asarray(a, np.int64) for a in train_pairs)
    count = torch.as_tensor(np.bincount(np.unique(users * n_items + items) % n_items, minlength=n_items),
                            dtype=torch.float32)
    S = dict(popularity=count[None, :].expand(n_new, -1), itemknn=item_knn(history, n_new, train_pairs, n_items, 1.0),
             itemknn_tuned=item_knn(history, n_new, train_pairs, n_items, alpha))
    return {name: {s: ev.evaluate_scores(x) for s, ev in evs.items()} for name, x in S.items()}


def fit(n_users, n_items, train_pairs, models, layers, cold, *, ks, candidates=None, valid=None, split_seed=0,
        select="one-se", device="cpu", log=print):
    """The new-user method of a run: models {name: recommender.train's result (user_emb, item_emb,
    ego)}, the fine-tuned models a new user may be placed by (a run's candidates, the one it kept
    among them), layers their LightGCN depth (0: MF). cold: data's cold_users (the new users:
    history, valid, test) or None. On valid Recall@20, one after the other: the item-to-item term
    alone (ItemKNN at each alpha; EASE at each lambda, for catalogues of at most EASE_MAX items),
    then, for each model, beta and gamma together (the blend; 0 among the choices of both); the
    model whose best blend scores best on valid is kept, on a tie the first, and with select
    "one-se" (run.py's --select) the best of those that clear the first by a paired standard
    error (recommender.one_se_rule), else the first. Ours where the paper
    is silent: a new user is placed by LightGCN's propagation alone, so a model whose final
    embeddings carry a side a history cannot give (run.py's content view) may place them worse
    than its twin without it; valid weighs them, as newitems.fit_head weighs the starts.
    Valid is the new users' (cold), else pseudo-new users': a share PSEUDO of the users with valid
    pairs, drawn by split_seed, their training pairs as history, their valid pairs as targets, the
    others' pairs as the neighbours' and the item-to-item term's (the items' embeddings were
    trained on their pairs too: this chooses, it reports nothing). Test is never read to choose.
    device: where EASE inverts its Gram matrix; the rest runs on the CPU.
    Returns (the metrics entry, model.npz's newuser_* arrays)."""
    if cold is not None:
        users, history, pool = cold["users"], cold["history"], train_pairs
        targets = {s: cold[s] for s in ("valid", "test")}
        entry = dict(users=users.tolist(), chosen_on="the new users' valid pairs")
    else:
        have = np.unique(valid[0])
        users = np.sort(np.random.default_rng([split_seed, 2]).choice(have, max(1, round(PSEUDO * len(have))),
                                                                      replace=False))
        m, mv = np.isin(train_pairs[0], users), np.isin(valid[0], users)
        history, pool = (train_pairs[0][m], train_pairs[1][m]), (train_pairs[0][~m], train_pairs[1][~m])
        targets = dict(valid=(valid[0][mv], valid[1][mv]))
        entry = dict(chosen_on=f"pseudo-new users: {len(users)} of the trained users, their training pairs the "
                               "history, their valid pairs the targets")
    n, hist = len(users), local(users, history)
    evs = {s: recommender.Evaluator(n_items, hist, local(users, t), ks, candidates=candidates)
           for s, t in targets.items()}
    recall = lambda S: evs["valid"].evaluate_scores(S)["recall@20"]
    K = {a: item_knn(hist, n, pool, n_items, a) for a in ALPHA}
    alpha_grid = {a: recall(k) for a, k in K.items()}
    alpha = max(alpha_grid, key=alpha_grid.get)  # on a tie the first
    lams = EASE if n_items <= EASE_MAX else ()
    if not lams:
        log(f"new users: {n_items} items, more than EASE_MAX ({EASE_MAX}): the item-to-item term is ItemKNN's")
    E = {lam: item_term(hist, n, pool, n_items, alpha, lam, device) for lam in lams}
    ease_grid = {lam: recall(k) for lam, k in E.items()}
    lam = max(ease_grid, key=ease_grid.get) if ease_grid else 0.0
    lam = lam if ease_grid and ease_grid[lam] > alpha_grid[alpha] else 0.0  # on a tie ItemKNN
    term = E[lam] if lam else K[alpha]

    def placed(res):  # one model: (G, blend(beta, gamma) -> S [n, I], {(beta, gamma): valid recall@20})
        if "ego" in res:
            G = propagation_items(res["ego"], n_users, train_pairs, layers)
        else:  # a fine-tuning finished by code older than the ego (a resumed run): its final embeddings, MF's formula
            log("new users: a model has no layer-0 table; the history is propagated from its final embeddings")
            G = propagation_items(np.concatenate([res["user_emb"], res["item_emb"]]), n_users, train_pairs, 0)
        item_emb = torch.as_tensor(res["item_emb"])
        p, nb = user_vectors(hist, n, G), F.normalize(neighbours(hist, n, res["user_emb"], pool, n_items), dim=1)
        blend = lambda b, g: scores(p + b * nb if b else p, item_emb, term, g, candidates)[0]  # served_scores' S
        return G, blend, {(b, g): recall(blend(b, g)) for b in BETA for g in GAMMA}

    fits = {name: placed(res) for name, res in models.items()}
    model_grid = {name: max(grid.values()) for name, (_, _, grid) in fits.items()}
    best_blend = lambda name: fits[name][1](*max(fits[name][2], key=fits[name][2].get))  # S of its best (beta, gamma)
    model, margin = max(model_grid, key=model_grid.get), None  # on a tie the first
    if select == "one-se":
        model, margin = recommender.one_se_rule(
            model_grid, lambda name: evs["valid"].evaluate_scores(best_blend(name), per_user=True)["recall@20"])
    G, blend, grid = fits[model]
    beta, gamma = max(grid, key=grid.get)  # on a tie the first: the smaller weights
    show = lambda grid: ", ".join(f"{k:g}: {r:.4f}" for k, r in grid.items())
    log(f"new users, valid recall@20 of the item-to-item term by ItemKNN's damping alpha: {show(alpha_grid)}; "
        f"by EASE's lambda: {show(ease_grid) or 'not tried'}; kept {f'EASE {lam:g}' if lam else f'ItemKNN {alpha:g}'}; "
        f"by (neighbour weight beta, blend weight gamma): best {grid[beta, gamma]:.4f} at ({beta:g}, {gamma:g}), "
        f"the vector alone (0, 0) {grid[0.0, 0.0]:.4f}"
        + ((f"; placed by {model} (" + ", ".join(f"{k} {r:.4f}" for k, r in model_grid.items())
            + ("" if margin is None else
               f"; {margin['challenger']}'s gap {margin['gap']:+.4f}, paired SE {margin['se']:.4f}") + ")")
           if len(models) > 1 else ""))
    entry.update(model=model, model_grid=model_grid, margin=margin, alpha=alpha, ease=lam, beta=beta, gamma=gamma,
                 knn=KNN,
                 alpha_grid={f"{x:g}": r for x, r in alpha_grid.items()},
                 ease_grid={f"{x:g}": r for x, r in ease_grid.items()},
                 beta_gamma_grid={f"{b:g},{g:g}": r for (b, g), r in grid.items()})
    if cold is not None:  # the kept blend: the scores serving computes from model.npz (tests/test_newusers.py)
        S = blend(beta, gamma)
        entry.update({s: ev.evaluate_scores(S) for s, ev in evs.items()},
                     anchors=anchors(hist, evs, n, pool, n_items, alpha))
    arrays = dict(newuser_items=G, newuser_beta=np.float64(beta), newuser_knn=np.int64(KNN),
                  newuser_alpha=np.float64(alpha), newuser_ease=np.float64(lam), newuser_gamma=np.float64(gamma),
                  newuser_train_users=np.asarray(train_pairs[0], np.int64),
                  newuser_train_items=np.asarray(train_pairs[1], np.int64), newuser_model=np.array(model),
                  newuser_user_emb=np.asarray(models[model]["user_emb"], np.float32),
                  newuser_item_emb=np.asarray(models[model]["item_emb"], np.float32))
    return entry, arrays


ARRAYS = ("newuser_items", "newuser_beta", "newuser_knn", "newuser_alpha", "newuser_gamma", "newuser_train_users",
          "newuser_train_items")


def served_scores(m, history, n_new, device="cpu"):
    """(S [n_new, I], user_vec [n_new, d], knn_weight [n_new]) from model.npz's arrays m for new users'
    histories (rows 0..n_new-1, item rows): the scores fit reported for the --cold-users users,
    s_u(i) = user_vec_u . newuser_item_emb[i] + knn_weight_u k_u(i) (scores, item_term, user_vectors), the
    trained neighbours' final embeddings newuser_user_emb (runs from before these two arrays: the kept
    model's user_emb, item_emb); device: where EASE inverts its Gram matrix, if the run kept EASE."""
    pairs = (m["newuser_train_users"], m["newuser_train_items"])
    user_emb, item_emb = (m[f"newuser_{k}"] if f"newuser_{k}" in m else m[k] for k in ("user_emb", "item_emb"))
    v = user_vectors(history, n_new, m["newuser_items"], float(m["newuser_beta"]), user_emb, pairs,
                     int(m["newuser_knn"]))
    gamma = float(m["newuser_gamma"])
    lam = float(m["newuser_ease"]) if "newuser_ease" in m else 0.0  # runs from before EASE: ItemKNN
    K = item_term(history, n_new, pairs, len(item_emb), float(m["newuser_alpha"]), lam, device) if gamma else None
    return scores(v, item_emb, K, gamma, m["ranked_items"])

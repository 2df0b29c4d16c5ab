"""The downstream recommenders, MF-BPR and LightGCN, and their evaluation.

MMCPR pre-trains user and item representations and hands them to "an existing
recommendation model", which is then fine-tuned as usual. This file holds two
such models, self-contained:

    sample_negatives   uniform negatives that are never a training positive
    Evaluator          full-ranking Recall/NDCG/Precision/Hit@K, MMRec protocol
    paired_gap         two models' per-user metric: the mean gap, its paired error
    one_se_rule        keep the best of several models only if it clears the first
    Table              a free layer-0 table, the interface any layer 0 offers
    MF                 matrix factorisation, score(u, i) = e_u . e_i
    LightGCN           He et al. (SIGIR 2020): e_u, e_i averaged over K
                       propagations on the normalised user-item graph
    ContentView        MGCN's view of item content (Yu et al., MM 2023), added to
                       the final embeddings so content trains in every step
    bpr_loss           the pairwise loss both are trained with
    train              Adam, early stopping on valid Recall@20, best-valid test;
                       resumable from a checkpoint file
    recommend          each user's top-K unseen items

Everything takes plain numpy arrays of (user, item) pairs and, for the
hand-off, optional initial (layer-0) embeddings, or a torch module that computes
layer 0 (a pre-trained network, fine-tuned with the recommender). Nothing here
imports the rest of the project.
"""
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_negatives(users, pos_keys, n_items, rng, pool=None):
    """One uniform item per entry of `users`, from `pool` (int64 item ids; default all
    items), that the user has not trained on. A new item is left out of the pool: it is
    unknown to the user, not disliked.

    pos_keys: sorted int64 keys user * n_items + item of the training pairs.
    Collisions are redrawn in rounds (a handful for sparse data), never a loop
    over users.
    """
    users = np.asarray(users, np.int64)  # int32 ids would overflow user * n_items
    draw = (lambda n: rng.integers(0, n_items, n)) if pool is None else (lambda n: pool[rng.integers(0, len(pool), n)])
    neg = draw(len(users))
    bad = np.arange(len(users) if len(pos_keys) else 0)
    while len(bad):
        keys = users[bad] * n_items + neg[bad]
        pos = np.searchsorted(pos_keys, keys).clip(max=len(pos_keys) - 1)
        bad = bad[pos_keys[pos] == keys]
        neg[bad] = draw(len(bad))
    return neg


class Evaluator:
    """Full ranking over all items, the user's training items masked (MMRec).

    Recall@K = hits / #relevant, NDCG@K with binary gains and the ideal DCG over
    min(#relevant, K), Precision@K = hits / K, Hit@K = [hits > 0], each averaged
    over the users that have relevant items in the split.

    candidates (int64 item ids, default all): the items ranked, e.g. the warm
    items, or the new items of the cold-start task; every held-out item must be
    one of them.

    Instead of a top-K list per user we compute the rank of each held-out pair
    (u, i): the number of candidates u has not trained on that score at least as
    high as i. This gives the metrics of a torch.topk ranking (up to exact
    float ties, which count against the item, so collapsed embeddings score
    nothing) with one matmul and one comparison pass per batch of pairs.
    """

    def __init__(self, n_items, train, target, ks=(10, 20, 50), batch=4096, device="cpu", candidates=None):
        self.ks, self.device = tuple(ks), torch.device(device)
        col = np.arange(n_items)  # item id -> column of the score matrix, -1 if not ranked
        if candidates is not None:
            col = np.full(n_items, -1)
            col[candidates] = np.arange(len(candidates))
        users, items = (np.asarray(a, np.int64)[np.lexsort(target[::-1])] for a in target)  # held-out pairs by user
        if (col[items] < 0).any():
            raise ValueError("Evaluator: a held-out item is not among the candidates")
        items = col[items]
        ids, self.pair_user, n_rel = np.unique(users, return_inverse=True, return_counts=True)
        self.n_eval = len(ids)
        t = np.lexsort(train[::-1])  # training items of user u: tr_items[tr_ptr[u]:tr_ptr[u + 1]]
        tr_items = col[np.asarray(train[1], np.int64)[t]]
        tr_ptr = np.searchsorted(np.asarray(train[0])[t], np.arange(max(train[0].max(), users.max()) + 2))
        T = lambda x: torch.as_tensor(x, device=self.device)
        self.batches = []
        for lo in range(0, len(users), batch):
            u = users[lo:lo + batch]
            deg = tr_ptr[u + 1] - tr_ptr[u]
            mask_rows = np.repeat(np.arange(len(u)), deg)  # (row, item) of every training item to mask
            mask_cols = tr_items[np.arange(deg.sum()) - np.repeat(np.cumsum(deg) - deg - tr_ptr[u], deg)]
            mask_rows, mask_cols = mask_rows[mask_cols >= 0], mask_cols[mask_cols >= 0]  # trained items ranked here
            self.batches.append((T(u), T(items[lo:lo + batch]), T(mask_rows), T(mask_cols),
                                 T(self.pair_user[lo:lo + batch]), T(n_rel[self.pair_user[lo:lo + batch]])))
        disc = 1.0 / torch.log2(torch.arange(max(self.ks), device=self.device) + 2.0)
        self.idcg = torch.cumsum(disc, 0)  # idcg[n-1] = ideal DCG of n relevant items
        self.candidates = None if candidates is None else torch.as_tensor(candidates, device=self.device)

    @torch.no_grad()
    def evaluate(self, user_emb, item_emb, per_user=False):
        """user_emb [n_users, d], item_emb [n_items, d] -> {'recall@20': ..., ...}; per_user: instead
        each evaluated user's Recall@K, {'recall@20': [n_eval] float64, ...}, users in id order
        (what paired_gap compares; their mean is the Recall@K above).

        A NaN score compares false with everything and would rank its item first,
        so every score must be finite. |e_u . e_i| <= |e_u| |e_i| (Cauchy-Schwarz,
        for every partial sum too), so finite embeddings whose largest norms
        multiply to half float32's largest value guarantee that (the half a margin
        for rounding), at the cost of one pass over the embeddings instead of over
        the [users, items] scores."""
        if self.candidates is not None:
            item_emb = item_emb[self.candidates]  # [n_candidates, d]
        norm = lambda e: torch.linalg.vector_norm(e.double(), dim=1).max()
        if not (torch.isfinite(user_emb).all() and torch.isfinite(item_emb).all()
                and norm(user_emb) * norm(item_emb) < torch.finfo(torch.float32).max / 2):
            raise FloatingPointError("non-finite scores: training diverged")
        return self._metrics(lambda users: user_emb[users] @ item_emb.T, per_user)

    @torch.no_grad()
    def evaluate_scores(self, scores, per_user=False):
        """The metrics of a dense score matrix [n_users, n_items] (rows: user ids, columns: item ids),
        for scores that are no single dot product; every score must be finite. per_user: as evaluate's."""
        if self.candidates is not None:
            scores = scores[:, self.candidates]
        if not torch.isfinite(scores).all():
            raise FloatingPointError("non-finite scores")
        return self._metrics(lambda users: scores[users], per_user)  # indexing copies: masked in place below

    def _metrics(self, score_rows, per_user=False):
        """score_rows(users [P]) -> [P, n_candidates] fresh scores, one row per held-out pair."""
        total = {f"{m}@{k}": 0.0 for k in self.ks for m in ("recall", "ndcg", "precision")}
        n_hit = torch.zeros(len(self.ks), self.n_eval, device=self.device)  # per user, for Hit@K
        if per_user:
            recall = torch.zeros(len(self.ks), self.n_eval, dtype=torch.float64, device=self.device)
        for users, items, mask_rows, mask_cols, pair_user, n_rel in self.batches:
            scores = score_rows(users)  # [P, n_items], one row per held-out pair
            scores[mask_rows, mask_cols] = -torch.inf  # training items are never recommended
            s = scores.gather(1, items[:, None])  # [P, 1]
            rank = scores.ge_(s).sum(1) - 1  # [P] 0-based rank, ties against the item (in place: no bool copy)
            for j, k in enumerate(self.ks):
                hit = (rank < k).float()  # [P]
                total[f"recall@{k}"] += (hit / n_rel).sum().item()
                total[f"precision@{k}"] += hit.sum().item() / k
                total[f"ndcg@{k}"] += (hit / torch.log2(rank + 2.0) / self.idcg[n_rel.clamp(max=k) - 1]).sum().item()
                n_hit[j].index_add_(0, pair_user, hit)
                if per_user:
                    recall[j].index_add_(0, pair_user, hit.double() / n_rel)
        if per_user:
            return {f"recall@{k}": recall[j].cpu().numpy() for j, k in enumerate(self.ks)}
        out = {m: v / self.n_eval for m, v in total.items()}
        out.update({f"hit@{k}": (n_hit[j] > 0).float().mean().item() for j, k in enumerate(self.ks)})
        return out


def paired_gap(a, b):
    """Two models' per-user metric on the same users, a and b [n] (Evaluator.evaluate(per_user=True))
    -> the mean of b - a and its standard error. Pairing removes what the users share: the
    spread between users, which makes each model's own standard error several times larger.
    Under two users there is no spread to measure: the error is infinite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or not len(a):
        raise ValueError(f"paired_gap: two per-user arrays of the same users, not shapes {a.shape} and {b.shape}")
    d = b - a
    return d.mean(), (d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf)


def one_se_rule(valid, per_user):
    """A one-standard-error rule (Breiman's, with the first model as the simplest) between models
    scored on the same valid users. valid: {name: valid metric}, the simplest (the default) first;
    per_user(name) -> that model's per-user metric [n]. The challengers, the models whose valid
    beats the first's, are tried best first (on a tie the earlier); the first of them that beats
    the first model by more than one paired standard error is kept, else the first model: a gap
    inside valid's noise keeps the simpler model, and a noisy best does not hide a clear second.
    Returns (the name kept, the margin {challenger, gap, se} of the challenger kept, else of the
    best; None where no model beats the first)."""
    first = next(iter(valid))
    challengers = sorted((n for n in valid if valid[n] > valid[first]), key=valid.get, reverse=True)  # stable
    margins, base = [], per_user(first) if challengers else None  # the first's, evaluated once
    for name in challengers:
        gap, se = paired_gap(base, per_user(name))
        margins.append(dict(challenger=name, gap=float(gap), se=float(se)))
        if gap > se:
            return name, margins[-1]
    return first, margins[0] if margins else None


class Table(nn.Module):
    """Layer 0 as a free table [n_users + n_items, d], users first, so that a BPR step builds
    one gradient and makes one Adam update: the model's own start (Xavier), or handed-over
    initial embeddings, fine-tuned as parameters.

    Any module with this interface can be a recommender's layer 0 (MF, LightGCN's `layer0`):
    forward() -> the layer-0 embeddings [n_users + n_items, d]; rescale(s) multiplies what
    forward returns by s from then on (fit_scale's factor for a pre-trained start);
    param_groups() -> Adam's parameter groups, a group without 'lr' at train's; and a
    state_dict() holding what training changes (a checkpoint saves and restores it)."""

    def __init__(self, n_users, n_items, dim=64, user_init=None, item_init=None):
        super().__init__()
        ego = torch.empty(n_users + n_items, dim)
        for part, init in ((ego[:n_users], user_init), (ego[n_users:], item_init)):
            if init is None:
                nn.init.xavier_normal_(part)  # as MMRec's BPR and LightGCN, fan-in/out of each table
            else:
                part.copy_(torch.as_tensor(init, dtype=torch.float32))
        self.weight = nn.Parameter(ego)

    def forward(self):  # [n_users + n_items, d]
        return self.weight

    @torch.no_grad()
    def rescale(self, s):
        self.weight.mul_(s)

    def param_groups(self):
        return [dict(params=[self.weight])]


class MF(nn.Module):
    """Matrix factorisation: score(u, i) = e_u . e_i.

    layer0 (a module, Table's interface; default a Table of dim, user_init, item_init) gives
    the layer-0 embeddings of users then items; propagate() maps them to h, which for MF is
    layer 0 itself. view (a ContentView, or None) adds its side to h: the final embeddings.
    """

    def __init__(self, n_users, n_items, dim=64, user_init=None, item_init=None, layer0=None, view=None):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.layer0 = Table(n_users, n_items, dim, user_init, item_init) if layer0 is None else layer0
        self.view = view

    def propagate(self, ego):  # [n_users + n_items, d] -> the same
        return ego

    def final(self, ego):
        """layer 0 [n_users + n_items, d] -> (final embeddings, h = propagate(ego), the view's side or None)."""
        h = self.propagate(ego)
        if self.view is None:
            return h, h, None
        side = self.view(ego[self.n_users:], h)
        return h + side, h, side

    def forward(self):  # [n_users + n_items, d]
        return self.final(self.layer0())[0]

    @torch.no_grad()
    def embeddings(self):
        """(users [n_users, d], items [n_items, d]): the final embeddings, for scoring."""
        return self().detach().split([self.n_users, self.n_items])


class SpMM(torch.autograd.Function):
    """Y = A X for a sparse A whose transpose At is built once, so dX = At dY (torch's own
    sparse backward transposes A on every call). LightGCN's Â is its own transpose (it checks)."""

    @staticmethod
    def forward(ctx, A, At, X):
        ctx.At = At
        return A @ X

    @staticmethod
    def backward(ctx, dY):
        return None, None, ctx.At @ dY


def bipartite_adjacency(n_users, n_items, users, items):
    """Â = D^-1/2 A D^-1/2 of the user-item graph A = [[0, R], [Rᵀ, 0]] (LightGCN,
    eq. 7: no self-loops), over users then items: [n_users + n_items] square,
    float32 torch sparse CSR. A node without training pairs keeps a zero row."""
    n = n_users + n_items
    keys = np.unique(np.asarray(users, np.int64) * n_items + np.asarray(items, np.int64))  # duplicates count once
    u, i = keys // n_items, keys % n_items + n_users
    rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
    order = np.lexsort((cols, rows))  # CSR order: by row, then column
    rows, cols = rows[order], cols[order]
    deg = np.bincount(rows, minlength=n)
    vals = (1.0 / np.sqrt(deg[rows] * deg[cols].astype(np.float64))).astype(np.float32)  # symmetric by construction
    indptr = np.concatenate([[0], np.cumsum(deg)])
    with warnings.catch_warnings():  # 'CSR support is in beta state'
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(vals), (n, n))


class LightGCN(MF):
    """LightGCN (He et al., SIGIR 2020): e^(k+1) = Â e^(k) on the user-item graph,
    final e = mean_k e^(k) for k = 0..K (α_k = 1/(K+1)); score(u, i) = e_u . e_i.
    Its only parameters are those of layer 0, where a pre-trained start goes: a free table
    (the handed-over vectors) or a module that computes layer 0 (a pre-trained network)."""

    def __init__(self, n_users, n_items, adj, layers=2, dim=64, user_init=None, item_init=None, layer0=None,
                 view=None):
        super().__init__(n_users, n_items, dim, user_init, item_init, layer0, view)
        a = adj.to_sparse_coo().coalesce()
        at = a.t().coalesce()
        if not (torch.equal(a.indices(), at.indices()) and torch.equal(a.values(), at.values())):
            raise ValueError("LightGCN: the adjacency must be symmetric (its backward multiplies by it, not its transpose)")
        self.adj, self.layers = adj, layers

    def propagate(self, ego):  # [n_users + n_items, d] -> the same
        x = h = ego
        for _ in range(self.layers):
            x = SpMM.apply(self.adj, self.adj, x)
            h = h + x
        return h / (self.layers + 1)


def knn_adjacency(feat, k=10, items=None, batch=1024, device="cpu"):
    """MGCN's item-item graph of one content modality: (A, Aᵀ), float32 torch sparse CSR [I, I], where
    row i averages the k items nearest to i by cosine similarity of feat [I, f] (i itself among
    them, barring ties). The edges are binary (MMRec's MGCN weights them by similarity; binary
    is what the README's measurements ran) and normalised as MGCN's, D^-1/2 A D^-1/2 with the
    rows' degree k: each row a mean. items (int64 ids, default all): the catalogue known at training
    time; the others have no edge at all."""
    x = F.normalize(torch.as_tensor(np.asarray(feat, np.float32), device=device), dim=1)
    n = len(x)
    pool = torch.arange(n, device=device) if items is None else torch.as_tensor(items, device=device)
    xp, k = x[pool], min(k, len(pool))  # [P, f]
    nb = pool[torch.cat([(xp[lo:lo + batch] @ xp.T).topk(k, dim=1).indices for lo in range(0, len(pool), batch)])]
    rows = pool.repeat_interleave(k)  # [P * k] with nb's [P, k]
    A = torch.sparse_coo_tensor(torch.stack([rows, nb.flatten()]), torch.full((len(rows),), 1.0 / k, device=device),
                                (n, n)).coalesce()
    with warnings.catch_warnings():  # 'CSR support is in beta state'
        warnings.simplefilter("ignore")
        return A.to_sparse_csr(), A.t().coalesce().to_sparse_csr()


class ContentView(nn.Module):
    """MGCN's view of item content (Yu et al., MM 2023), added to a recommender's output so that
    content keeps a say in every training step, not only through the start (ours for MMCPR: the
    paper hands content over through the start alone; run.py --content-view).

    For each content modality m, features f_m [I, f] (a trainable table, as MGCN's):
        e_m = A_m (e⁰_items ⊙ σ(W_g,m W_m f_m))   [I, d]  the items' layer-0 rows gated by their content,
                                                          averaged over their k nearest items by content
        v_m = [R̂ e_m ; e_m]                      [N, d]  users see it through the user-item graph
                                                          (R̂: Â's user-item block; Â [0; e_m] computes it)
    common = Σ_m α_m v_m,  α = softmax_m(q(v_m))           attention over the modalities
    side = (Σ_m σ(W_p,m h) ⊙ (v_m - common) + common) / (M + 1)   each modality's own part, gated by the
                                                          node's preference, read from h (LightGCN's output)
    The final embeddings are h + side; contrast() is MGCN's InfoNCE between side and h.
    feats: a list of [I, f] arrays; adj: the recommender's Â [N, N] (bipartite_adjacency), on `device`;
    items (int64 ids, default all): the catalogue known at training time, the only items in the kNN
    graphs, so that a new item's content changes nothing trained.
    """

    def __init__(self, feats, adj, n_users, dim=64, knn=10, nce=1e-3, tau=0.2, items=None, device="cpu"):
        super().__init__()
        self.n_users, self.adj, self.nce, self.tau = n_users, adj, nce, tau
        self.graphs = [knn_adjacency(f, knn, items, device=device) for f in feats]  # [(A_m, A_mᵀ)], not trained
        self.feat = nn.ParameterList(nn.Parameter(torch.tensor(f, dtype=torch.float32)) for f in feats)  # copies
        self.project = nn.ModuleList(nn.Linear(f.shape[1], dim) for f in feats)
        self.gate = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid()) for _ in feats)
        self.prefer = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid()) for _ in feats)
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))

    def forward(self, item_ego, h):
        """item_ego [I, d] the items' layer-0 rows, h [N, d] the recommender's output -> side [N, d]."""
        views = []
        for (A, At), feat, project, gate in zip(self.graphs, self.feat, self.project, self.gate):
            e = SpMM.apply(A, At, item_ego * gate(project(feat)))  # [I, d]
            e = torch.cat([e.new_zeros(self.n_users, e.shape[1]), e])  # [N, d]
            views.append(SpMM.apply(self.adj, self.adj, e) + e)  # [R̂ e_m; e_m]
        v = torch.stack(views, 1)  # [N, M, d]
        alpha = torch.softmax(self.query(v), dim=1)  # [N, M, 1]
        common = (alpha * v).sum(1)  # [N, d]
        own = sum(prefer(h) * (v[:, m] - common) for m, prefer in enumerate(self.prefer))
        return (own + common) / (len(views) + 1)

    def contrast(self, side, h, nodes):
        """nce · InfoNCE(side, h) on the rows `nodes` (the batch's users, then its items, each
        group a softmax of its own): a node's view of content agrees with its collaborative h.
        MGCN's loss counts a node the batch drew n times as n rows, each with n - 1 copies of its
        positive among its negatives; the same loss is computed here on the distinct rows, each
        weighted by n, each column standing for its n copies (+ log n): D² logits, not B²."""
        def info_nce(a, b, n):  # [D, d] twice, n [D]: row r's positive is b[r], the other rows its negatives
            a, b = F.normalize(a, dim=1) / self.tau, F.normalize(b, dim=1)  # 1/τ in a's rows, not in D² logits
            loss = torch.logsumexp(a @ b.T + n.log(), dim=1) - (a * b).sum(1)  # [D]
            return (loss * n).sum() / n.sum()
        groups = (torch.unique(g, return_counts=True) for g in nodes)
        return self.nce * sum(info_nce(side[u], h[u], n.float()) for u, n in groups)


def bpr_loss(pos_scores, neg_scores):
    """-log sigmoid(s_ui - s_uj), averaged over the batch (Rendle et al., 2009)."""
    return -F.logsigmoid(pos_scores - neg_scores).mean()


@torch.no_grad()
def fit_scale(net, node):
    """The factor s for the layer-0 embeddings that minimises the BPR loss on the triples
    node [3, P] (users, positives, negatives as node ids), all else fixed: the start's scores
    calibrated to the loss that fine-tunes them.

    A pre-trained start arrives at the scale its own objective left it, not at the one BPR
    wants: MMCPR's fused h, propagated by LightGCN, are about 3x too confident for BPR on
    TikTok, and fine-tuning from there degraded valid from the first epoch. The propagated
    embeddings are linear in layer 0 (MF: equal; LightGCN: a propagation), so scores scale by
    q = s² and the loss is mean softplus(-q x) with x = s_ui - s_uj: convex in q, found by a
    ternary search over log q in [1e-6, 1e6] (a start that ranks no positive above its
    negative ends at the floor). Rescaling changes no ranking, so epoch 0 scores the same.
    (Adding the L2 term to this fit sends q to 0 once l2 is large, wiping the start.)"""
    u, i, j = F.embedding(node, net.propagate(net.layer0()).double())  # a content view's side left out
    x = (u * i).sum(1) - (u * j).sum(1)  # [P] s_ui - s_uj
    if not torch.isfinite(x).all():
        raise FloatingPointError("non-finite scores in the start")
    if (x >= 0).all():
        return 1.0  # no positive ranked below its negative: the loss falls as q grows, no finite optimum
    loss = lambda log_q: F.softplus(-np.exp(log_q) * x).mean().item()
    lo, hi = np.log(1e-6), np.log(1e6)
    for _ in range(80):  # each round keeps 2/3 of the interval: (2/3)^80 * 28 < 1e-12
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, m2) if loss(m1) < loss(m2) else (m1, hi)
    return float(np.exp((lo + hi) / 4))  # s = sqrt(q)


@torch.no_grad()
def recommend(user_emb, item_emb, users, known, k=20, candidates=None, batch=4096):
    """Each user's top k items, best first, among `candidates` (int64 item ids, default all) that
    the user has no pair with in `known` (users, items): train, valid and test alike.
    user_emb [n_users, d], item_emb [n_items, d], users [n] int64 -> (items [n, k] int64,
    scores [n, k] float32); a user with fewer than k such items gets -1 and -inf in the rest."""
    device = user_emb.device
    cand = torch.arange(len(item_emb), device=device) if candidates is None else torch.as_tensor(candidates, device=device)
    col = np.full(len(item_emb), -1)  # item id -> column of the score matrix
    col[cand.cpu().numpy()] = np.arange(len(cand))
    row = np.full(len(user_emb), -1)  # user id -> row among `users`
    row[users] = np.arange(len(users))
    ku, ki = row[known[0]], col[known[1]]
    ku, ki = ku[(ku >= 0) & (ki >= 0)], ki[(ku >= 0) & (ki >= 0)]
    order = np.argsort(ku, kind="stable")
    ku, ki = ku[order], ki[order]
    bounds = np.searchsorted(ku, np.arange(0, len(users) + batch, batch))  # the known pairs of each batch of rows
    k = min(k, len(cand))
    top_items, top_scores = [], []
    for b, lo in enumerate(range(0, len(users), batch)):
        u = torch.as_tensor(np.asarray(users[lo:lo + batch], np.int64), device=device)
        scores = user_emb[u] @ item_emb[cand].T  # [B, n_candidates]
        r, c = (torch.as_tensor(a[bounds[b]:bounds[b + 1]], device=device) for a in (ku, ki))
        scores[r - lo, c] = -torch.inf
        s, j = scores.topk(k, dim=1)  # sorted, best first
        top_items.append(torch.where(s == -torch.inf, -1, cand[j]))
        top_scores.append(s)
    return torch.cat(top_items).cpu().numpy(), torch.cat(top_scores).cpu().numpy()


# Defaults: Amazon Baby's L2, chosen on its valid split for the baseline and for fine-tuning
# alike; the README lists each dataset's (TikTok: 3e-2 for both models, movielens: 1e-3 for
# MF, 1e-4 for LightGCN). Depth 2 was best on valid for LightGCN fine-tuning MMCPR's start on
# all three sets; LightGCN alone preferred 3 on Baby and 1 on movielens. Patience: MF on
# TikTok sits on a valid plateau for tens of epochs before it climbs again; patience 50
# stopped it there (best epoch 326), 100 kept a better valid epoch (413).
TUNED = {"mf": dict(lr=1e-3, l2=3e-2), "lightgcn": dict(lr=1e-3, l2=1e-2, layers=2)}
PATIENCE = 100
# The L2 grid a new dataset gets (run.py --l2): every value is trained, the best on valid kept.
# The real sets' valid choices: movielens 1e-5 or 1e-4 (LightGCN) and 1e-3 (MF), Baby 1e-2
# (LightGCN) and 3e-2 (MF), TikTok 3e-2. Where movielens keeps the lower edge, 1e-6 measured
# lower on valid (MMCPR, seed 7: 0.2178 against 0.2216), so the grid stops at 1e-5.
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1)


def save_checkpoint(path, state):
    """torch.save `state` to a temporary file beside `path`, flushed to disk, then renamed over
    it: a checkpoint is the old one or the new one in full, never half-written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path, log=print):
    """The state saved at `path`; None where there is none, or where it cannot be read
    (truncated, corrupt), which is reported in one line: the training then starts afresh."""
    if path is None or not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle, an I/O error: all mean "start afresh"
        reason = str(e).partition("\n")[0].partition(". ")[0]  # torch's runs on for sentences
        log(f"checkpoint {path} is unreadable ({type(e).__name__}: {reason}); starting this training afresh")
        return None


def trained_state(net):
    """A copy of what training changes: the state of net's layer 0 and of its content view."""
    return {k: v.clone() for k, v in net.state_dict().items()}


def train(n_users, n_items, train_pairs, valid, test, *, model="mf", layers=None, dim=64, lr=None, l2=None,
          batch=2048, epochs=1000, patience=PATIENCE, ks=(10, 20, 50), user_init=None, item_init=None,
          layer0=None, rescale=True, items=None, content=None, knn=10, content_nce=1e-3, device="cpu", seed=0,
          log=print, checkpoint=None, checkpoint_every=60.0, stop=None):
    """Train MF-BPR or LightGCN-BPR, select the epoch on valid Recall@20, report test there.

    Each epoch draws one uniform negative per training pair; the loss of a batch
    of B triples (u, i, j) is bpr_loss + l2 * (|e_u^0|² + |e_i^0|² + |e_j^0|²) / B
    on their layer-0 embeddings. Layer 0 is a free table (Table) from the
    model's own random start or from handed-over initial embeddings
    (user_init, item_init), or any module `layer0` with Table's interface, such
    as a pre-trained network that computes it, called once a step and trained
    by this loss (its param_groups may set their own learning rates). A
    handed-over start is first rescaled by fit_scale (rescale=True). Epoch 0 is
    the start itself, so fine-tuning is kept only if it beats it on valid.
    Training stops `patience` epochs after the best. content (a list of item
    feature arrays [n_items, f], default None): a ContentView of them (knn,
    content_nce) adds its side to the final embeddings and its InfoNCE to the
    loss, and trains with layer 0. items (int64 ids, default
    all): the catalogue known at training time, the only items drawn as
    negatives and ranked; new items (the cold-start split) are left out.
    Returns dict(best_epoch, valid, test, scale (of the start, or None),
    user_emb, item_emb (the final embeddings that scored), ego (the layer-0
    table [n_users + n_items, d] they were propagated from), epoch_seconds,
    eval_seconds (this call's: a resumed training counts its own), history).

    checkpoint (a file path): resume from it where it exists and is readable,
    and write it (save_checkpoint) at the end of an epoch once checkpoint_every
    seconds have passed since the last write, and on stopping. It holds
    everything later epochs depend on: layer 0's and the view's state, Adam's state, the numpy
    and torch RNG states, the start's scale, the history, the best epoch and
    its state; so a resumed training ends as an uninterrupted one, bit for
    bit on the CPU at the same thread count. It must come from the same call.
    stop (a callable): asked at the end of every epoch; once it returns True the
    checkpoint is written and KeyboardInterrupt raised.
    """
    if model not in TUNED:
        raise ValueError(f"unknown model {model!r} (mf or lightgcn)")
    lr, l2 = (TUNED[model][k] if v is None else v for k, v in (("lr", lr), ("l2", l2)))
    layers = TUNED["lightgcn"]["layers"] if layers is None else layers
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    if user_init is not None:
        dim = user_init.shape[1]
    pool = None if items is None else np.asarray(items, np.int64)
    users, items = (np.asarray(a, np.int64) for a in train_pairs)
    pos_keys = np.unique(users * n_items + items)  # sorted, duplicates once
    if np.bincount(pos_keys // n_items).max() >= (n_items if pool is None else len(pool)):
        raise ValueError("a user has trained on every item: no negative to sample")
    adj = bipartite_adjacency(n_users, n_items, users, items).to(device) if model == "lightgcn" or content else None
    view = ContentView(content, adj, n_users, dim, knn, content_nce, items=pool, device=device) if content else None
    if model == "mf":
        net = MF(n_users, n_items, dim, user_init, item_init, layer0, view).to(device)
    else:
        net = LightGCN(n_users, n_items, adj, layers, dim, user_init, item_init, layer0, view).to(device)
    groups = net.layer0.param_groups() + ([dict(params=list(view.parameters()))] if view else [])
    opt = torch.optim.Adam(groups, lr=lr, fused=True)  # fused: one kernel for the whole update
    users_t, items_t = torch.as_tensor(users, device=device), torch.as_tensor(items, device=device)
    ev_valid, ev_test = (Evaluator(n_items, (users, items), s, ks, device=device, candidates=pool) for s in (valid, test))
    epoch_seconds, eval_seconds = [], []

    def evaluate(ev):
        t = time.perf_counter()
        m = ev.evaluate(*net.embeddings())
        eval_seconds.append(time.perf_counter() - t)
        return m

    state = load_checkpoint(checkpoint, log)
    if state is None:
        scale = None
        if rescale and (user_init is not None or layer0 is not None):
            negs = torch.as_tensor(sample_negatives(users, pos_keys, n_items, np.random.default_rng(seed), pool),
                                   device=device)
            scale = fit_scale(net, torch.stack([users_t, items_t + n_users, negs + n_users]))
            net.layer0.rescale(scale)
            log(f"{model}: pre-trained start rescaled by {scale:.3f}")
        best = evaluate(ev_valid)
        done, best_epoch, best_state = 0, 0, trained_state(net)
        history = [dict(epoch=0, loss=None, **{f"valid_{k}": v for k, v in best.items()})]
        log(f"{model} epoch 0 (init): valid recall@20 {best['recall@20']:.4f}")
    else:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        done, scale, best, best_epoch, history = (state[k] for k in ("epoch", "scale", "best", "best_epoch", "history"))
        best_state = {k: v.to(device) for k, v in state["best_state"].items()}
        log(f"{model}: resumed from {checkpoint} after epoch {done} (best so far: epoch {best_epoch})")
    saved = time.perf_counter()
    for epoch in range(done + 1, epochs + 1):
        t = time.perf_counter()
        perm = torch.as_tensor(rng.permutation(len(users)), device=device)
        negs = torch.as_tensor(sample_negatives(users, pos_keys, n_items, rng, pool), device=device)
        total = torch.zeros((), device=device)
        for idx in perm.split(batch):
            node = torch.stack([users_t[idx], items_t[idx] + n_users, negs[idx] + n_users])  # [3, B]
            ego = net.layer0()  # [n_users + n_items, d] layer 0, computed once a step
            final, h, side = net.final(ego)  # [n_users + n_items, d] each; side None without a view
            u, i, j = F.embedding(node, final)  # [3, B, d] final embeddings (F.embedding: a fast backward)
            loss = bpr_loss((u * i).sum(1), (u * j).sum(1)) + l2 * F.embedding(node, ego).square().sum() / len(idx)
            if side is not None and net.view.nce > 0:
                loss = loss + net.view.contrast(side, h, node[:2])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)  # no .item() per step: a GPU would wait for each
        total = total.item()
        epoch_seconds.append(time.perf_counter() - t)
        m = evaluate(ev_valid)
        history.append(dict(epoch=epoch, loss=total / len(users), **{f"valid_{k}": v for k, v in m.items()}))
        log(f"{model} epoch {epoch}: loss {total / len(users):.4f}  valid recall@20 {m['recall@20']:.4f}  "
            f"{epoch_seconds[-1]:.2f}s + eval {eval_seconds[-1]:.2f}s")
        if m["recall@20"] > best["recall@20"]:
            best, best_epoch = m, epoch
            best_state = trained_state(net)
        elif epoch - best_epoch >= patience:
            break
        stopping = stop is not None and stop()
        if checkpoint is not None and (stopping or time.perf_counter() - saved >= checkpoint_every):
            save_checkpoint(checkpoint, dict(
                epoch=epoch, net={k: v.cpu() for k, v in net.state_dict().items()}, opt=opt.state_dict(), rng=rng.bit_generator.state,
                torch_rng=torch.get_rng_state(), scale=scale, best=best, best_epoch=best_epoch, history=history,
                best_state={k: v.cpu() for k, v in best_state.items()}))
            saved = time.perf_counter()
        if stopping:
            raise KeyboardInterrupt(f"{model}: stopped after epoch {epoch}")
    net.load_state_dict(best_state)
    test_m = evaluate(ev_test)
    user_emb, item_emb = net.embeddings()
    with torch.no_grad():
        ego = net.layer0()  # [n_users + n_items, d] the kept layer 0 (a network's output, in --finetune network)
    return dict(best_epoch=best_epoch, valid=best, test=test_m, scale=scale,
                user_emb=user_emb.cpu().numpy(), item_emb=item_emb.cpu().numpy(), ego=ego.detach().cpu().numpy(),
                epoch_seconds=epoch_seconds, eval_seconds=eval_seconds, history=history)

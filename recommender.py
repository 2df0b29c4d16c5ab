"""The downstream recommender: matrix factorisation with BPR, and its evaluation.

MMCPR pre-trains user and item representations and hands them to an existing
recommender, which is then fine-tuned as usual. This file is that recommender,
self-contained:

    sample_negatives   uniform negatives that are never a training positive
    Evaluator          full-ranking Recall/NDCG/Precision/Hit@K, MMRec protocol
    MF, bpr_loss       matrix factorisation scored by the BPR loss
    train_mf           Adam, early stopping on valid Recall@20, best-valid test

Everything takes plain numpy arrays of (user, item) pairs and, for the
hand-off, optional initial embeddings. Nothing here imports the rest of the
project.
"""
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_negatives(users, pos_keys, n_items, rng):
    """One uniform item per entry of `users` that the user has not trained on.

    pos_keys: sorted int64 keys user * n_items + item of the training pairs.
    Collisions are redrawn in rounds (a handful for sparse data), never a loop
    over users.
    """
    neg = rng.integers(0, n_items, len(users))
    bad = np.arange(len(users) if len(pos_keys) else 0)
    while len(bad):
        keys = users[bad] * n_items + neg[bad]
        pos = np.searchsorted(pos_keys, keys).clip(max=len(pos_keys) - 1)
        bad = bad[pos_keys[pos] == keys]
        neg[bad] = rng.integers(0, n_items, len(bad))
    return neg


class Evaluator:
    """Full ranking over all items, the user's training items masked (MMRec).

    Recall@K = hits / #relevant, NDCG@K with binary gains and the ideal DCG over
    min(#relevant, K), Precision@K = hits / K, Hit@K = [hits > 0], each averaged
    over the users that have relevant items in the split.

    Instead of a top-K list per user we compute the rank of each held-out pair
    (u, i): the number of items u has not trained on that score above i. This
    gives the metrics of a torch.topk ranking (up to exact float ties, which
    count against the item, so collapsed embeddings score nothing) with one
    matmul and one comparison pass per batch of pairs, several times faster
    than sorting on a CPU.
    """

    def __init__(self, n_items, train, target, ks=(10, 20, 50), batch=4096, device="cpu"):
        self.ks, self.device = tuple(ks), torch.device(device)
        users, items = (a[np.lexsort(target[::-1])] for a in target)  # held-out pairs by user
        ids, self.pair_user, n_rel = np.unique(users, return_inverse=True, return_counts=True)
        self.n_eval = len(ids)
        t = np.lexsort(train[::-1])  # training items of user u: tr_items[tr_ptr[u]:tr_ptr[u + 1]]
        tr_items = train[1][t]
        tr_ptr = np.searchsorted(train[0][t], np.arange(max(train[0].max(), users.max()) + 2))
        T = lambda x: torch.as_tensor(x, device=self.device)
        self.batches = []
        for lo in range(0, len(users), batch):
            u = users[lo:lo + batch]
            deg = tr_ptr[u + 1] - tr_ptr[u]
            mask_rows = np.repeat(np.arange(len(u)), deg)  # (row, item) of every training item to mask
            mask_cols = tr_items[np.arange(deg.sum()) - np.repeat(np.cumsum(deg) - deg - tr_ptr[u], deg)]
            self.batches.append((T(u), T(items[lo:lo + batch]), T(mask_rows), T(mask_cols),
                                 T(self.pair_user[lo:lo + batch]), T(n_rel[self.pair_user[lo:lo + batch]])))
        disc = 1.0 / torch.log2(torch.arange(max(self.ks), device=self.device) + 2.0)
        self.idcg = torch.cumsum(disc, 0)  # idcg[n-1] = ideal DCG of n relevant items

    @torch.no_grad()
    def evaluate(self, user_emb, item_emb):
        """user_emb [n_users, d], item_emb [n_items, d] -> {'recall@20': ..., ...}."""
        if not (torch.isfinite(user_emb).all() and torch.isfinite(item_emb).all()):
            raise FloatingPointError("non-finite embeddings: training diverged (try a lower --lr)")
        total = {f"{m}@{k}": 0.0 for k in self.ks for m in ("recall", "ndcg", "precision")}
        n_hit = torch.zeros(len(self.ks), self.n_eval, device=self.device)  # per user, for Hit@K
        for users, items, mask_rows, mask_cols, pair_user, n_rel in self.batches:
            scores = user_emb[users] @ item_emb.T  # [P, n_items], one row per held-out pair
            scores[mask_rows, mask_cols] = -torch.inf  # training items are never recommended
            s = scores.gather(1, items[:, None])  # [P, 1]
            rank = scores.ge_(s).sum(1) - 1  # [P] 0-based rank, ties against the item (in place: 5x faster)
            for j, k in enumerate(self.ks):
                hit = (rank < k).float()  # [P]
                total[f"recall@{k}"] += (hit / n_rel).sum().item()
                total[f"precision@{k}"] += hit.sum().item() / k
                total[f"ndcg@{k}"] += (hit / torch.log2(rank + 2.0) / self.idcg[n_rel.clamp(max=k) - 1]).sum().item()
                n_hit[j].index_add_(0, pair_user, hit)
        out = {m: v / self.n_eval for m, v in total.items()}
        out.update({f"hit@{k}": (n_hit[j] > 0).float().mean().item() for j, k in enumerate(self.ks)})
        return out


class MF(nn.Module):
    """Matrix factorisation: score(u, i) = e_u . e_i.

    Users and items live in one table, users first, so that a BPR step builds
    one dense gradient and makes one Adam update instead of three (2x faster).
    """

    def __init__(self, n_users, n_items, dim=64, user_init=None, item_init=None):
        super().__init__()
        self.n_users = n_users
        self.emb = nn.Parameter(torch.empty(n_users + n_items, dim))
        for part, init in ((self.user, user_init), (self.item, item_init)):
            if init is None:
                nn.init.xavier_normal_(part)  # as MMRec's BPR, fan-in/out of each table
            else:
                part.copy_(torch.as_tensor(init, dtype=torch.float32))

    @property
    def user(self):  # [n_users, d]
        return self.emb.data[: self.n_users]

    @property
    def item(self):  # [n_items, d]
        return self.emb.data[self.n_users:]

    def forward(self, users, pos, neg):
        """Embeddings of a batch of (user, positive item, negative item) triples: [3, B, d]."""
        idx = torch.stack([users, pos + self.n_users, neg + self.n_users])  # [3, B]
        return F.embedding(idx, self.emb)


def bpr_loss(pos_scores, neg_scores):
    """-log sigmoid(s_ui - s_uj), averaged over the batch (Rendle et al., 2009)."""
    return -F.logsigmoid(pos_scores - neg_scores).mean()


def train_mf(n_users, n_items, train, valid, test, *, dim=64, lr=1e-3, l2=1e-4, batch=2048,
             epochs=1000, patience=20, ks=(10, 20, 50), user_init=None, item_init=None,
             device="cpu", seed=0, log=print):
    """Train MF-BPR, select the epoch on valid Recall@20, report test there.

    Epoch 0 is the initial embeddings themselves, so when pre-trained ones are
    handed over, fine-tuning is kept only if it improves them on valid.
    Returns dict(best_epoch, valid, test, user_emb, item_emb, epoch_seconds,
    eval_seconds, history).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device)
    if user_init is not None:
        dim = user_init.shape[1]
    model = MF(n_users, n_items, dim, user_init, item_init).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # fused: 3x faster steps on CPU
    users, items = train
    if np.bincount(users).max() >= n_items:
        raise ValueError("a user has trained on every item: no negative to sample")
    pos_keys = np.sort(users * n_items + items)
    users_t, items_t = torch.as_tensor(users, device=device), torch.as_tensor(items, device=device)
    ev_valid = Evaluator(n_items, train, valid, ks, device=device)
    ev_test = Evaluator(n_items, train, test, ks, device=device)

    def validate():
        t = time.perf_counter()
        m = ev_valid.evaluate(model.user, model.item)
        eval_seconds.append(time.perf_counter() - t)
        return m

    epoch_seconds, eval_seconds = [], []
    best = validate()
    best_epoch, best_state = 0, model.emb.detach().clone()
    history = [dict(epoch=0, loss=None, **{f"valid_{k}": v for k, v in best.items()})]
    log(f"mf epoch 0 (init): valid recall@20 {best['recall@20']:.4f}")
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        perm = torch.as_tensor(rng.permutation(len(users)), device=device)
        negs = torch.as_tensor(sample_negatives(users, pos_keys, n_items, rng), device=device)
        total = 0.0
        for idx in perm.split(batch):
            e = model(users_t[idx], items_t[idx], negs[idx])  # [3, B, d]: users, positives, negatives
            u, i, j = e
            loss = bpr_loss((u * i).sum(1), (u * j).sum(1)) + l2 * e.square().sum() / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        epoch_seconds.append(time.perf_counter() - t)
        m = validate()
        history.append(dict(epoch=epoch, loss=total / len(users), **{f"valid_{k}": v for k, v in m.items()}))
        log(f"mf epoch {epoch}: loss {total / len(users):.4f}  valid recall@20 {m['recall@20']:.4f}  "
            f"{epoch_seconds[-1]:.2f}s + eval {eval_seconds[-1]:.2f}s")
        if m["recall@20"] > best["recall@20"]:
            best, best_epoch = m, epoch
            best_state = model.emb.detach().clone()
        elif epoch - best_epoch >= patience:
            break
    model.emb.data.copy_(best_state)
    t = time.perf_counter()
    test_m = ev_test.evaluate(model.user, model.item)
    eval_seconds.append(time.perf_counter() - t)
    return dict(best_epoch=best_epoch, valid=best, test=test_m,
                user_emb=model.user.cpu().numpy(), item_emb=model.item.cpu().numpy(),
                epoch_seconds=epoch_seconds, eval_seconds=eval_seconds, history=history)

"""
MMCPR, "Multi-Modal Contrastive Pre-training for Recommendation" (Liu et al., ICMR 2022),
the pre-training stage as one self-contained file (numpy, scipy, torch only).

In paper order:
1. homogeneous graphs: a user-user and an item-item kNN graph from co-interaction
   counts of the TRAINING pairs only (R Rᵀ and Rᵀ R, blockwise, never densified);
2. intra-modal aggregation: every modality of a node (the learned ID embedding, called
   'graph'; the user review features; each item content feature such as text, image,
   audio) is propagated LightGCN-style over that side's graph;
3. inter-modal aggregation: attention over a node's modality representations;
4. contrastive inter-modal alignment: symmetric InfoNCE between every pair of item
   content modalities, the batch's other distinct items as negatives (`info_nce`,
   `alignment_loss`);
5. pre-training objective: BCE on observed vs sampled unobserved (user, item) pairs
   plus lambda_align * alignment plus L2 on the batch's ego representations (`pretrain`).
   A checkpoint file lets an interrupted pre-training resume where it stopped, with the
   result of an uninterrupted one (`save_checkpoint`, `load_checkpoint`).
6. fine-tuning ("we fine-tune the pre-trained multi-modal representations using an existing
   recommendation model"): the fused h go to the recommender as vectors, or the network that
   computes them becomes its layer 0 (`Encoder`), rebuilt from the same inputs (`network`) and
   the trained parameters (`load_network`), and trains under the recommender's loss.

Choices where the paper is silent, each with the `pretrain` flag that sets it (default):
- `knn` (10, chosen on a valid split): a node keeps its top-k neighbours by co-interaction count (ties to the lower
  index), kept edges are binary and symmetrised by union, Â = D^-1/2 (A+I) D^-1/2: the GCN
  renormalisation, symmetric, so a backward pass can reuse Â; `user_graph`, `item_graph`
  (on): a side switched off gets Â = I, for the ablations;
- `layers` (3): the number of propagation layers, chosen on the valid splits;
- `dim` (64): embedding size; ID embeddings start as N(0, 0.1²), item and review features
  pass a projector Linear(f, d) -> LeakyReLU -> Linear(d, d);
- `standardize` (on): features are z-scored per dimension (`prepare`), since a large offset
  shared by all items would make every projection point the same way;
- `fusion` ('attention'): inter-modal aggregation by attention as in the paper, or 'mean'
  for the ablation;
- `modality_dropout` (0): in training, each of a node's attention scores but one, drawn at
  random, is masked with this probability (`ModalityAttention`). The attention can settle on one content modality
  within the first epoch (MovieLens: text, the image's weight 0.000); the others then get
  almost no gradient from the BCE, only the alignment's. Dropout keeps them training, but 0.1
  and 0.3 did not beat 0 on MovieLens' valid split, so it is off (README, Modalities);
- `new_items` (none): the items of the cold-start split. A new item has its ID modality
  masked always, at training and at scoring, is never a negative, and stays out of the
  feature standardisation, so its pairs and features change nothing trained. Other items
  without a training pair (TikTok has 465 that appear only in valid or test) stay as they
  were, as the downstream recommender treats them too, so warm results are unchanged;
- `id_dropout` (0): DropoutNet's, each step masks each item's ID modality with this
  probability, so the BCE also trains h_i from content alone, as a new item's must be. On
  MovieLens' cold-valid split 0.5 ranked the new items within a seed's spread of 0
  (README, New items), so it is off;
- `align` (on), `lambda_align` (0.01), `tau` (0.2): the aligned representations are the
  projector outputs, before propagation, so that alignment acts on the content encoders;
  lambda_align chosen on TikTok's valid split (MovieLens' agrees);
- `align_batch` (1024): the alignment contrasts the batch's distinct items in random groups
  of at most this many, which bounds the [B, B] similarity matrix;
- `l2` (1e-3): squared norm of a node's ego representations summed over its modalities (ID
  embedding and content projections alike, so that none grows unchecked), averaged over the
  batch's users, positive items and negative items, and the three added;
- `neg` (8), `lr` (1e-2, Adam): sampled negatives per observed pair and step size, chosen
  on TikTok's valid split;
- `batch` (8192): observed pairs per step; every step propagates the whole graph, so large
  steps make an epoch cheaper;
- `epochs` (100): chosen on TikTok's valid split;
- the hand-off: `pretrain` returns the fused h (propagated, then attended), the vectors the
  BCE scored, as the downstream model's layer-0 embeddings; the layer-0 (ego)
  representations fused by the same α start LightGCN lower and fine-tune worse (README);
- `Encoder`'s parts and their learning rates, when the network itself is fine-tuned
  (run.py's --finetune network, --finetune-lr): see its docstring.
"""

import itertools
import os
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# homogeneous graphs

def topk_neighbours(X, k, block=2048):
    """Directed kNN from co-occurrence counts C = X Xᵀ (any nonzero of X counts as 1):
    row n keeps the k columns m != n with the largest C[n, m] > 0, ties to the lower m.
    X: [N, F] sparse -> [N, N] binary float32 CSR with at most k entries per row.
    C is built `block` rows at a time, so memory stays bounded."""
    X = (sp.csr_matrix(X) != 0).astype(np.float32)
    XT = X.T.tocsr()
    N = X.shape[0]
    rows, cols = [], []
    for s in range(0, N, block):
        C = (X[s:s + block] @ XT).tocsr()                       # [b, N] counts
        r = np.repeat(np.arange(C.shape[0]), np.diff(C.indptr))  # row of each stored count
        off = C.indices != r + s                                 # drop the diagonal
        r, c, cnt = r[off], C.indices[off].astype(np.int64), C.data[off].astype(np.int64)
        top = cnt.max(initial=0)
        key = np.sort((r * (top + 1) + top - cnt) * N + c)       # by row, then count desc, then column
        n_row = np.bincount(r, minlength=C.shape[0])
        rank = np.arange(len(key)) - np.repeat(np.cumsum(n_row) - n_row, n_row)  # position within its row
        key = key[rank < k]
        rows.append(key // ((top + 1) * N) + s)
        cols.append(key % N)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N, N))


def knn_graph(X, k, block=2048):
    """Symmetric binary kNN adjacency (float32 CSR, no diagonal): edge n-m if either
    keeps the other among its top-k by count. Items: knn_graph(R.T.tocsr(), k); users: knn_graph(R, k)."""
    A = topk_neighbours(X, k, block)
    return A.maximum(A.T).tocsr()


def normalize_adj(A):
    """Â = D^-1/2 (A + I) D^-1/2 as float32 CSR (the GCN renormalisation trick)."""
    A = sp.csr_matrix(A, dtype=np.float32) + sp.eye(A.shape[0], dtype=np.float32, format='csr')
    d = sp.diags(np.asarray(A.sum(1)).ravel() ** -0.5)
    return (d @ A @ d).tocsr().astype(np.float32)


def build_graphs(R, k, user_graph=True, item_graph=True):
    """(Â_user [U, U], Â_item [I, I]) from the binary train matrix R [U, I] only.
    A switched-off graph has no edges, so its Â is the identity (no propagation)."""
    U, I = R.shape
    A_user = knn_graph(R, k) if user_graph else sp.csr_matrix((U, U), dtype=np.float32)
    A_item = knn_graph(R.T.tocsr(), k) if item_graph else sp.csr_matrix((I, I), dtype=np.float32)
    return normalize_adj(A_user), normalize_adj(A_item)


def to_torch_sparse(A, device='cpu'):
    """scipy CSR -> torch sparse CSR (CSR rather than COO: the faster layout for sparse @ dense on CPU)."""
    A = sp.csr_matrix(A, dtype=np.float32)
    with warnings.catch_warnings():                                    # 'CSR support is in beta state'
        warnings.simplefilter('ignore')
        return torch.sparse_csr_tensor(torch.from_numpy(A.indptr.astype(np.int64)),
                                       torch.from_numpy(A.indices.astype(np.int64)),
                                       torch.from_numpy(A.data), A.shape, device=device)

# -----------------------------------------------------------------------------
# intra-modal aggregation

class SymSpMM(torch.autograd.Function):
    """Y = Â X for a symmetric sparse Â, so dX = Â dY (MMCPR checks the symmetry). torch's
    own CSR backward transposes Â on every call instead, which is slow."""

    @staticmethod
    def forward(ctx, A, X):
        ctx.A = A
        return A @ X

    @staticmethod
    def backward(ctx, dY):
        return None, ctx.A @ dY


def check_symmetric(A, name):
    """Raise ValueError unless the torch matrix A (sparse or dense) is square and symmetric up to
    float32 rounding. `propagate` backpropagates through Â instead of Âᵀ, so a non-symmetric
    matrix (say a row-normalised D^-1 A) would train on wrong gradients without any error."""
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f'{name} must be a square matrix, got shape {tuple(A.shape)}')
    C = A.detach().to_sparse().coalesce()                              # COO, whatever the layout
    gap = (C - C.t()).coalesce().values().abs()
    if gap.numel() and gap.max() > 1e-5 * C.values().abs().max():
        raise ValueError(f'{name} must be symmetric: propagate uses it for its own transpose in the '
                         f'backward pass (max |A - Aᵀ| = {gap.max().item():.3g})')


def propagate(A, x, layers):
    """LightGCN-style aggregation: mean of [x, Âx, ..., Â^L x]. A: symmetric [N, N] (MMCPR checks it
    once with `check_symmetric`, rather than here on every step), x: [N, D] -> [N, D]."""
    h = x
    for _ in range(layers):
        x = SymSpMM.apply(A, x)
        h = h + x
    return h / (layers + 1)

# -----------------------------------------------------------------------------
# inter-modal aggregation

class ModalityAttention(nn.Module):
    """score_m = qᵀ tanh(W h_m + b), α = softmax over the node's modalities, h = Σ_m α_m h_m.
    drop > 0, in training mode only: modality dropout. Per node one modality, drawn at random,
    is kept; each of the others is masked with probability drop (so a score is masked with
    probability drop (M-1)/M). The fusion must then sometimes rest on a modality it would
    otherwise ignore, which keeps that modality's encoder training."""

    def __init__(self, d, drop=0.0):
        super().__init__()
        self.W = nn.Linear(d, d)
        self.q = nn.Linear(d, 1, bias=False)
        self.drop = drop

    def forward(self, H, mask=None):                                   # H: [N, M, d], mask: [N, M] bool
        """mask: the modalities a node has (a new item has no ID one); the others get α = 0."""
        score = self.q(torch.tanh(self.W(H))).squeeze(-1)              # [N, M]
        keep = torch.ones_like(score, dtype=torch.bool) if mask is None else mask
        if self.training and self.drop > 0:
            one = torch.rand_like(score).masked_fill(~keep, -1).argmax(1)  # one present modality always stays
            keep = keep & (torch.rand_like(score) >= self.drop)
            keep[torch.arange(len(score), device=H.device), one] = True
        if mask is not None or (self.training and self.drop > 0):
            score = score.masked_fill(~keep, -torch.inf)
        alpha = torch.softmax(score, dim=1)                            # [N, M]
        return (alpha.unsqueeze(-1) * H).sum(1), alpha                 # [N, d], [N, M]

# -----------------------------------------------------------------------------
# losses

def info_nce(a, b, tau):
    """Symmetric InfoNCE: row n of a and row n of b are a positive pair, every other row
    of the batch is a negative. a, b: [B, d] -> scalar.
    -log softmax of the positive s[n, n] over b's (row n) and over a's (column n), averaged.
    Cosines are at most 1, so s - 1/tau <= 0: one exp, safe without a max, serves both
    log-sum-exps (half the passes over [B, B] of two logsumexp calls). It stays above
    float32's underflow while -2/tau > -87, hence tau >= 0.025."""
    if tau < 0.025:
        raise ValueError(f'info_nce: tau must be at least 0.025 (float32 exp underflows), got {tau}')
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    s = (a / tau) @ b.T                                                # [B, B] cosine / tau
    e = torch.exp(s - 1 / tau)                                         # [B, B] in (0, 1]
    return 0.5 * (e.sum(1).log() + e.sum(0).log()).mean() + 1 / tau - s.diagonal().mean()


def alignment_loss(z, items, tau, group):
    """Inter-modal alignment: InfoNCE between every pair of item content modalities, on the
    distinct `items` (a repeated item is no negative of itself). They are shuffled into groups
    of at most `group`, an item's negatives being the rest of its group: this bounds the
    [B, B] similarity matrix, whose cost on the CPU grows faster than B² once it leaves the cache.
    z: {modality: [I, d]}, items: [B] -> scalar: summed over modality pairs, per pair the
    item-weighted mean over groups (0 with fewer than two modalities)."""
    if len(z) < 2:
        return torch.zeros((), device=items.device)
    uniq = torch.unique(items)
    groups = uniq[torch.randperm(len(uniq), device=uniq.device)].tensor_split(-(-len(uniq) // group))
    return sum(len(g) / len(uniq) * info_nce(F.embedding(g, z[a]), F.embedding(g, z[b]), tau)
               for a, b in itertools.combinations(z, 2) for g in groups)


def bce_loss(pos_logits, neg_logits):
    """Binary cross-entropy, observed pairs labelled 1, sampled negatives 0, mean over all pairs:
    -log σ(pos) = softplus(-pos), -log(1 - σ(neg)) = softplus(neg)."""
    n = pos_logits.numel() + neg_logits.numel()
    return (F.softplus(-pos_logits).sum() + F.softplus(neg_logits).sum()) / n


def sample_negatives(users, keys, n_items, n_neg, rng, pool=None):
    """n_neg items per user, uniform over the items of `pool` (int64 ids, default all) the user
    has NOT interacted with in training. A new item stays out of the pool: unknown, not disliked.
    users: [B] -> [B, n_neg] int64; keys: sorted int64 u * n_items + i of the training pairs.
    Rejection in rounds, redrawing only collisions; every user must miss at least one item."""
    draw = (lambda n: rng.integers(0, n_items, n)) if pool is None else (lambda n: pool[rng.integers(0, len(pool), n)])
    u = np.repeat(np.asarray(users, np.int64), n_neg)
    neg = draw(len(u))
    bad = np.arange(len(u))
    while len(bad):
        key = u[bad] * n_items + neg[bad]
        bad = bad[keys[np.minimum(np.searchsorted(keys, key), len(keys) - 1)] == key]
        neg[bad] = draw(len(bad))
    return neg.reshape(-1, n_neg)

# -----------------------------------------------------------------------------
# the model

def prepare(x, standardize=True, rows=None):
    """Feature matrix [N, f] -> float32 tensor, by default standardised per dimension (zero mean,
    unit variance over `rows`, default all: the items known at training time, so that a new
    item's features change nothing trained). TikTok's image features share an offset of norm 31
    against a spread of about 1.3 a dimension: raw, every item's projection points the same way.
    A column whose spread is float rounding of its mean (constant in truth) maps to 0."""
    x = torch.from_numpy(np.asarray(x, np.float32))
    if not standardize:
        return x
    fit = x if rows is None else x[torch.as_tensor(rows)]
    mu, sd = fit.mean(0), fit.std(0, correction=0)
    return (x - mu) / torch.where(sd > 1e-5 * (1 + mu.abs()), sd + 1e-6, torch.inf)


def projector(f, d):
    return nn.Sequential(nn.Linear(f, d), nn.LeakyReLU(), nn.Linear(d, d))


class MMCPR(nn.Module):
    """User modalities: 'graph' (ID embedding) [+ 'review']. Item modalities: 'graph' + every
    content feature. Each is propagated over its side's graph, then fused per node.
    has_id [I] bool: False for a new item (no training pair yet), whose ID modality is masked out
    of the fusion, so its h_i is built from its content alone."""

    def __init__(self, n_users, n_items, user_adj, item_adj, item_feats, user_feat=None,
                 dim=64, layers=3, fusion='attention', modality_dropout=0.0, has_id=None):
        super().__init__()
        assert fusion in ('attention', 'mean')
        check_symmetric(user_adj, 'user_adj')
        check_symmetric(item_adj, 'item_adj')
        self.user_adj, self.item_adj, self.layers = user_adj, item_adj, layers
        self.user_id = nn.Embedding(n_users, dim)
        self.item_id = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user_id.weight, std=0.1)
        nn.init.normal_(self.item_id.weight, std=0.1)
        self.register_buffer('has_id', torch.ones(n_items, dtype=torch.bool) if has_id is None else has_id)
        self.content = list(item_feats)                                # item content modality names
        for name, f in item_feats.items():
            self.register_buffer('feat_' + name, f.float(), persistent=False)  # [I, f], rebuilt from the inputs
        self.item_proj = nn.ModuleDict({name: projector(f.shape[1], dim) for name, f in item_feats.items()})
        self.user_proj = None
        if user_feat is not None:
            self.register_buffer('user_feat', user_feat.float(), persistent=False)  # [U, f]
            self.user_proj = projector(user_feat.shape[1], dim)
        self.user_modalities = ['graph'] + (['review'] if user_feat is not None else [])
        self.item_modalities = ['graph'] + self.content
        attend = fusion == 'attention'                                # a lone modality needs no attention
        self.user_att = ModalityAttention(dim, modality_dropout) if attend and len(self.user_modalities) > 1 else None
        self.item_att = ModalityAttention(dim, modality_dropout) if attend and len(self.item_modalities) > 1 else None

    def side(self, adj, E, att, mask=None):
        """E: [N, M, d] ego modality representations, mask: [N, M] bool (None: all present)
        -> fused [N, d], α [N, M]."""
        H = propagate(adj, E.flatten(1), self.layers).view_as(E)      # all modalities in one spmm
        if att is not None:
            return att(H, mask)
        w = torch.ones(H.shape[:2], device=H.device) if mask is None else mask.float()
        alpha = w / w.sum(1, keepdim=True)                            # mean over the present modalities
        return (alpha.unsqueeze(-1) * H).sum(1), alpha

    def forward(self, id_dropout=0.0, content_only=False):
        """-> fused h_u [U, d], h_i [I, d]; ego modality representations E_u [U, Mu, d], E_i [I, Mi, d]
        in the order of user_modalities, item_modalities; attention weights α_u [U, Mu], α_i [I, Mi].
        An item's ID modality is masked where has_id is False (a new item), where id_dropout drops it
        (DropoutNet: content learns to stand in for it), and for every item if content_only."""
        E_u = [self.user_id.weight] + ([self.user_proj(self.user_feat)] if self.user_proj is not None else [])
        E_i = [self.item_id.weight] + [self.item_proj[name](getattr(self, 'feat_' + name)) for name in self.content]
        E_u, E_i = torch.stack(E_u, 1), torch.stack(E_i, 1)
        h_u, alpha_u = self.side(self.user_adj, E_u, self.user_att)
        has_id = torch.zeros_like(self.has_id) if content_only else self.has_id
        if id_dropout > 0:
            has_id = has_id & (torch.rand(len(has_id), device=has_id.device) >= id_dropout)
        mask = None                                                   # content-less items keep their ID
        if self.content:
            mask = torch.cat([has_id.unsqueeze(1), has_id.new_ones(len(has_id), len(self.content))], 1)  # [I, Mi]
        h_i, alpha_i = self.side(self.item_adj, E_i, self.item_att, mask)
        return h_u, h_i, E_u, E_i, alpha_u, alpha_i

# -----------------------------------------------------------------------------
# pre-training

def save_checkpoint(path, state):
    """torch.save `state` to a temporary file beside `path`, flushed to disk, then renamed over
    it: a checkpoint is the old one or the new one in full, never half-written."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path, log=print):
    """The state saved at `path`; None where there is none, or where it cannot be read
    (truncated, corrupt), which is reported in one line: the pre-training then starts afresh."""
    if path is None or not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:                                             # truncated, corrupt, I/O: start afresh
        reason = str(e).partition('\n')[0].partition('. ')[0]  # torch's runs on for sentences
        log(f'checkpoint {path} is unreadable ({type(e).__name__}: {reason}); starting the pre-training afresh')
        return None


def network(R, item_feats, user_feat=None, *, dim=64, knn=10, layers=3, fusion='attention', modality_dropout=0.0,
            new_items=None, user_graph=True, item_graph=True, standardize=True, device='cpu', log=print):
    """(MMCPR [untrained], graph seconds): the network `pretrain` trains, set up from the binary train
    matrix R [U, I] (scipy sparse), item content {name: [I, f]} and user reviews [U, f] or None: the
    homogeneous graphs, the standardised features, the new items' ID modality masked. The same
    inputs build the same network, so a caller can rebuild the pre-trained one from
    pretrain()['network'] (`load_network`). Draws its ID embeddings from torch's RNG."""
    R = (sp.csr_matrix(R) != 0).astype(np.float32)
    n_users, n_items = R.shape
    t = time.perf_counter()
    A_user, A_item = build_graphs(R, knn, user_graph, item_graph)
    graph_seconds = time.perf_counter() - t
    # Â stores each undirected edge in both directions, plus the n self-loops
    log(f'graphs: {(A_user.nnz - n_users) // 2} user edges, {(A_item.nnz - n_items) // 2} item edges, '
        f'{graph_seconds:.2f}s')
    has_id = np.ones(n_items, bool)                                    # [I] False: a new item
    if new_items is not None:
        has_id[np.asarray(new_items, np.int64)] = False
        if R[:, ~has_id].nnz:
            raise ValueError('a new item has a training pair')
    fit = None if has_id.all() else np.flatnonzero(has_id)             # the items the standardisation sees
    feats = {name: prepare(f, standardize, fit) for name, f in item_feats.items()}
    review = None if user_feat is None else prepare(user_feat, standardize)
    model = MMCPR(n_users, n_items, to_torch_sparse(A_user, device), to_torch_sparse(A_item, device),
                  feats, review, dim, layers, fusion, modality_dropout, torch.from_numpy(has_id)).to(device)
    return model, graph_seconds


def load_network(model, params):
    """Copy the parameters {name: array} (pretrain()['network']) into the network `model` (`network`
    of the same inputs); returns it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.as_tensor(params[name]))
    return model


def pretrain(R, item_feats, user_feat=None, *, dim=64, knn=10, layers=3, epochs=100, batch=8192,
             align_batch=1024, lr=1e-2, neg=8, tau=0.2, lambda_align=0.01, l2=1e-3, fusion='attention',
             modality_dropout=0.0, id_dropout=0.0, new_items=None, user_graph=True, item_graph=True, align=True,
             standardize=True, device='cpu', seed=0, log=print, checkpoint=None, checkpoint_every=60.0,
             stop=None):
    """Pre-train MMCPR on the binary train matrix R [U, I] (scipy sparse) with item content
    features {name: [I, f]} and optional user review features [U, f]. Returns a dict of
    user_emb [U, d], item_emb [I, d] (fused h after training), item_content_emb [I, d] (h_i
    with every ID modality masked: what content alone gives), network (the trained parameters
    {name: array}, for `load_network`), modality_weights, graph_seconds, epoch_seconds, losses
    (per epoch {'bce', 'align', 'total'} means) and notes.

    new_items (int ids, default none): the items that arrive after training (the cold-start
    split), so no pair of theirs may be in R. A new item has no edge and no trained ID: its ID
    modality is masked, it is never a sampled negative, and its features do not enter the
    standardisation.
    id_dropout: DropoutNet's, each training step masks each item's ID modality with this
    probability, so that the BCE also trains h_i from content alone.
    checkpoint (a file path): resume from it where it exists and is readable, and write it
    (save_checkpoint) at the end of an epoch once checkpoint_every seconds have passed since
    the last write, and on stopping. It holds the parameters (not the features or graphs,
    rebuilt from the inputs), Adam's state, the numpy and torch RNG states and the losses, so a
    resumed pre-training ends as an uninterrupted one (on the CPU, at the same thread count:
    bit for bit). It must come from the same call.
    stop (a callable): asked at the end of every epoch; once it returns True the checkpoint is
    written and KeyboardInterrupt raised."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    R = (sp.csr_matrix(R) != 0).astype(np.float32)
    n_users, n_items = R.shape
    notes = []
    if user_feat is None:
        notes.append('no review features: user side is graph-only')
    if not item_feats:
        notes.append('no item content modalities: item side is graph-only')
    if len(item_feats) < 2:
        notes.append('fewer than two item content modalities: no alignment')
    elif not align:
        notes.append('align=False: no alignment loss')
    if not user_graph:
        notes.append('user graph off: no user-side propagation')
    if not item_graph:
        notes.append('item graph off: no item-side propagation')
    if fusion == 'mean':
        notes.append('fusion=mean: modalities averaged, no attention')
        if modality_dropout:
            notes.append('modality_dropout has no effect with fusion=mean')

    model, graph_seconds = network(R, item_feats, user_feat, dim=dim, knn=knn, layers=layers, fusion=fusion,
                                   modality_dropout=modality_dropout, new_items=new_items, user_graph=user_graph,
                                   item_graph=item_graph, standardize=standardize, device=device, log=log)
    has_id = model.has_id.cpu().numpy()                                # [I] False: a new item
    pool = None if has_id.all() else np.flatnonzero(has_id)            # the negatives' items
    if (np.diff(R.indptr) >= has_id.sum()).any():
        raise ValueError('a user interacted with every item: no negatives to sample')
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    users, items = R.nonzero()                                         # training pairs
    keys = np.sort(users.astype(np.int64) * n_items + items)

    epoch_seconds, losses, done = [], [], 0
    state = load_checkpoint(checkpoint, log)
    if state is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state['params'][name])
        opt.load_state_dict(state['opt'])
        rng.bit_generator.state = state['rng']
        torch.set_rng_state(state['torch_rng'])
        if state['cuda_rng'] is not None:
            torch.cuda.set_rng_state(state['cuda_rng'], device)
        done, epoch_seconds, losses = state['epoch'], state['epoch_seconds'], state['losses']
        log(f'pre-training: resumed from {checkpoint} after epoch {done}')
    saved = time.perf_counter()
    for epoch in range(done, epochs):
        t = time.perf_counter()
        perm = rng.permutation(len(users))
        total = np.zeros(3)                                            # bce, align, total
        for s in range(0, len(perm), batch):
            idx = perm[s:s + batch]
            j = sample_negatives(users[idx], keys, n_items, neg, rng, pool)  # [B, neg]
            u, i, j = (torch.from_numpy(x.astype(np.int64)).to(device) for x in (users[idx], items[idx], j))
            h_u, h_i, E_u, E_i, _, _ = model(id_dropout)
            z = dict(zip(model.content, E_i[:, 1:].unbind(1)))         # item content projections [I, d]
            # Row look-ups of [N, d] tables go through F.embedding (= h_u[u]): its backward is
            # faster than indexing's.
            hu = F.embedding(u, h_u)                                   # [B, d]
            loss_bce = bce_loss((hu * F.embedding(i, h_i)).sum(-1),    # [B]
                                (hu.unsqueeze(1) * F.embedding(j, h_i)).sum(-1))  # [B, neg]
            loss_align = alignment_loss(z, i, tau, align_batch) if align else torch.zeros((), device=device)
            sq_u, sq_i = E_u.pow(2).sum((1, 2)), E_i.pow(2).sum((1, 2))  # [U], [I] over ego modalities
            reg = sq_u[u].mean() + sq_i[i].mean() + sq_i[j].mean()
            loss = loss_bce + lambda_align * loss_align + l2 * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += len(idx) * np.array([loss_bce.item(), loss_align.item(), loss.item()])
        epoch_seconds.append(time.perf_counter() - t)
        losses.append(dict(zip(('bce', 'align', 'total'), (total / len(users)).tolist())))
        log(f"epoch {epoch + 1:3d}  bce {losses[-1]['bce']:.4f}  align {losses[-1]['align']:.4f}  "
            f'{epoch_seconds[-1]:.2f}s')
        stopping = stop is not None and stop()
        if checkpoint is not None and (stopping or time.perf_counter() - saved >= checkpoint_every):
            save_checkpoint(checkpoint, dict(
                epoch=epoch + 1, params={name: p.detach().cpu() for name, p in model.named_parameters()},
                opt=opt.state_dict(), rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state(device) if torch.device(device).type == 'cuda' else None,
                epoch_seconds=epoch_seconds, losses=losses))
            saved = time.perf_counter()
        if stopping:
            raise KeyboardInterrupt(f'pre-training: stopped after epoch {epoch + 1}')

    with torch.no_grad():                                              # eval mode: no modality dropout
        h_u, h_i, _, _, alpha_u, alpha_i = model.eval()()
        h_c = model(content_only=True)[1]
    return {
        'user_emb': h_u.cpu().numpy().astype(np.float32),
        'item_emb': h_i.cpu().numpy().astype(np.float32),
        'item_content_emb': h_c.cpu().numpy().astype(np.float32),
        'network': {name: p.detach().cpu().numpy() for name, p in model.named_parameters()},
        'modality_weights': {'user': dict(zip(model.user_modalities, alpha_u.mean(0).tolist())),
                             'item': dict(zip(model.item_modalities, alpha_i[model.has_id].mean(0).tolist()))},
        'graph_seconds': graph_seconds,
        'epoch_seconds': epoch_seconds,
        'losses': losses,
        'notes': notes,
    }


# -----------------------------------------------------------------------------
# fine-tuning the network

class Encoder(nn.Module):
    """The pre-trained network as a downstream recommender's layer 0, so that fine-tuning "the
    pre-trained multi-modal representations" fine-tunes what computes them: forward() ->
    scale * [h_u; h_i] (+ free) [U + I, d], the fused h recomputed at every call, so content, the
    homogeneous graphs and the attention keep a say in every step of the recommender's loss.
    `pretrain` hands over the same h as vectors: at the start the two agree bit for bit.

    lr {part: learning rate}, the parts (PARTS) trained with their own Adam step sizes, a part
    at 0 frozen (no gradient computed). The paper is silent on all of it:
      id       the user and item ID embeddings ('graph' modality)
      content  the content projectors (item features, user reviews)
      fusion   the attention of the inter-modal aggregation
      free     a per-node offset [U + I, d] added to the output, zero at the start: the vector
               hand-off's own degrees of freedom (with the other parts frozen, it trains as the
               vectors do, up to float rounding)
    The network runs in eval mode: the pre-training's modality dropout and ID dropout are not
    applied while fine-tuning. rescale(s) multiplies the output by s (the recommender's
    fit_scale), as it multiplies the handed-over vectors."""

    PARTS = ('id', 'content', 'fusion', 'free')

    def __init__(self, model, lr):
        super().__init__()
        if set(lr) != set(self.PARTS):
            raise ValueError(f'Encoder: a learning rate for each of {", ".join(self.PARTS)}, got {sorted(lr)}')
        if not any(lr.values()):
            raise ValueError('Encoder: every part frozen (learning rate 0), nothing to fine-tune')
        self.net, self.lr = model.eval(), dict(lr)
        self.register_buffer('scale', torch.ones((), device=model.has_id.device))
        n = model.user_id.num_embeddings + model.item_id.num_embeddings
        self.free = nn.Parameter(torch.zeros(n, model.user_id.embedding_dim, device=model.has_id.device))
        for p in self.parameters():
            p.requires_grad_(False)
        for part, ps in self.parts().items():
            for p in ps:
                p.requires_grad_(self.lr[part] > 0)

    def parts(self):
        """{part: its parameters}."""
        mods = lambda *ms: [p for m in ms if m is not None for p in m.parameters()]
        return dict(id=mods(self.net.user_id, self.net.item_id), content=mods(self.net.item_proj, self.net.user_proj),
                    fusion=mods(self.net.user_att, self.net.item_att), free=[self.free])

    def param_groups(self):
        """Adam's parameter groups: each part's parameters at its learning rate, frozen parts left out."""
        return [dict(params=ps, lr=self.lr[part]) for part, ps in self.parts().items() if self.lr[part] > 0 and ps]

    @torch.no_grad()
    def rescale(self, s):
        self.scale.mul_(s)

    def forward(self):                                                 # [U + I, d]
        h_u, h_i = self.net()[:2]
        h = torch.cat([h_u, h_i]) * self.scale
        return h + self.free if self.lr['free'] > 0 else h

"""Tests for mmcpr.py: graphs, propagation, fusion, losses, sampler, model, pretrain."""
import inspect
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mmcpr  # noqa: E402
import recommender  # noqa: E402
from helpers import Killed, assert_same, quiet, stop_once  # noqa: E402

FAST = settings(max_examples=30, deadline=None)


def random_R(seed, n_users, n_items, density=0.3):
    """Binary train matrix where every user misses at least one item."""
    rng = np.random.default_rng(seed)
    M = rng.random((n_users, n_items)) < density
    M[np.arange(n_users), rng.integers(0, n_items, n_users)] = False
    return sp.csr_matrix(M.astype(np.float32))


def brute_topk(X, k):
    """Dense reference: per row the k largest positive counts of X Xᵀ off the diagonal, ties to lower column."""
    Xb = (X.toarray() != 0).astype(np.int64)
    C = Xb @ Xb.T
    np.fill_diagonal(C, 0)
    out = np.zeros_like(C)
    for n in range(len(C)):
        cand = sorted((m for m in range(len(C)) if C[n, m] > 0), key=lambda m: (-C[n, m], m))
        out[n, cand[:k]] = 1
    return out


# ---------------------------------------------------------------------------- graphs

@FAST
@given(st.integers(0, 10**6), st.integers(1, 25), st.integers(1, 15), st.integers(1, 6), st.integers(1, 30))
def test_topk_matches_brute_force_for_any_block(seed, n, f, k, block):
    X = random_R(seed, n, f, 0.35)
    A = mmcpr.topk_neighbours(X, k, block=block).toarray()
    assert np.array_equal(A, brute_topk(X, k))
    assert (A.sum(1) <= k).all() and not A.diagonal().any()


def test_topk_tie_rule_and_counts():
    # node 0 shares 2 features with node 3 and 1 feature with nodes 1, 2: k=2 keeps 3 then 1 (tie -> lower index)
    X = sp.csr_matrix(np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32))
    A = mmcpr.topk_neighbours(X, 2).toarray()
    assert A[0].tolist() == [0, 1, 0, 1]


@FAST
@given(st.integers(0, 10**6), st.integers(2, 30), st.integers(2, 20), st.integers(1, 5))
def test_knn_graph_symmetric_binary_and_block_invariant(seed, n_users, n_items, k):
    R = random_R(seed, n_users, n_items)
    for X in (R, R.T.tocsr()):
        A = mmcpr.knn_graph(X, k, block=1)
        assert (A != mmcpr.knn_graph(X, k, block=4096)).nnz == 0
        D = A.toarray()
        assert np.array_equal(D, D.T) and set(np.unique(D)) <= {0.0, 1.0} and not D.diagonal().any()
        assert A.dtype == np.float32
        # every edge was kept by at least one endpoint's top-k
        T = brute_topk(X, k)
        assert np.array_equal(D, np.maximum(T, T.T))


@FAST
@given(st.integers(0, 10**6), st.integers(1, 40), st.integers(1, 6))
def test_normalized_adjacency_symmetric_with_spectrum_in_unit_interval(seed, n, k):
    X = random_R(seed, n, 8)
    A = mmcpr.normalize_adj(mmcpr.knn_graph(X, k))
    assert A.dtype == np.float32
    D = A.toarray().astype(np.float64)
    assert np.allclose(D, D.T)
    ev = np.linalg.eigvalsh(D)
    assert ev.min() >= -1 - 1e-5 and ev.max() <= 1 + 1e-5
    assert abs(ev.max() - 1) < 1e-4                         # D^-1/2 (A+I) D^-1/2 has top eigenvalue 1


def same_pattern_variants(R, rng):
    """R's nonzero pattern dressed differently: other positive values, dtypes and formats; a CSR with
    duplicate entries, explicit zeros off the pattern and rows stored in shuffled column order."""
    r, c = R.nonzero()
    yield sp.csr_matrix((rng.uniform(0.1, 5, len(r)), (r, c)), shape=R.shape)
    yield from (R.astype(bool), R.astype(np.int64), R.astype(np.float64), R.tocsc(), R.tocoo())
    reps = rng.integers(1, 4, len(r))                                   # each pair stored 1-3 times
    zr, zc = rng.integers(0, R.shape[0], 10), rng.integers(0, R.shape[1], 10)
    off = np.asarray(R[zr, zc]).ravel() == 0                            # explicit zeros where R has none
    rows = np.concatenate([np.repeat(r, reps), zr[off]])
    cols = np.concatenate([np.repeat(c, reps), zc[off]])
    data = np.concatenate([rng.uniform(0.1, 5, reps.sum()), np.zeros(off.sum())]).astype(np.float32)
    order = np.lexsort((rng.random(len(rows)), rows))                   # by row, shuffled within a row
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=R.shape[0]))])
    yield sp.csr_matrix((data[order], cols[order], indptr), shape=R.shape)  # not canonical
    yield sp.coo_matrix((data, (rows, cols)), shape=R.shape)


@FAST
@given(st.integers(0, 10**6), st.integers(1, 20), st.integers(1, 15), st.integers(1, 5))
def test_graphs_depend_only_on_the_train_pattern(seed, n_users, n_items, k):
    R = random_R(seed, n_users, n_items)
    ref = mmcpr.build_graphs(R, k)
    for V in same_pattern_variants(R, np.random.default_rng(seed)):
        for a, b in zip(mmcpr.build_graphs(V, k), ref):
            assert a.dtype == np.float32 and a.shape == b.shape and (a != b).nnz == 0, type(V)


def edge_set(A_hat):
    """Off-diagonal pattern of a normalised adjacency, as a dense bool matrix."""
    E = A_hat.toarray() != 0
    np.fill_diagonal(E, False)
    return E


@FAST
@given(st.integers(0, 10**6), st.integers(2, 20), st.integers(2, 15), st.sampled_from([1, 2, 3, 100]))
def test_adding_a_train_pair_changes_the_graphs_only_around_it(seed, n_users, n_items, k):
    # a new pair (u, i) raises the counts of i with u's items and of u with i's users, and nothing else:
    # only those nodes' top-k lists may change; with k >= N every positive count is kept, so exactly
    # the edges i-j (j one of u's items) and u-v (v one of i's users) are added
    R = random_R(seed, n_users, n_items)
    rng = np.random.default_rng(seed)
    u = rng.integers(n_users)
    i = rng.choice(np.flatnonzero(R[u].toarray().ravel() == 0))         # random_R leaves every user one
    R2 = R + sp.csr_matrix(([1.0], ([u], [i])), shape=R.shape)
    items_of_u, users_of_i = R[u].indices, R[:, i].nonzero()[0]
    for old, new, node, partners in zip(mmcpr.build_graphs(R, k), mmcpr.build_graphs(R2, k),
                                        (u, i), (users_of_i, items_of_u)):
        old, new = edge_set(old), edge_set(new)
        touched = np.zeros(len(old), bool)
        touched[partners] = touched[node] = True
        changed = old != new
        assert not (changed & ~touched[:, None] & ~touched[None, :]).any()
        if k >= len(old):
            added = np.zeros_like(old)
            added[node, partners] = added[partners, node] = True
            np.fill_diagonal(added, False)
            assert np.array_equal(new, old | added)


def test_switched_off_graph_is_identity():
    R = random_R(0, 12, 9)
    A_user, A_item = mmcpr.build_graphs(R, 3, user_graph=False, item_graph=True)
    assert np.array_equal(A_user.toarray(), np.eye(12, dtype=np.float32))
    assert A_item.nnz > 9


def test_to_torch_sparse_matches_scipy():
    A = mmcpr.normalize_adj(mmcpr.knn_graph(random_R(1, 30, 10), 4))
    x = np.random.default_rng(0).standard_normal((30, 5)).astype(np.float32)
    y = mmcpr.to_torch_sparse(A, 'cpu') @ torch.from_numpy(x)
    assert np.allclose(y.numpy(), A @ x, atol=1e-5)

# ---------------------------------------------------------------------------- propagation and fusion

@FAST
@given(st.integers(0, 10**6), st.integers(2, 30), st.integers(1, 6), st.integers(0, 3))
def test_propagation_is_permutation_equivariant(seed, n, d, layers):
    rng = np.random.default_rng(seed)
    A = mmcpr.normalize_adj(mmcpr.knn_graph(random_R(seed, n, 6), 3))
    x = rng.standard_normal((n, d)).astype(np.float32)
    perm = rng.permutation(n)
    P = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), perm)), shape=(n, n))  # (P x)[r] = x[perm[r]]
    y = mmcpr.propagate(mmcpr.to_torch_sparse(A), torch.from_numpy(x), layers).numpy()
    yp = mmcpr.propagate(mmcpr.to_torch_sparse(P @ A @ P.T), torch.from_numpy(x[perm]), layers).numpy()
    assert np.allclose(yp, y[perm], atol=1e-5)


def test_propagation_is_layer_mean_and_backward_matches_dense():
    A = mmcpr.normalize_adj(mmcpr.knn_graph(random_R(3, 15, 6), 3))
    D = torch.from_numpy(A.toarray())
    x = torch.randn(15, 4, requires_grad=True)
    y = mmcpr.propagate(mmcpr.to_torch_sparse(A), x, 2)
    assert torch.allclose(y, (x + D @ x + D @ D @ x) / 3, atol=1e-5)
    w = torch.randn(15, 4)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    xd = x.detach().requires_grad_()
    (gd,) = torch.autograd.grad((((xd + D @ xd + D @ D @ xd) / 3) * w).sum(), xd)
    assert torch.allclose(gx, gd, atol=1e-5)


@FAST
@given(st.integers(0, 10**6), st.integers(1, 20), st.integers(1, 5), st.integers(1, 8))
def test_attention_weights_are_a_distribution_and_copies_fuse_to_themselves(seed, n, m, d):
    torch.manual_seed(seed)
    att = mmcpr.ModalityAttention(d)
    h, alpha = att(torch.randn(n, m, d) * 3)
    assert h.shape == (n, d) and alpha.shape == (n, m)
    assert (alpha >= 0).all() and torch.allclose(alpha.sum(1), torch.ones(n), atol=1e-6)
    x = torch.randn(n, d)
    fused, _ = att(x.unsqueeze(1).expand(n, m, d))
    assert torch.allclose(fused, x, atol=1e-5)

@FAST
@given(st.integers(0, 10**6), st.integers(1, 30), st.integers(1, 5), st.floats(0.1, 0.9))
def test_modality_dropout_masks_in_training_only_and_keeps_a_modality(seed, n, m, drop):
    torch.manual_seed(seed)
    att = mmcpr.ModalityAttention(4, drop)
    H = torch.randn(n, m, 4, requires_grad=True)
    h, alpha = att.train()(H)
    h.sum().backward()
    assert torch.isfinite(H.grad).all() and torch.isfinite(att.q.weight.grad).all()
    ref = mmcpr.ModalityAttention(4)
    ref.load_state_dict(att.state_dict())
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(att.eval()(H), ref(H)))
        # training: the full attention renormalised over the modalities that were kept
        kept = ref(H)[1] * (alpha > 0)
        assert torch.allclose(alpha, kept / kept.sum(1, keepdim=True), atol=1e-5)
        assert torch.allclose(h, (alpha.unsqueeze(-1) * H).sum(1), atol=1e-5)


def test_modality_dropout_masks_about_the_given_share():
    torch.manual_seed(0)
    _, alpha = mmcpr.ModalityAttention(4, 0.3).train()(torch.randn(20000, 3, 4))
    # P(masked) = drop * P(not the one kept) = 0.3 * 2/3
    assert abs((alpha == 0).float().mean().item() - 0.2) < 0.01


def small_model(has_id, fusion='attention', n_users=6):
    n_items = len(has_id)
    torch.manual_seed(0)
    feats = {'text': torch.randn(n_items, 5), 'image': torch.randn(n_items, 7)}
    eye = lambda n: torch.eye(n).to_sparse_csr()
    return mmcpr.MMCPR(n_users, n_items, eye(n_users), eye(n_items), feats, None, dim=4, layers=2, fusion=fusion,
                       has_id=torch.as_tensor(has_id))


@pytest.mark.parametrize('fusion', ['attention', 'mean'])
def test_a_new_item_is_built_from_its_content_alone(fusion):
    has_id = np.array([True, False, True, False, True])
    model = small_model(has_id, fusion).eval()
    with torch.no_grad():
        h, alpha = model()[1], model()[5]
        assert (alpha[~has_id, 0] == 0).all() and (alpha[has_id, 0] > 0).all()
        assert torch.allclose(alpha.sum(1), torch.ones(5))
        content = model(content_only=True)[1]
        assert torch.equal(h[~has_id], content[~has_id]) and not torch.allclose(h[has_id], content[has_id])
        model.item_id.weight.mul_(100)                        # no ID embedding reaches a new item
        assert torch.equal(model()[1][~has_id], h[~has_id])


def test_id_dropout_masks_the_id_modality_at_the_given_rate():
    has_id = np.arange(20000) % 4 != 0                       # a quarter are new items, masked always
    model = small_model(has_id).train()
    torch.manual_seed(1)
    alpha = model(id_dropout=0.4)[5]
    masked = alpha[:, 0] == 0
    assert masked[~has_id].all()
    assert abs(masked[has_id].float().mean().item() - 0.4) < 0.015
    assert (alpha[:, 1:] > 0).all()                          # content is never dropped
    assert not (model(id_dropout=0.0)[5][has_id, 0] == 0).any()


# ---------------------------------------------------------------------------- losses and sampler

@FAST
@given(st.integers(0, 10**6), st.integers(1, 40), st.integers(1, 16), st.floats(0.05, 2.0))
def test_info_nce_non_negative_symmetric_and_matches_cross_entropy(seed, B, d, tau):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    loss = mmcpr.info_nce(a, b, tau)
    assert loss.item() >= -1e-5
    assert math.isclose(loss.item(), mmcpr.info_nce(b, a, tau).item(), rel_tol=1e-5, abs_tol=1e-5)
    s = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
    t = torch.arange(B)
    ref = 0.5 * (F.cross_entropy(s, t) + F.cross_entropy(s.T, t))
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize('B', [1, 2, 7, 64])
def test_info_nce_is_log_B_when_all_rows_share_one_embedding(B):
    e = torch.randn(1, 5).expand(B, 5)
    assert math.isclose(mmcpr.info_nce(e, e * 2, 0.3).item(), math.log(B), abs_tol=1e-5)


def test_info_nce_vanishes_for_aligned_orthogonal_pairs_and_has_gradient():
    a = torch.eye(16) * 3
    taus = (1.0, 0.3, 0.1, 0.025)
    losses = [mmcpr.info_nce(a, a * 0.5, tau).item() for tau in taus]
    assert all(x > y for x, y in zip(losses, losses[1:]))
    for tau, loss in zip(taus, losses):                  # each row: -log(e^(1/tau) / (e^(1/tau) + 15))
        assert math.isclose(loss, math.log1p(15 * math.exp(-1 / tau)), rel_tol=1e-5, abs_tol=1e-6)
    a = torch.randn(8, 4, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    mmcpr.info_nce(a, b, 0.2).backward()
    for g in (a.grad, b.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_info_nce_is_finite_at_the_smallest_tau_and_refuses_smaller():
    # positives at cosine -1 are the worst case for the shifted exp: exp(-2 / tau) must not underflow
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert abs(mmcpr.info_nce(a[:1], -a[:1], 0.025).item()) < 1e-4          # one pair: -log(1) = 0
    assert math.isclose(mmcpr.info_nce(a, -a, 0.025).item(), 40 + math.log1p(math.exp(-40)), rel_tol=1e-6)
    with pytest.raises(ValueError, match='tau'):
        mmcpr.info_nce(a, a, 0.02)


@pytest.mark.parametrize('n, group, sizes', [(10, 4, (4, 3, 3)), (10, 10, (10,)), (10, 50, (10,)), (7, 1, (1,) * 7)])
def test_alignment_loss_groups_the_distinct_items(n, group, sizes):
    # all items share one embedding, so a group of m items has InfoNCE log m; duplicates must not count
    z = {'text': torch.ones(n, 3), 'image': torch.ones(n, 3) * 2, 'audio': -torch.ones(n, 3)}
    items = torch.cat([torch.arange(n), torch.arange(n // 2)])
    expect = 3 * sum(m / n * math.log(m) for m in sizes)     # three modality pairs
    assert math.isclose(mmcpr.alignment_loss(z, items, 0.2, group).item(), expect, rel_tol=1e-5, abs_tol=1e-6)


@FAST
@given(st.integers(0, 10**6), st.integers(1, 30), st.integers(1, 40))
def test_alignment_loss_equals_info_nce_on_one_group_and_is_zero_for_one_modality(seed, n, group):
    g = torch.Generator().manual_seed(seed)
    z = {'image': torch.randn(n, 4, generator=g), 'audio': torch.randn(n, 4, generator=g)}
    items = torch.randint(0, n, (2 * n,), generator=g)
    uniq = torch.unique(items)
    loss = mmcpr.alignment_loss(z, items, 0.2, max(group, n))
    assert math.isclose(loss.item(), mmcpr.info_nce(z['image'][uniq], z['audio'][uniq], 0.2).item(),
                        rel_tol=1e-5, abs_tol=1e-6)
    assert mmcpr.alignment_loss(z, items, 0.2, group).item() >= -1e-5
    assert mmcpr.alignment_loss({'image': z['image']}, items, 0.2, group).item() == 0


@FAST
@given(st.integers(0, 10**6), st.integers(1, 50), st.integers(1, 4))
def test_bce_matches_torch(seed, B, n_neg):
    g = torch.Generator().manual_seed(seed)
    # float64: in float32 the two formulas round apart by ~1e-4 relative at large logits
    pos = torch.randn(B, generator=g, dtype=torch.float64) * 5
    neg = torch.randn(B, n_neg, generator=g, dtype=torch.float64) * 5
    ref = F.binary_cross_entropy_with_logits(torch.cat([pos, neg.flatten()]),
                                             torch.cat([torch.ones(B), torch.zeros(B * n_neg)]).double())
    assert math.isclose(mmcpr.bce_loss(pos, neg).item(), ref.item(), rel_tol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 20), st.integers(2, 12), st.integers(1, 5), st.floats(0.0, 0.95))
def test_sample_negatives_never_returns_a_training_positive(seed, n_users, n_items, n_neg, density):
    R = random_R(seed, n_users, n_items, density)
    u, i = R.nonzero()
    keys = np.sort(u.astype(np.int64) * n_items + i)
    if len(keys) == 0:
        return
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, 37)
    neg = mmcpr.sample_negatives(users, keys, n_items, n_neg, rng)
    assert neg.shape == (37, n_neg) and neg.dtype == np.int64
    assert ((neg >= 0) & (neg < n_items)).all()
    assert not R[np.repeat(users, n_neg), neg.ravel()].any()

@FAST
@given(st.integers(0, 10**6), st.integers(2, 30), st.integers(1, 6), st.floats(-100, 100), st.floats(0.01, 50))
def test_prepare_standardises_each_dimension(seed, n, f, offset, scale):
    x = (np.random.default_rng(seed).standard_normal((n, f)) * scale + offset).astype(np.float16)
    x[:, 0] = offset                                                    # a constant column maps to 0
    z = mmcpr.prepare(x)
    assert z.dtype == torch.float32 and z.shape == (n, f)
    assert torch.allclose(z.mean(0), torch.zeros(f), atol=1e-3) and (z[:, 0] == 0).all()
    spread = torch.from_numpy(x.astype(np.float32)).std(0, correction=0) > 1e-2  # not flattened by float16
    assert torch.allclose(z.std(0, correction=0)[spread], torch.ones(int(spread.sum())), atol=1e-3)
    assert torch.equal(mmcpr.prepare(x, standardize=False), torch.from_numpy(x.astype(np.float32)))


@pytest.mark.parametrize('n, value', [(1000, 100.3), (4096, 123.456), (7, -3.1)])
def test_prepare_maps_a_constant_float32_column_to_zero(n, value):
    # float32 rounding leaves such a column a tiny spread, which must not be blown up to unit variance
    x = np.full((n, 2), value, np.float32)
    x[:, 1] = np.arange(n)
    z = mmcpr.prepare(x)
    assert (z[:, 0] == 0).all() and math.isclose(z[:, 1].std(correction=0).item(), 1, rel_tol=1e-4)

# ---------------------------------------------------------------------------- model

def make_model(n_users, n_items, feat_dims, review_dim=None, dim=8, fusion='attention', seed=0):
    R = random_R(seed, n_users, n_items)
    A_user, A_item = mmcpr.build_graphs(R, 3)
    g = torch.Generator().manual_seed(seed)
    feats = {name: torch.randn(n_items, f, generator=g) for name, f in feat_dims.items()}
    review = None if review_dim is None else torch.randn(n_users, review_dim, generator=g)
    torch.manual_seed(seed)
    model = mmcpr.MMCPR(n_users, n_items, mmcpr.to_torch_sparse(A_user), mmcpr.to_torch_sparse(A_item),
                        feats, review, dim=dim, layers=2, fusion=fusion)
    return R, model


def test_one_step_gives_every_parameter_a_gradient():
    R, model = make_model(20, 15, {'text': 6, 'image': 5}, review_dim=4)
    h_u, h_i, _, E_i, _, _ = model()
    z = {'text': E_i[:, 1], 'image': E_i[:, 2]}
    u, i = (torch.from_numpy(x.astype(np.int64)) for x in R.nonzero())
    j = torch.randint(0, 15, (len(u), 1))
    loss = mmcpr.bce_loss((h_u[u] * h_i[i]).sum(-1), (h_u[u].unsqueeze(1) * h_i[j]).sum(-1))
    uniq = torch.unique(i)
    loss = loss + 0.1 * mmcpr.info_nce(z['text'][uniq], z['image'][uniq], 0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
    assert set(model.user_modalities) == {'graph', 'review'}
    assert model.item_modalities == ['graph', 'text', 'image']


def test_model_refuses_a_non_symmetric_adjacency():
    # propagate's backward uses Â for Âᵀ: with the random-walk D^-1 (A+I) its gradient is silently wrong
    R = random_R(0, 12, 9)
    A_user, A_item = mmcpr.build_graphs(R, 3)
    walk = lambda A_hat: (sp.diags(1 / np.asarray((A_hat != 0).sum(1)).ravel()) @ (A_hat != 0)).astype(np.float32)
    x = torch.randn(12, 3, requires_grad=True)
    (g,) = torch.autograd.grad(mmcpr.propagate(mmcpr.to_torch_sparse(walk(A_user)), x, 1).sum(), x)
    (g_true,) = torch.autograd.grad(((x + torch.from_numpy(walk(A_user).toarray()) @ x) / 2).sum(), x)
    assert not torch.allclose(g, g_true, atol=1e-3)
    feats = {'text': torch.randn(9, 4)}
    good_u, good_i = mmcpr.to_torch_sparse(A_user), mmcpr.to_torch_sparse(A_item)
    bump = A_user.toarray()
    bump[0, 1] += 1e-3                                                  # one entry off by far more than rounding
    for user_adj, item_adj, name in [(mmcpr.to_torch_sparse(walk(A_user)), good_i, 'user_adj'),
                                     (good_u, mmcpr.to_torch_sparse(walk(A_item)), 'item_adj'),
                                     (torch.from_numpy(bump), good_i, 'user_adj'),
                                     (good_u, good_i.to_dense()[:, :5], 'item_adj')]:
        with pytest.raises(ValueError, match=name):
            mmcpr.MMCPR(12, 9, user_adj, item_adj, feats, dim=4)
    noisy = A_user.toarray() * (1 + 1e-7 * np.random.default_rng(0).standard_normal((12, 12))).astype(np.float32)
    mmcpr.MMCPR(12, 9, torch.from_numpy(noisy), good_i.to_sparse_coo(), feats, dim=4)  # rounding is fine


def test_model_output_does_not_depend_on_train_or_eval_mode():
    # without modality dropout, the mode changes nothing: there is no other dropout or batch norm
    _, model = make_model(10, 8, {'text': 5, 'image': 3}, review_dim=4)
    assert not any(isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm)) for m in model.modules())
    with torch.no_grad():
        a, b = model.train()(), model.eval()()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@FAST
@given(st.integers(1, 12), st.integers(2, 12), st.lists(st.integers(1, 9), max_size=3),
       st.one_of(st.none(), st.integers(1, 7)), st.integers(1, 10), st.sampled_from(['attention', 'mean']))
def test_output_shapes(n_users, n_items, dims, review_dim, dim, fusion):
    feat_dims = {f'm{k}': f for k, f in enumerate(dims)}
    _, model = make_model(n_users, n_items, feat_dims, review_dim, dim, fusion)
    h_u, h_i, E_u, E_i, alpha_u, alpha_i = model()
    Mu, Mi = 1 + (review_dim is not None), 1 + len(dims)
    assert h_u.shape == (n_users, dim) and h_i.shape == (n_items, dim)
    assert E_u.shape == (n_users, Mu, dim) and E_i.shape == (n_items, Mi, dim)
    assert model.content == list(feat_dims) and torch.equal(E_i[:, 0], model.item_id.weight)
    assert alpha_u.shape == (n_users, Mu) and alpha_i.shape == (n_items, Mi)
    assert torch.allclose(alpha_u.sum(1), torch.ones(n_users)) and torch.allclose(alpha_i.sum(1), torch.ones(n_items))

# ---------------------------------------------------------------------------- pretrain

def tiny(seed=0, n_users=30, n_items=25, mods=('text', 'image'), review=True):
    rng = np.random.default_rng(seed)
    R = random_R(seed, n_users, n_items, 0.2)
    feats = {m: rng.standard_normal((n_items, 6 + k)).astype(np.float16) for k, m in enumerate(mods)}
    user_feat = rng.standard_normal((n_users, 5)).astype(np.float32) if review else None
    return R, feats, user_feat


KEYS = {'user_emb', 'item_emb', 'item_content_emb', 'network', 'modality_weights', 'graph_seconds', 'epoch_seconds', 'losses', 'notes'}


def test_pretrain_is_deterministic_and_returns_documented_keys():
    R, feats, user_feat = tiny()
    lines = []
    kw = dict(dim=8, knn=3, epochs=3, batch=16, seed=7)
    a = mmcpr.pretrain(R, feats, user_feat, log=lines.append, **kw)
    b = mmcpr.pretrain(R, feats, user_feat, log=lambda s: None, **kw)
    c = mmcpr.pretrain(R, feats, user_feat, log=lambda s: None, **{**kw, 'seed': 8})
    assert set(a) == KEYS and a['notes'] == []
    assert a['user_emb'].shape == (30, 8) and a['item_emb'].shape == (25, 8)
    assert a['user_emb'].dtype == np.float32 and a['item_emb'].dtype == np.float32
    assert np.array_equal(a['user_emb'], b['user_emb']) and np.array_equal(a['item_emb'], b['item_emb'])
    assert not np.array_equal(a['item_emb'], c['item_emb'])
    assert a['losses'] == b['losses'] and len(a['losses']) == 3 and len(a['epoch_seconds']) == 3
    assert all(v > 0 for v in a['losses'][0].values())
    assert set(a['modality_weights']['user']) == {'graph', 'review'}
    assert set(a['modality_weights']['item']) == {'graph', 'text', 'image'}
    assert math.isclose(sum(a['modality_weights']['item'].values()), 1, rel_tol=1e-5)
    assert sum(line.startswith('epoch') for line in lines) == 3


def test_pretrain_logs_undirected_edge_counts():
    # user graph: 0-1 (item 1), 0-3 (item 0), 1-2 (item 2); item graph: 0-1 (user 0), 1-2 (user 1)
    R = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]], np.float32))
    lines = []
    mmcpr.pretrain(R, {}, None, dim=4, knn=10, epochs=1, log=lines.append)
    assert lines[0].startswith('graphs: 3 user edges, 2 item edges, ')
    mmcpr.pretrain(R, {}, None, dim=4, knn=10, epochs=1, user_graph=False, log=lines.append)
    assert lines[2].startswith('graphs: 0 user edges, 2 item edges, ')


def test_pretrain_loss_decreases():
    R, feats, user_feat = tiny(1, 40, 30)
    out = mmcpr.pretrain(R, feats, user_feat, dim=16, knn=3, epochs=10, batch=64, lr=1e-2, log=lambda s: None)
    assert out['losses'][-1]['bce'] < out['losses'][0]['bce']
    assert out['losses'][-1]['align'] < out['losses'][0]['align']


def test_alignment_negatives_are_the_distinct_items_of_the_batch():
    # a batch whose positives are all item 0: one distinct item, so InfoNCE has no negatives and is 0
    # (with duplicates kept it would be log(batch), contrasting item 0 with itself)
    _, feats, _ = tiny(4, n_items=5)
    z = {m: mmcpr.projector(f.shape[1], 8)(mmcpr.prepare(f)) for m, f in feats.items()}
    assert abs(mmcpr.alignment_loss(z, torch.zeros(16, dtype=torch.long), 0.2, 4).item()) < 1e-5


@pytest.mark.parametrize('mods, review, expect', [
    ((), False, {'no review features: user side is graph-only', 'no item content modalities: item side is graph-only',
                 'fewer than two item content modalities: no alignment'}),
    (('image',), True, {'fewer than two item content modalities: no alignment'}),
    (('text', 'image', 'audio'), False, {'no review features: user side is graph-only'}),
])
def test_pretrain_notes_degrade(mods, review, expect):
    R, feats, user_feat = tiny(2, mods=mods, review=review)
    out = mmcpr.pretrain(R, feats, user_feat, dim=8, knn=3, epochs=1, batch=32, log=lambda s: None)
    assert set(out['notes']) == expect
    assert list(out['modality_weights']['item']) == ['graph', *mods]
    assert list(out['modality_weights']['user']) == ['graph'] + (['review'] if review else [])
    if len(mods) < 2:
        assert all(l['align'] == 0 for l in out['losses'])


@pytest.mark.parametrize('flags', [dict(user_graph=False), dict(item_graph=False), dict(align=False),
                                   dict(fusion='mean'), dict(neg=3, layers=0)])
def test_pretrain_ablations_run(flags):
    R, feats, user_feat = tiny(3)
    out = mmcpr.pretrain(R, feats, user_feat, dim=8, knn=3, epochs=1, batch=32, log=lambda s: None, **flags)
    assert np.isfinite(out['user_emb']).all() and np.isfinite(out['item_emb']).all()
    assert bool(out['notes']) == bool(set(flags) & {'user_graph', 'item_graph', 'align', 'fusion'})
    if flags.get('align') is False:
        assert out['losses'][0]['align'] == 0
    if flags.get('fusion') == 'mean':
        assert all(math.isclose(w, 1 / 3, rel_tol=1e-6) for w in out['modality_weights']['item'].values())


def test_pretrain_rejects_user_with_every_item():
    R = sp.csr_matrix(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError):
        mmcpr.pretrain(R, {}, None, epochs=1, log=lambda s: None)


def test_module_docstring_ties_every_tuning_flag_to_its_choice_and_carries_no_history():
    params = inspect.signature(mmcpr.pretrain).parameters
    plumbing = {'device', 'seed', 'log', 'checkpoint', 'checkpoint_every', 'stop'}
    flags = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p not in plumbing]
    assert [f for f in flags if f'`{f}`' not in mmcpr.__doc__] == []
    source = Path(mmcpr.__file__).read_text()
    assert not re.search(r'\d(\.\d+)?x (faster|slower)|times (faster|slower)|earlier build|Recall@', source)


def test_pretrain_refuses_a_new_item_with_a_training_pair_and_masks_new_items():
    R, feats, user_feat = tiny()
    R = sp.lil_matrix(R)
    R[:, :2] = 0                                              # items 0 and 1: no pair, new
    R[0, 2] = 1                                               # item 2 has one
    R = R.tocsr()
    kw = dict(dim=8, knn=3, epochs=1, batch=16, log=lambda s: None)
    with pytest.raises(ValueError, match='new item has a training pair'):
        mmcpr.pretrain(R, feats, user_feat, new_items=[1, 2], **kw)
    out = mmcpr.pretrain(R, feats, user_feat, new_items=[0, 1], **kw)
    np.testing.assert_array_equal(out['item_emb'][:2], out['item_content_emb'][:2])  # content alone
    assert not np.allclose(out['item_emb'][2:], out['item_content_emb'][2:])


def test_pretraining_stopped_then_killed_ends_as_an_uninterrupted_one(toy, tmp_path):
    """Modality and ID dropout draw from torch's RNG: its state is in the checkpoint too."""
    d = toy[1]
    R = sp.csr_matrix((np.ones(len(d["train"][0])), d["train"]), shape=(d["n_users"], d["n_items"]))
    kw = dict(epochs=6, batch=64, dim=16, modality_dropout=0.3, id_dropout=0.2, log=quiet)
    want = mmcpr.pretrain(R, d["item_feats"], d["user_feat"], **kw)
    ck = str(tmp_path / "ck.pt")
    with pytest.raises(KeyboardInterrupt):
        mmcpr.pretrain(R, d["item_feats"], d["user_feat"], **kw, checkpoint=ck, stop=stop_once(after=1))
    with pytest.raises(Killed):
        mmcpr.pretrain(R, d["item_feats"], d["user_feat"], **kw, checkpoint=ck, checkpoint_every=0,
                       stop=stop_once(after=2, kill=True))
    assert mmcpr.load_checkpoint(ck)["epoch"] == 4
    assert_same(mmcpr.pretrain(R, d["item_feats"], d["user_feat"], **kw, checkpoint=ck), want,
                timing=("epoch_seconds", "graph_seconds"))

# ---------------------------------------------------------------------------- fine-tuning the network

NET = dict(dim=8, knn=3, layers=2)


@pytest.fixture(scope='module')
def pretrained(toy):
    """(the toy data, pretrain's result, encoder(**lr): a fresh mmcpr.Encoder of the pre-trained network,
    every part frozen but those given a learning rate)."""
    d = toy[1]
    R = sp.csr_matrix((np.ones(len(d['train'][0]), np.float32), d['train']), shape=(d['n_users'], d['n_items']))
    pre = mmcpr.pretrain(R, d['item_feats'], d['user_feat'], epochs=3, batch=64, log=quiet, **NET)

    def encoder(**lr):
        net, _ = mmcpr.network(R, d['item_feats'], d['user_feat'], log=quiet, **NET)
        return mmcpr.Encoder(mmcpr.load_network(net, pre['network']), dict.fromkeys(mmcpr.Encoder.PARTS, 0.0) | lr)
    return d, pre, encoder


def positional(d):
    return d['n_users'], d['n_items'], d['train'], d['valid'], d['test']


def test_the_rebuilt_network_computes_the_handed_over_vectors(pretrained):
    """network + load_network rebuild the pre-trained network from its inputs: its output is
    pretrain's user_emb, item_emb bit for bit, and a fresh network's is not."""
    d, pre, encoder = pretrained
    with torch.no_grad():
        h = encoder(id=1.0)()
    np.testing.assert_array_equal(h.numpy(), np.concatenate([pre['user_emb'], pre['item_emb']]))
    R = sp.csr_matrix((np.ones(len(d['train'][0]), np.float32), d['train']), shape=(d['n_users'], d['n_items']))
    fresh, _ = mmcpr.network(R, d['item_feats'], d['user_feat'], log=quiet, **NET)
    assert not np.allclose(fresh.eval()()[1].detach().numpy(), pre['item_emb'])


@pytest.mark.parametrize('model', ['mf', 'lightgcn'])
def test_a_frozen_network_fine_tunes_as_the_handed_over_vectors(pretrained, model):
    """The network frozen and only the free offset trained: the same start (scale, epoch 0's scores
    bit for bit) and the same training as fine-tuning the vectors, up to float rounding (c + Δ
    against a table that started at c)."""
    d, pre, encoder = pretrained
    kw = dict(model=model, epochs=4, patience=4, batch=64, lr=1e-2, l2=1e-3, ks=(20,), log=quiet)
    vec = recommender.train(*positional(d), user_init=pre['user_emb'], item_init=pre['item_emb'], **kw)
    net = recommender.train(*positional(d), layer0=encoder(free=1e-2), **kw)
    assert net['scale'] == vec['scale'] != 1.0
    assert net['history'][0] == vec['history'][0]
    for a, b in zip(net['history'][1:], vec['history'][1:], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert net['best_epoch'] == vec['best_epoch'] > 0
    np.testing.assert_allclose(net['item_emb'], vec['item_emb'], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net['user_emb'], vec['user_emb'], rtol=1e-4, atol=1e-5)


def test_the_bpr_loss_reaches_the_content_projectors(pretrained):
    """In network mode the recommender's loss trains the content pathway: every parameter of the
    item projectors gets a gradient through LightGCN, the attention and the item graph."""
    d, _, encoder = pretrained
    enc = encoder(id=1e-2, content=1e-2, fusion=1e-2)
    u, i = (torch.as_tensor(a) for a in d['train'])
    net = recommender.LightGCN(d['n_users'], d['n_items'],
                               recommender.bipartite_adjacency(d['n_users'], d['n_items'], u.numpy(), i.numpy()),
                               layer0=enc)
    j = torch.randint(0, d['n_items'], (len(u),), generator=torch.Generator().manual_seed(0))
    e = net()
    recommender.bpr_loss((e[u] * e[d['n_users'] + i]).sum(1), (e[u] * e[d['n_users'] + j]).sum(1)).backward()
    grads = {n: p.grad for n, p in enc.net.item_proj.named_parameters()}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads
    assert enc.free.grad is None                                       # frozen: no gradient computed


@settings(max_examples=10, deadline=None)
@given(st.sets(st.sampled_from(mmcpr.Encoder.PARTS), min_size=1))
def test_fine_tuning_moves_exactly_the_parts_given_a_learning_rate(pretrained, parts):
    d, _, encoder = pretrained
    enc = encoder(**dict.fromkeys(parts, 1e-2))
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    kw = dict(model='lightgcn', epochs=1, patience=1, batch=64, l2=1e-3, ks=(20,), log=quiet)
    r = recommender.train(*positional(d), layer0=enc, **kw)
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    want = {n for part, ps in enc.parts().items() if part in parts
            for n, p in enc.named_parameters() if any(p is q for q in ps)}
    # train hands back the best valid epoch: epoch 1, or the start itself
    assert moved == (want if r['best_epoch'] == 1 else set())
    assert want and all(n.startswith(('net.', 'free')) for n in want)


def test_an_encoder_with_every_part_frozen_is_refused(pretrained):
    with pytest.raises(ValueError, match='every part'):
        pretrained[2]()


def test_network_fine_tuning_stopped_then_killed_ends_as_an_uninterrupted_one(pretrained, tmp_path):
    """The checkpoint holds the network's parameters, the start's scale and Adam's state per part."""
    d, _, encoder = pretrained
    lr = dict(id=1e-2, content=3e-3, fusion=1e-2, free=1e-2)
    kw = dict(model='lightgcn', epochs=10, patience=10, batch=64, l2=1e-3, ks=(20,), log=quiet)
    want = recommender.train(*positional(d), layer0=encoder(**lr), **kw)
    assert want['scale'] != 1.0 and want['best_epoch'] > 0
    ck = str(tmp_path / 'ck.pt')
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 3: checkpoint written
        recommender.train(*positional(d), layer0=encoder(**lr), **kw, checkpoint=ck, checkpoint_every=float('inf'),
                          stop=stop_once(after=2))
    with pytest.raises(Killed):  # every epoch checkpointed, killed after epoch 6 before its checkpoint
        recommender.train(*positional(d), layer0=encoder(**lr), **kw, checkpoint=ck, checkpoint_every=0,
                          stop=stop_once(after=2, kill=True))
    assert recommender.load_checkpoint(ck)['epoch'] == 5
    assert_same(recommender.train(*positional(d), layer0=encoder(**lr), **kw, checkpoint=ck), want)

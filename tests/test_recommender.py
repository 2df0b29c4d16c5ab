"""MF-BPR, LightGCN, the negative sampler and the MMRec-protocol evaluator."""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import recommender as rec  # noqa: E402
import recommender  # noqa: E402
from helpers import Killed, assert_same, quiet, stop_once  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None)


def reference_metrics(user_emb, item_emb, train, target, ks):
    """Per-user loop with a full argsort: the slow, obvious definition."""
    scores = user_emb @ item_emb.T
    out = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg", "precision", "hit")}
    for u in np.unique(target[0]):
        s = scores[u].astype(np.float64).copy()
        s[train[1][train[0] == u]] = -np.inf
        ranking = np.argsort(-s, kind="stable")
        rel = set(target[1][target[0] == u].tolist())
        for k in ks:
            hits = np.array([i in rel for i in ranking[:k]], float)
            dcg = (hits / np.log2(np.arange(len(hits)) + 2)).sum()
            idcg = (1 / np.log2(np.arange(min(len(rel), k)) + 2)).sum()
            out[f"recall@{k}"].append(hits.sum() / len(rel))
            out[f"ndcg@{k}"].append(dcg / idcg)
            out[f"precision@{k}"].append(hits.sum() / k)
            out[f"hit@{k}"].append(float(hits.sum() > 0))
    return {m: float(np.mean(v)) for m, v in out.items()}


@st.composite
def split_data(draw):
    """Random users x items with disjoint train and target pairs; every user has train items."""
    n_users, n_items, d = draw(st.integers(1, 12)), draw(st.integers(2, 30)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    p_train, p_target = draw(st.floats(0, 0.9)), draw(st.floats(0.05, 1))
    is_train = rng.random((n_users, n_items)) < p_train
    is_train[:, 0] = True
    is_target = ~is_train & (rng.random((n_users, n_items)) < p_target)
    is_train[0, 1], is_target[0, 1] = False, True
    return (n_users, n_items, np.nonzero(is_train), np.nonzero(is_target),
            rng.standard_normal((n_users, d)), rng.standard_normal((n_items, d)))


def test_metrics_hand_computed():
    # One dimension: user 0 scores items 5,4,3,2,1; user 1 the reverse.
    item_emb = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    user_emb = torch.tensor([[1.0], [-1.0]])
    train = (np.array([0, 1]), np.array([0, 4]))  # masked: user 0 item 0, user 1 item 4
    target = (np.array([0, 0, 1]), np.array([2, 4, 0]))
    m = rec.Evaluator(5, train, target, ks=(2, 4)).evaluate(user_emb, item_emb)
    # user 0 ranks 1,2,3,4: relevant 2 (rank 1), 4 (rank 3). user 1 ranks 3,2,1,0: relevant 0 (rank 3).
    l2, l3, l5 = math.log2(2), math.log2(3), math.log2(5)
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["precision@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["hit@2"] == pytest.approx(1 / 2)
    assert m["ndcg@2"] == pytest.approx((1 / l3) / (1 / l2 + 1 / l3) / 2)
    assert m["recall@4"] == pytest.approx(1.0)
    assert m["precision@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["ndcg@4"] == pytest.approx(((1 / l3 + 1 / l5) / (1 / l2 + 1 / l3) + (1 / l5) / 1) / 2)
    per_user = rec.Evaluator(5, train, target, ks=(2, 4)).evaluate(user_emb, item_emb, per_user=True)
    np.testing.assert_allclose(per_user["recall@2"], [1 / 2, 0])  # user 0: one of two in the top 2
    np.testing.assert_allclose(per_user["recall@4"], [1, 1])


def test_metrics_over_candidates_hand_computed():
    # The cold-start task ranks the new items only. Items 0..5 score 6,5,4,3,2,1 for user 0;
    # ranked over candidates 1, 2, 4, 5, item 0 (the best) is not among them, and item 2 is masked.
    item_emb = torch.tensor([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    user_emb = torch.tensor([[1.0], [-1.0]])
    train = (np.array([0, 1]), np.array([2, 3]))  # user 1 trained on item 3, which is not ranked
    target = (np.array([0, 0, 1]), np.array([4, 5, 1]))
    m = rec.Evaluator(6, train, target, ks=(1, 2), candidates=np.array([1, 2, 4, 5])).evaluate(user_emb, item_emb)
    # user 0 ranks 1, 4, 5 (2 masked): relevant 4 at rank 1, 5 at rank 2; user 1 ranks 5, 4, 2, 1: 1 at rank 3.
    assert m["recall@1"] == pytest.approx(0.0)
    assert m["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["hit@2"] == pytest.approx(1 / 2)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)) / 2)
    full = rec.Evaluator(6, train, target, ks=(2,)).evaluate(user_emb, item_emb)  # item 0 first, then 1, 3
    assert full["recall@2"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="not among the candidates"):
        rec.Evaluator(6, train, target, candidates=np.array([1, 2, 5]))


@SETTINGS
@given(split_data(), st.integers(0, 2**31 - 1))
def test_evaluator_over_candidates_matches_the_reference_on_the_submatrix(data, seed):
    n_users, n_items, train, target, U, V = data
    keep = np.sort(np.unique(np.concatenate([target[1], np.random.default_rng(seed).choice(n_items, n_items // 2)])))
    col = np.full(n_items, -1)
    col[keep] = np.arange(len(keep))
    tr = col[train[1]] >= 0
    want = reference_metrics(U, V[keep], (train[0][tr], col[train[1][tr]]), (target[0], col[target[1]]), (1, 3))
    got = rec.Evaluator(n_items, train, target, ks=(1, 3), candidates=keep).evaluate(torch.tensor(U), torch.tensor(V))
    assert got == pytest.approx(want)


@SETTINGS
@given(split_data(), st.sampled_from([(1,), (1, 3), (2, 5, 50)]), st.integers(1, 5))
def test_evaluator_matches_reference_and_is_bounded(data, ks, batch):
    n_users, n_items, train, target, ue, ie = data
    got = rec.Evaluator(n_items, train, target, ks=ks, batch=batch).evaluate(
        torch.tensor(ue, dtype=torch.float32), torch.tensor(ie, dtype=torch.float32))
    want = reference_metrics(ue.astype(np.float32), ie.astype(np.float32), train, target, ks)
    assert got.keys() == want.keys()
    for k in got:
        assert 0.0 <= got[k] <= 1.0 + 1e-6
        assert got[k] == pytest.approx(want[k], abs=1e-5), k
    per_user = rec.Evaluator(n_items, train, target, ks=ks, batch=batch).evaluate(
        torch.tensor(ue, dtype=torch.float32), torch.tensor(ie, dtype=torch.float32), per_user=True)
    for k in ks:  # one row per evaluated user, in [0, 1], averaging to the metric
        r = per_user[f"recall@{k}"]
        assert r.shape == (len(np.unique(target[0])),) and ((r >= 0) & (r <= 1 + 1e-9)).all()
        assert r.mean() == pytest.approx(got[f"recall@{k}"], abs=1e-6)  # the total sums float32


def test_paired_gap_hand_computed():
    # d = b - a = 1, 0, 0, -1, 1: mean 1/5; its standard error from the sample variance (n - 1)
    a, b = np.array([0, 1, 0.5, 1, 0]), np.array([1, 1, 0.5, 0, 1])
    d = np.array([1, 0, 0, -1, 1])
    gap, se = rec.paired_gap(a, b)
    assert gap == pytest.approx(0.2)
    assert se == pytest.approx(math.sqrt(((d - 0.2) ** 2).sum() / 4 / 5))  # sqrt(s^2 / n), s^2 with n - 1
    assert rec.paired_gap(a[:1], b[:1]) == (1.0, math.inf)  # one user: no spread to measure


def test_one_se_rule_keeps_the_first_unless_the_best_clears_it_by_a_paired_standard_error():
    # 60 users; per user, the first model finds 30. "clear" finds the same 30 and 2 more: gap 2/60,
    # paired SE sqrt((2 (1 - p)^2 + 58 p^2) / 59 / 60) = 0.023 with p = 2/60. "noisy" loses 4 of them
    # and finds 6 others: the same gap, SE 0.053.
    hits = lambda found: np.isin(np.arange(60), found).astype(float)
    per_user = {"first": hits(range(30)), "clear": hits(range(32)), "noisy": hits(range(4, 36))}
    p = 2 / 60
    se_clear = math.sqrt((2 * (1 - p) ** 2 + 58 * p ** 2) / 59 / 60)
    valid = lambda *names: {n: per_user[n].mean() for n in names}
    assert rec.one_se_rule(valid("first", "clear"), per_user.get) == (
        "clear", dict(challenger="clear", gap=pytest.approx(p), se=pytest.approx(se_clear)))
    name, margin = rec.one_se_rule(valid("first", "noisy"), per_user.get)
    assert name == "first" and margin["challenger"] == "noisy" and margin["se"] > margin["gap"] == pytest.approx(p)
    assert rec.one_se_rule(valid("clear", "first"), per_user.get) == ("clear", None)  # the first is the best
    assert rec.one_se_rule({"a": 0.5, "b": 0.5}, per_user.get) == ("a", None)  # a tie: the first, nothing computed
    # "noisiest" beats "clear" on valid (33/60: loses 4 users, finds 7 others; gap 3/60, SE 0.055):
    # it does not clear the first, and does not hide "clear", which does.
    per_user["noisiest"] = hits(list(range(4, 30)) + list(range(30, 37)))
    calls = []
    counted = lambda name: calls.append(name) or per_user[name]
    assert rec.one_se_rule(valid("first", "noisy", "clear", "noisiest"), counted)[0] == "clear"
    assert calls == ["first", "noisiest", "noisy", "clear"]  # the first evaluated once, challengers best first
    assert rec.one_se_rule(valid("first", "noisiest"), per_user.get)[0] == "first"
    with pytest.raises(ValueError, match="same users"):
        rec.paired_gap(np.zeros(3), np.zeros(4))


@SETTINGS
@given(st.integers(2, 40).flatmap(lambda n: st.tuples(*(st.lists(st.floats(0, 1), min_size=n, max_size=n)
                                                         for _ in range(3)))))
def test_paired_gap_is_antisymmetric_and_blind_to_what_users_share(abc):
    a, b, user = map(np.array, abc)
    gap, se = rec.paired_gap(a, b)
    assert se >= 0 and rec.paired_gap(b, a) == pytest.approx((-gap, se))
    assert rec.paired_gap(a + user, b + user) == pytest.approx((gap, se), abs=1e-12)  # a per-user offset cancels
    assert rec.paired_gap(a, a + 0.25) == pytest.approx((0.25, 0.0), abs=1e-12)  # the same shift for all: no noise
    assert gap == pytest.approx(b.mean() - a.mean())


@SETTINGS
@given(split_data())
def test_ndcg_is_one_when_relevant_items_come_first(data):
    n_users, n_items, train, target, _, _ = data
    # One-hot items; each user scores its relevant items above everything else.
    ie = np.eye(n_items, dtype=np.float32)
    ue = np.zeros((n_users, n_items), np.float32)
    ue[target] = 1.0 + np.random.default_rng(0).random(len(target[0]))
    k = int(np.bincount(target[0]).max())  # a cut-off no larger than the longest list of relevant items
    m = rec.Evaluator(n_items, train, target, ks=(k,)).evaluate(torch.tensor(ue), torch.tensor(ie))
    assert m[f"ndcg@{k}"] == pytest.approx(1.0)
    assert m[f"recall@{k}"] == pytest.approx(1.0)
    # reversed, the relevant items come last among the untrained ones: NDCG@k drops below 1
    worst = rec.Evaluator(n_items, train, target, ks=(k,)).evaluate(torch.tensor(-ue), torch.tensor(ie))
    n_untrained = n_items - np.bincount(train[0], minlength=n_users)[np.unique(target[0])]
    if (n_untrained > k).any():  # some user has more than k items to rank: at least one of theirs falls out
        assert worst[f"ndcg@{k}"] < 1.0


@SETTINGS
@given(split_data(), st.integers(1, 10))
def test_training_items_are_masked(data, k):
    """Scoring every training item highest or lowest must not change any metric."""
    n_users, n_items, train, target, ue, ie = data
    ev = rec.Evaluator(n_items, train, target, ks=(k,))
    results = []
    for boost in (1e4, -1e4):
        offset = np.zeros((n_users, n_items))
        offset[train] = boost  # score(u, i) = ue[u] . ie[i] + offset[u, i]
        u = torch.tensor(np.concatenate([ue, offset], 1), dtype=torch.float32)
        i = torch.tensor(np.concatenate([ie, np.eye(n_items)], 1), dtype=torch.float32)
        results.append(ev.evaluate(u, i))
    assert results[0] == pytest.approx(results[1])


@SETTINGS
@given(st.integers(1, 20), st.integers(2, 25), st.integers(0, 2**31 - 1))
def test_sampler_never_returns_a_training_positive(n_users, n_items, seed):
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < rng.random()
    dense[:, rng.integers(n_items)] = False  # every user has at least one negative
    users, items = np.nonzero(dense)
    keys = np.sort(users * n_items + items)
    query = rng.integers(0, n_users, 500)
    neg = rec.sample_negatives(query, keys, n_items, rng)
    assert neg.shape == query.shape and neg.min() >= 0 and neg.max() < n_items
    assert not dense[query, neg].any()


def test_sampler_is_uniform_over_negatives():
    rng = np.random.default_rng(0)
    n_items = 10
    keys = np.array([0, 3, 7])  # user 0 trained on items 0, 3, 7
    neg = rec.sample_negatives(np.zeros(70000, np.int64), keys, n_items, rng)
    counts = np.bincount(neg, minlength=n_items)
    assert counts[[0, 3, 7]].sum() == 0
    assert np.allclose(counts[[1, 2, 4, 5, 6, 8, 9]] / 70000, 1 / 7, atol=0.01)


def test_bpr_loss_matches_formula_and_prefers_positives():
    pos, neg = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    want = -np.log(1 / (1 + np.exp(-(pos - neg).numpy()))).mean()
    assert rec.bpr_loss(pos, neg).item() == pytest.approx(want, rel=1e-6)
    assert rec.bpr_loss(pos + 1, neg) < rec.bpr_loss(pos, neg)
    assert rec.bpr_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def _toy(seed=0, n_users=40, n_items=30):
    """Two user groups, each liking one half of the items."""
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(n_users), 8)
    half = (np.arange(n_users) % 2)[u]
    i = half * (n_items // 2) + rng.integers(0, n_items // 2, len(u))
    keys = np.unique(u * n_items + i)
    u, i = keys // n_items, keys % n_items
    split = rng.choice(3, len(u), p=[0.7, 0.15, 0.15])
    split[np.unique(u, return_index=True)[1]] = 0  # each user keeps a training pair
    return n_users, n_items, *((u[split == s], i[split == s]) for s in range(3))


def test_train_mf_is_deterministic_and_learns():
    n_users, n_items, train, valid, test = _toy()
    kw = dict(epochs=30, patience=30, batch=64, lr=0.01, log=lambda s: None)
    a = rec.train(n_users, n_items, train, valid, test, seed=3, **kw)
    b = rec.train(n_users, n_items, train, valid, test, seed=3, **kw)
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"]
    np.testing.assert_array_equal(a["user_emb"], b["user_emb"])
    # The two groups are easy: MF must do far better than its random start (epoch 0).
    assert a["history"][0]["epoch"] == 0 and a["best_epoch"] > 0
    assert a["valid"]["recall@10"] > a["history"][0]["valid_recall@10"] + 0.2


def test_train_mf_keeps_a_perfect_initialisation():
    """Epoch 0 is the hand-off: if nothing beats it on valid, it is what comes back."""
    n_users, n_items, train, valid, test = _toy()
    ue = np.zeros((n_users, n_items), np.float32)
    ue[valid] = 1.0
    ie = np.eye(n_items, dtype=np.float32)
    r = rec.train(n_users, n_items, train, valid, test, user_init=ue, item_init=ie,
                     epochs=3, patience=5, log=lambda s: None)
    assert r["best_epoch"] == 0 and r["valid"]["recall@10"] == pytest.approx(1.0)
    # no training triple ranks its positive above its negative in this start, so the BPR fit
    # ends at its floor, s = 1e-3: the start comes back rescaled, its ranking intact
    assert r["scale"] == pytest.approx(1e-3, rel=1e-4)
    np.testing.assert_allclose(r["user_emb"], ue * r["scale"], rtol=1e-6)
    np.testing.assert_allclose(r["item_emb"], ie * r["scale"], rtol=1e-6)


def test_collapsed_embeddings_score_nothing_and_nan_is_an_error():
    """Ties count against the held-out item, so a collapsed model cannot look perfect."""
    train, target = (np.array([0, 1]), np.array([0, 4])), (np.array([0, 0, 1]), np.array([2, 4, 0]))
    ev = rec.Evaluator(5, train, target, ks=(1, 2))
    m = ev.evaluate(torch.zeros(2, 3), torch.zeros(5, 3))
    assert all(v == 0.0 for v in m.values())
    with pytest.raises(FloatingPointError):
        ev.evaluate(torch.full((2, 3), float("nan")), torch.zeros(5, 3))


def test_finite_embeddings_with_overflowing_scores_are_an_error():
    """1e20 * 1e20 overflows float32 to inf and inf - inf gives NaN scores, which compare
    false with everything: unguarded, the held-out item ranked first (recall@1 = 1)."""
    train, target = (np.array([0, 1]), np.array([0, 4])), (np.array([0, 0, 1]), np.array([2, 4, 0]))
    ev = rec.Evaluator(5, train, target, ks=(1,))
    user = torch.tensor([[1e20, -1e20], [1e20, -1e20]])
    item = torch.tensor([[1e20, 1e20]] * 5)
    assert torch.isfinite(user).all() and torch.isnan(user @ item.T).all()
    with pytest.raises(FloatingPointError, match="non-finite scores"):
        ev.evaluate(user, item)
    ev.evaluate(user * 1e-3, item * 1e-3)  # large but finite scores are fine


def test_sampler_keys_do_not_overflow_int32_ids():
    """user * n_items = 2.8e9 overflows int32: the sampler must compute keys in int64."""
    n_items, user = 40_000, 70_000
    items = np.delete(np.arange(n_items), 123)  # the user trained on every item but 123
    keys = np.sort(np.int64(user) * n_items + items)
    neg = rec.sample_negatives(np.full(50, user, np.int32), keys, n_items, np.random.default_rng(0))
    assert (neg == 123).all()


def dense_adjacency(n_users, n_items, users, items):
    A = np.zeros((n_users + n_items,) * 2)
    A[users, n_users + items] = A[n_users + items, users] = 1
    d = A.sum(1)
    inv = np.where(d > 0, d, 1) ** -0.5 * (d > 0)
    return inv[:, None] * A * inv[None, :]


@SETTINGS
@given(split_data())
def test_bipartite_adjacency_is_symmetric_normalised_with_spectrum_in_unit_interval(data):
    n_users, n_items, train, _, _, _ = data
    u, i = np.concatenate([train[0], train[0][:3]]), np.concatenate([train[1], train[1][:3]])  # duplicates count once
    A = rec.bipartite_adjacency(n_users, n_items, u, i).to_dense().double().numpy()
    np.testing.assert_allclose(A, dense_adjacency(n_users, n_items, *train), atol=1e-6)
    np.testing.assert_array_equal(A, A.T)
    assert np.abs(np.linalg.eigvalsh(A)).max() <= 1 + 1e-6


@SETTINGS
@given(split_data(), st.integers(0, 3))
def test_lightgcn_is_the_layer_mean_of_propagations_and_permutation_equivariant(data, layers):
    n_users, n_items, train, _, ue, ie = data
    adj = rec.bipartite_adjacency(n_users, n_items, *train)
    net = rec.LightGCN(n_users, n_items, adj, layers, ue.shape[1], ue, ie)
    A, E = dense_adjacency(n_users, n_items, *train), np.concatenate([ue, ie]).astype(np.float32)
    want = sum(np.linalg.matrix_power(A, k) @ E for k in range(layers + 1)) / (layers + 1)
    np.testing.assert_allclose(net().detach().numpy(), want, atol=1e-4)
    # relabel users and items: the final embeddings are relabelled the same way
    pu, pi = np.random.default_rng(0).permutation(n_users), np.random.default_rng(1).permutation(n_items)
    inv_u, inv_i = np.argsort(pu), np.argsort(pi)
    net_p = rec.LightGCN(n_users, n_items, rec.bipartite_adjacency(n_users, n_items, inv_u[train[0]], inv_i[train[1]]),
                         layers, ue.shape[1], ue[pu], ie[pi])
    u_p, i_p = net_p.embeddings()
    u, i = net.embeddings()
    np.testing.assert_allclose(u_p.numpy(), u.numpy()[pu], atol=1e-5)
    np.testing.assert_allclose(i_p.numpy(), i.numpy()[pi], atol=1e-5)


def test_lightgcn_backward_matches_dense_and_refuses_an_asymmetric_matrix():
    n_users, n_items, train, _, _ = _toy()
    adj = rec.bipartite_adjacency(n_users, n_items, *train)
    net = rec.LightGCN(n_users, n_items, adj, 2, 4)
    w = torch.randn(n_users + n_items, 4)
    (net() * w).sum().backward()
    A = torch.tensor(dense_adjacency(n_users, n_items, *train), dtype=torch.float32)
    ego = net.layer0.weight.detach().clone().requires_grad_()
    ((ego + A @ ego + A @ (A @ ego)) / 3 * w).sum().backward()
    torch.testing.assert_close(net.layer0.weight.grad, ego.grad, atol=1e-5, rtol=1e-4)
    B = A.clone()
    B[0, n_users] += 0.5
    with pytest.raises(ValueError, match="symmetric"):
        rec.LightGCN(n_users, n_items, B.to_sparse_csr(), 2, 4)


@SETTINGS
@given(st.integers(2, 25), st.integers(1, 6), st.integers(2, 8), st.booleans(), st.integers(0, 2**31 - 1))
def test_knn_adjacency_averages_the_k_nearest_items_by_content(n, k, f, pooled, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, f))
    items = np.sort(rng.choice(n, rng.integers(1, n + 1), replace=False)) if pooled else None
    A, At = (m.to_dense().numpy() for m in rec.knn_adjacency(x, k, items, batch=3))
    np.testing.assert_array_equal(At, A.T)
    pool = np.arange(n) if items is None else items
    new = np.setdiff1d(np.arange(n), pool)
    assert not A[new].any() and not A[:, new].any()  # outside the catalogue: no edge at all
    assert ((A[pool] > 0).sum(1) == min(k, len(pool))).all()
    np.testing.assert_allclose(A[pool].sum(1), 1, rtol=1e-6)  # each row a mean of its neighbours
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    S = (xn @ xn.T)[np.ix_(pool, pool)]
    nb = A[np.ix_(pool, pool)] > 0
    assert (np.where(nb, S, np.inf).min(1) >= np.where(nb, -np.inf, S).max(1) - 1e-5).all()  # nearest first


def _view(n_modalities, dim=4, seed=0):
    n_users, n_items, train, _, _ = _toy(seed)
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((n_items, 3 + m)) for m in range(n_modalities)]
    adj = rec.bipartite_adjacency(n_users, n_items, *train)
    torch.manual_seed(seed)
    return n_users, n_items, train, rec.ContentView(feats, adj, n_users, dim, knn=3)


def test_content_view_is_mgcns_by_hand_and_users_see_it_through_the_user_item_graph():
    """One modality: the attention has one choice and the modality no part of its own, so the
    side is half the view: items A (e ⊙ σ(W_g W f)) / 2, users R̂ times that."""
    n_users, n_items, train, view = _view(1)
    ego, h = torch.randn(n_users + n_items, 4), torch.randn(n_users + n_items, 4)
    side = view(ego[n_users:], h).detach()
    A = view.graphs[0][0].to_dense()
    gate = view.gate[0](view.project[0](view.feat[0])).detach()
    torch.testing.assert_close(side[n_users:], A @ (ego[n_users:] * gate) / 2)
    R = torch.tensor(dense_adjacency(n_users, n_items, *train)[:n_users, n_users:], dtype=torch.float32)
    torch.testing.assert_close(side[:n_users], R @ side[n_users:])


def test_content_view_trains_every_part_and_its_infonce_is_bounded():
    n_users, n_items, _, view = _view(2)
    net = rec.LightGCN(n_users, n_items, view.adj, 2, 4, view=view)
    final, h, side = net.final(net.layer0())
    torch.testing.assert_close(final, h + side)
    torch.testing.assert_close(net(), final)
    nodes = torch.tensor([[0, 1, 2, 3, 1], [n_users, n_users + 4, n_users + 7, n_users + 2, n_users + 9]])
    view.nce = 1.0
    nce = view.contrast(side, h, nodes)
    assert 0 <= nce.item() <= 2 * (math.log(5) + 2 / view.tau)  # each group: >= 0, <= log B + 2/tau
    ((final * torch.randn_like(final)).sum() + nce).backward()
    for name, p in net.named_parameters():  # IDs, features, projectors, gates, preferences, attention
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 8), st.integers(0, 2**31 - 1))
def test_content_view_infonce_is_mgcns_over_the_batch_with_its_repeats(n_users, n_items, repeats, seed):
    """Each group (users, items) scores MGCN's mean_p [log Σ_q exp(cos(s_p, h_q)/τ) - cos(s_p, h_p)/τ]
    over the batch's positions p, q, a node drawn twice being two rows: contrast() computes
    it on the distinct nodes."""
    rng = np.random.default_rng(seed)
    side, h = rng.standard_normal((2, n_users + n_items, 3))
    groups = [np.arange(n_users), n_users + np.arange(n_items)]
    B = max(n_users, n_items) + repeats  # each node drawn once, then B - len(g) repeats at random
    drawn = np.stack([rng.permutation(np.r_[g, rng.choice(g, B - len(g))]) for g in groups])
    view = _view(1)[3]
    view.nce = 0.5

    def info_nce(p):  # p [B]: node ids, repeats and all
        s, t = (x[p] / np.linalg.norm(x[p], axis=1, keepdims=True) for x in (side, h))
        logits = s @ t.T / view.tau
        return np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))

    got = view.contrast(*(torch.tensor(x, dtype=torch.float32) for x in (side, h)), torch.tensor(drawn))
    np.testing.assert_allclose(got.item(), 0.5 * sum(info_nce(p) for p in drawn), rtol=1e-5, atol=1e-6)


def test_spmm_backward_is_the_transpose_product():
    A = torch.randn(5, 4).relu()
    X = torch.randn(4, 3, requires_grad=True)
    W = torch.randn(5, 3)
    (rec.SpMM.apply(A.to_sparse_csr(), A.T.to_sparse_csr(), X) * W).sum().backward()
    torch.testing.assert_close(X.grad, A.T @ W)


def test_a_content_view_trains_learns_and_leaves_its_features_untouched(toy):
    d = toy[1]
    feats = [d["item_feats"][m] for m in sorted(d["item_feats"])]
    before = [f.copy() for f in feats]
    pos = (d["n_users"], d["n_items"], d["train"], d["valid"], d["test"])
    kw = dict(model="lightgcn", epochs=8, patience=8, batch=64, lr=1e-2, ks=(20,), log=quiet)
    r = recommender.train(*pos, **kw, content=feats)
    assert r["history"][-1]["loss"] < r["history"][1]["loss"]
    assert all(np.array_equal(a, b) for a, b in zip(feats, before))  # its trainable tables are copies
    plain = recommender.train(*pos, **kw)
    assert not np.allclose(plain["item_emb"], r["item_emb"])


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_early_stopping_restores_the_best_epoch(monkeypatch, model):
    """Valid Recall@20 scripted as 0.1, 0.2, 0.5, 0.3, 0.4, 0.45: with patience 3 training stops
    at epoch 5 and hands back the embeddings of epoch 2, whose test is then measured."""
    n_users, n_items, train, valid, test = _toy()
    script, seen = iter([0.1, 0.2, 0.5, 0.3, 0.4, 0.45, 0.9]), []

    def fake_evaluate(self, user_emb, item_emb):
        seen.append((user_emb.clone(), item_emb.clone()))
        return {"recall@20": next(script, -1.0) if len(seen) <= 6 else -1.0}

    monkeypatch.setattr(rec.Evaluator, "evaluate", fake_evaluate)
    r = rec.train(n_users, n_items, train, valid, test, model=model, epochs=50, patience=3, lr=0.05, batch=64,
                  log=lambda s: None)
    assert r["best_epoch"] == 2 and r["valid"]["recall@20"] == 0.5
    assert len(r["history"]) == 6  # epochs 0..5, then stop: 5 - 2 >= 3
    np.testing.assert_array_equal(r["user_emb"], seen[2][0].numpy())  # the test call scored epoch 2's embeddings
    np.testing.assert_array_equal(seen[-1][1].numpy(), seen[2][1].numpy())
    assert not np.array_equal(seen[5][0].numpy(), seen[2][0].numpy())  # training did move them


def test_train_lightgcn_is_deterministic_learns_and_keeps_its_start():
    n_users, n_items, train, valid, test = _toy()
    kw = dict(model="lightgcn", epochs=30, patience=30, batch=64, lr=0.01, log=lambda s: None)
    a = rec.train(n_users, n_items, train, valid, test, seed=3, **kw)
    b = rec.train(n_users, n_items, train, valid, test, seed=3, **kw)
    assert a["test"] == b["test"] and a["best_epoch"] == b["best_epoch"] > 0
    np.testing.assert_array_equal(a["item_emb"], b["item_emb"])
    assert a["valid"]["recall@10"] > a["history"][0]["valid_recall@10"] + 0.2
    # epoch 0 is the start itself: frozen by lr 0, nothing beats it and it is handed back
    r = rec.train(n_users, n_items, train, valid, test, user_init=a["user_emb"], item_init=a["item_emb"],
                  **(kw | dict(lr=0.0, epochs=3)))
    assert r["best_epoch"] == 0 and len(r["history"]) == 4
    assert r["valid"] == pytest.approx({k[6:]: v for k, v in r["history"][0].items() if k.startswith("valid_")})


def test_train_mf_refuses_a_user_with_every_item():
    train = (np.array([0, 0, 1]), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="every item"):
        rec.train(2, 2, train, (np.array([1]), np.array([1])), (np.array([1]), np.array([1])), epochs=1)


def _bpr(net, node):
    u, i, j = torch.nn.functional.embedding(node, net())
    return rec.bpr_loss((u * i).sum(1), (u * j).sum(1)).item()


@SETTINGS
@given(split_data(), st.sampled_from(["mf", "lightgcn"]), st.floats(0.01, 100))
def test_fit_scale_minimises_the_bpr_loss_and_is_scale_equivariant(data, model, c):
    n_users, n_items, train, _, ue, ie = data
    ue, ie = ue.astype(np.float32), ie.astype(np.float32)
    make = lambda k: (rec.MF(n_users, n_items, ue.shape[1], ue * k, ie * k) if model == "mf" else
                      rec.LightGCN(n_users, n_items, rec.bipartite_adjacency(n_users, n_items, *train), 2,
                                   ue.shape[1], ue * k, ie * k))
    rng = np.random.default_rng(0)
    node = torch.as_tensor(np.stack([train[0], train[1] + n_users, rng.integers(0, n_items, len(train[0])) + n_users]))
    s = rec.fit_scale(make(1.0), node)
    u, i, j = torch.nn.functional.embedding(node, make(1.0)().detach().double())
    x = (u * i).sum(1) - (u * j).sum(1)
    if (x >= 0).all():  # no positive below its negative: no finite optimum, the start is kept
        assert s == 1.0
        return
    assert s > 0
    best = _bpr(make(s), node)
    for f in (0.8, 1.25):
        if 1e-6 <= (s * f) ** 2 <= 1e6:  # the searched interval of q = s²: at its edge the fit stops there
            assert best <= _bpr(make(s * f), node) + 1e-6
    q = s * s  # searched in [1e-6, 1e6]; inside, the fit is equivariant: a start c times larger gets s / c
    assume(1e-5 < q * min(1, c ** -2) and q * max(1, c ** -2) < 1e5)
    assert rec.fit_scale(make(c), node) == pytest.approx(s / c, rel=1e-3)


def test_fit_scale_keeps_a_start_with_no_positive_below_its_negative():
    """x = s_ui - s_uj = [0, 1]: the BPR loss falls as the scale grows, with no finite optimum."""
    net = rec.MF(1, 3, 1, np.array([[1.0]], np.float32), np.array([[1.0], [1.0], [0.0]], np.float32))
    node = torch.tensor([[0, 0], [1, 1], [2, 3]])  # (u, i, j): (0, 0, 1) ties, (0, 0, 2) is ranked right
    assert rec.fit_scale(net, node) == 1.0


def test_rescaled_start_ranks_as_before():
    """Rescaling moves the start to the scale BPR wants without changing its ranking."""
    n_users, n_items, train, valid, test = _toy()
    rng = np.random.default_rng(1)
    ue, ie = (rng.standard_normal((n, 8)).astype(np.float32) * 10 for n in (n_users, n_items))
    kw = dict(model="lightgcn", user_init=ue, item_init=ie, epochs=1, log=lambda s: None)
    a = rec.train(n_users, n_items, train, valid, test, rescale=True, **kw)
    b = rec.train(n_users, n_items, train, valid, test, rescale=False, **kw)
    assert 0 < a["scale"] < 1 and b["scale"] is None  # ten times Gaussian is far too confident for BPR
    assert a["history"][0] == pytest.approx(b["history"][0])


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_l2_acts_on_the_batch_layer0_embeddings(model):
    """One full-batch epoch at lr 0: the logged loss grows by exactly
    l2 * sum over triples of |e_u^0|^2 + |e_i^0|^2 + |e_j^0|^2 / B, on layer 0, not the propagated embeddings."""
    n_users, n_items, train, valid, test = _toy()
    rng = np.random.default_rng(0)
    ue, ie = (rng.standard_normal((n, 4)).astype(np.float32) for n in (n_users, n_items))
    kw = dict(model=model, user_init=ue, item_init=ie, rescale=False, lr=0.0, epochs=1, batch=len(train[0]),
              log=lambda s: None, seed=5)
    base = rec.train(n_users, n_items, train, valid, test, l2=0.0, **kw)["history"][1]["loss"]
    with_l2 = rec.train(n_users, n_items, train, valid, test, l2=0.5, **kw)["history"][1]["loss"]
    # the same seed draws the same negatives: redraw them here to compute the penalty by hand
    users, items = train
    keys = np.unique(users.astype(np.int64) * n_items + items)
    perm_rng = np.random.default_rng(5)
    perm_rng.permutation(len(users))
    neg = rec.sample_negatives(users, keys, n_items, perm_rng)
    sq = (ue[users] ** 2).sum(1) + (ie[items] ** 2).sum(1) + (ie[neg] ** 2).sum(1)
    assert with_l2 - base == pytest.approx(0.5 * sq.mean(), rel=1e-4)


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_items_outside_the_catalogue_are_never_negatives_nor_ranked(model):
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 65
    pool = np.arange(60)  # items 60..64 are new: no pair, not in the pool
    group = np.arange(n_users) % 2  # group 0 likes items 0..29, group 1 items 30..59: train on 10, hold out 5
    liked = np.stack([rng.permutation(30) + 30 * g for g in group])
    train = (np.repeat(np.arange(n_users), 10), liked[:, :10].ravel())
    target = (np.repeat(np.arange(n_users), 5), liked[:, 10:15].ravel())
    init = rng.standard_normal((n_items, 8)).astype(np.float32)
    r = rec.train(n_users, n_items, train, target, target, model=model, epochs=5, patience=10, lr=3e-2, items=pool,
                  user_init=rng.standard_normal((n_users, 8)).astype(np.float32), item_init=init, rescale=False,
                  log=lambda s: None)
    assert r["best_epoch"] > 0
    scale = 1 if model == "mf" else 1 / 3  # a LightGCN item without edges: its layer 0 averaged with zeros
    np.testing.assert_allclose(r["item_emb"][60:], init[60:] * scale, rtol=1e-6)  # no gradient ever reached them
    # not ranked: valid is the pool's ranking, whatever the new items score, even at the top of every list
    ue, ie = r["user_emb"], r["item_emb"].copy()
    ie[60:] = 100 * ue.mean(0) / np.linalg.norm(ue.mean(0))
    ev = lambda **kw: rec.Evaluator(n_items, train, target, **kw).evaluate(torch.tensor(ue), torch.tensor(ie))
    assert ev(candidates=pool) == pytest.approx(r["valid"])
    assert ev()["recall@10"] < r["valid"]["recall@10"]
    keys = np.unique(train[0] * n_items + train[1])
    negs = rec.sample_negatives(np.repeat(np.arange(n_users), 50), keys, n_items, rng, pool)
    assert np.isin(negs, pool).all()


def test_recommend_by_hand():
    """Scores u0: [4, 3, 2, 1], u1: [1, 2, 3, 4]. u0 knows item 0; u1 knows items 3, 2, 1."""
    users = torch.tensor([[1.0], [-1.0]])
    items = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    known = (np.array([0, 1, 1, 1]), np.array([0, 3, 2, 1]))
    top, scores = rec.recommend(users, items, np.array([0, 1]), known, k=2)
    assert top.tolist() == [[1, 2], [0, -1]]  # u1 has one unseen item left: the rest is -1
    assert scores.tolist() == [[3.0, 2.0], [-4.0, -np.inf]]
    top, _ = rec.recommend(users, items, np.array([1]), known, k=2, candidates=np.array([0, 3]))  # items 0, 3 only
    assert top.tolist() == [[0, -1]]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 15), st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_recommend_is_the_brute_force_top_k_of_unseen_items(n_users, n_items, k, batch, seed):
    rng = np.random.default_rng(seed)
    U, I = torch.randn(n_users, 3, generator=torch.Generator().manual_seed(seed)), torch.randn(n_items, 3)
    known = np.divmod(rng.choice(n_users * n_items, rng.integers(0, n_users * n_items + 1), replace=False), n_items)
    users = rng.permutation(n_users)[:rng.integers(1, n_users + 1)]
    top, scores = rec.recommend(U, I, users, known, k, batch=batch)
    seen = set(zip(*known))
    for row, u in enumerate(users):
        unseen = [i for i in range(n_items) if (u, i) not in seen]
        want = sorted(unseen, key=lambda i: -(U[u] @ I[i]).item())[:k]
        got = [i for i in top[row] if i >= 0]
        assert len(got) == min(k, len(unseen)) and not seen & {(u, i) for i in got}
        assert scores[row][:len(got)].tolist() == pytest.approx([(U[u] @ I[i]).item() for i in want], rel=1e-5)


@pytest.mark.parametrize("model", ["mf", "lightgcn", "lightgcn+view"])
def test_fine_tuning_stopped_then_killed_ends_as_an_uninterrupted_one(toy, tmp_path, model):
    d = toy[1]
    rng = np.random.default_rng(1)
    pos = (d["n_users"], d["n_items"], d["train"], d["valid"], d["test"])
    # from a given start, rescaled (fit_scale) before epoch 1: a resumed training must not redo that
    kw = dict(model=model.removesuffix("+view"), epochs=12, patience=12, batch=64, lr=1e-2, l2=1e-3, ks=(20,),
              log=quiet, user_init=rng.standard_normal((d["n_users"], 8)),
              item_init=rng.standard_normal((d["n_items"], 8)),
              content=list(d["item_feats"].values()) if model.endswith("+view") else None)
    want = recommender.train(*pos, **kw)
    ck = str(tmp_path / "ck.pt")
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 3: checkpoint written
        recommender.train(*pos, **kw, checkpoint=ck, checkpoint_every=float("inf"), stop=stop_once(after=2))
    with pytest.raises(Killed):  # every epoch checkpointed, killed after epoch 7 before its checkpoint
        recommender.train(*pos, **kw, checkpoint=ck, checkpoint_every=0, stop=stop_once(after=3, kill=True))
    assert recommender.load_checkpoint(ck)["epoch"] == 6
    assert_same(recommender.train(*pos, **kw, checkpoint=ck), want)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_an_unreadable_checkpoint_is_one_line_and_a_fresh_start(toy, tmp_path, damage):
    d = toy[1]
    pos = (d["n_users"], d["n_items"], d["train"], d["valid"], d["test"])
    kw = dict(model="lightgcn", epochs=6, patience=6, ks=(20,), log=quiet)
    want = recommender.train(*pos, **kw)
    ck = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        recommender.train(*pos, **kw, checkpoint=str(ck), stop=stop_once(after=2))
    data = ck.read_bytes()
    ck.write_bytes(data[:len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    lines = []
    assert_same(recommender.train(*pos, **{**kw, "log": lines.append}, checkpoint=str(ck)), want)
    assert len([line for line in lines if "unreadable" in line]) == 1
    assert not any("resumed" in line for line in lines)

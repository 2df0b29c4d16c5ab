"""MF-BPR, the negative sampler and the MMRec-protocol evaluator."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import recommender as rec  # noqa: E402

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


@SETTINGS
@given(split_data())
def test_ndcg_is_one_when_relevant_items_come_first(data):
    n_users, n_items, train, target, _, _ = data
    # One-hot items; each user scores its relevant items above everything else.
    ie = np.eye(n_items, dtype=np.float32)
    ue = np.zeros((n_users, n_items), np.float32)
    ue[target] = 1.0 + np.random.default_rng(0).random(len(target[0]))
    m = rec.Evaluator(n_items, train, target, ks=(n_items,)).evaluate(torch.tensor(ue), torch.tensor(ie))
    assert m[f"ndcg@{n_items}"] == pytest.approx(1.0)
    assert m[f"recall@{n_items}"] == pytest.approx(1.0)


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
    a = rec.train_mf(n_users, n_items, train, valid, test, seed=3, **kw)
    b = rec.train_mf(n_users, n_items, train, valid, test, seed=3, **kw)
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
    r = rec.train_mf(n_users, n_items, train, valid, test, user_init=ue, item_init=ie,
                     epochs=3, patience=5, log=lambda s: None)
    assert r["best_epoch"] == 0 and r["valid"]["recall@10"] == pytest.approx(1.0)
    np.testing.assert_array_equal(r["user_emb"], ue)
    np.testing.assert_array_equal(r["item_emb"], ie)


def test_collapsed_embeddings_score_nothing_and_nan_is_an_error():
    """Ties count against the held-out item, so a collapsed model cannot look perfect."""
    train, target = (np.array([0, 1]), np.array([0, 4])), (np.array([0, 0, 1]), np.array([2, 4, 0]))
    ev = rec.Evaluator(5, train, target, ks=(1, 2))
    m = ev.evaluate(torch.zeros(2, 3), torch.zeros(5, 3))
    assert all(v == 0.0 for v in m.values())
    with pytest.raises(FloatingPointError):
        ev.evaluate(torch.full((2, 3), float("nan")), torch.zeros(5, 3))


def test_train_mf_refuses_a_user_with_every_item():
    train = (np.array([0, 0, 1]), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="every item"):
        rec.train_mf(2, 2, train, (np.array([1]), np.array([1])), (np.array([1]), np.array([1])), epochs=1)

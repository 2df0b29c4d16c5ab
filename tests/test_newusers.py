"""New users (newusers.py, data.py's cold_users split, run.py --cold-users, --serve --new-users):
the method by hand and against LightGCN itself, the split, the metrics entry, serving that
reproduces it, and bad input."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import load, make_dataset, read_tsv, run
import data as dataset  # noqa: E402  (helpers puts the root on sys.path)
import newusers  # noqa: E402
import recommender as rec  # noqa: E402

TRAIN = ["--device", "cpu", "--epochs", "6", "--pretrain-epochs", "2", "--l2", "1e-2", "--batch", "256",
         "--pretrain-batch", "256"]


def test_propagation_by_hand():
    """Two trained users, two items, two layers: u0 gave i0 and i1, u1 gave i1."""
    ego = np.array([[1, 0], [0, 1], [2, 0], [0, 2]], np.float32)  # u0, u1, i0, i1
    G = newusers.propagation_items(ego, 2, (np.array([0, 0, 1]), np.array([0, 1, 1])), layers=2)
    # layer 1 of the items on the trained graph: i0 = u0 / sqrt(1 * 2), i1 = u0 / sqrt(2 * 2) + u1 / sqrt(2 * 1)
    i0_1, i1_1 = np.array([1 / np.sqrt(2), 0]), np.array([0.5, 1 / np.sqrt(2)])
    want = np.array([(np.array([2, 0]) + i0_1) / np.sqrt(1 + 1) / 3,  # (layer 0 + layer 1) / sqrt(d_i + 1) / (K + 1)
                     (np.array([0, 2]) + i1_1) / np.sqrt(2 + 1) / 3])
    np.testing.assert_allclose(G, want, rtol=1e-6)
    np.testing.assert_allclose(G[0], [0.638071, 0], rtol=1e-5)  # the numbers, worked out on paper
    np.testing.assert_allclose(G[1], [0.096225, 0.520981], rtol=1e-5)
    v = newusers.user_vectors((np.array([0, 0]), np.array([0, 1])), 1, G)  # a new user who gave both
    p = (G[0] + G[1]) / np.sqrt(2)
    np.testing.assert_allclose(v[0].numpy(), p / np.linalg.norm(p), rtol=1e-6)
    mf = newusers.propagation_items(ego, 2, (np.array([0, 0, 1]), np.array([0, 1, 1])), layers=0)
    np.testing.assert_allclose(mf, ego[2:] / np.sqrt([[2], [3]]), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 12), st.integers(3, 10))
def test_one_layer_is_lightgcn_with_the_new_user_in_the_graph(seed, n_users, n_items):
    """One layer: a new user's p is exactly the final embedding LightGCN gives them once they join
    the graph with a zero layer 0, the items as trained (their degrees counting the new user)."""
    rng = np.random.default_rng(seed)
    pairs = np.argwhere(rng.random((n_users, n_items)) < 0.4)
    hist = np.flatnonzero(rng.random(n_items) < 0.5)
    if len(hist) == 0:
        hist = np.array([0])
    ego = rng.standard_normal((n_users + n_items, 4)).astype(np.float32)
    G = newusers.propagation_items(ego, n_users, (pairs[:, 0], pairs[:, 1]), layers=1)
    p = (G[hist].sum(0) / np.sqrt(len(hist)))
    u = np.r_[pairs[:, 0], np.full(len(hist), n_users)]  # the new user is row n_users
    i = np.r_[pairs[:, 1], hist]
    adj = rec.bipartite_adjacency(n_users + 1, n_items, u, i)
    ego1 = np.insert(ego, n_users, 0.0, axis=0)
    net = rec.LightGCN(n_users + 1, n_items, adj, layers=1, dim=4, user_init=ego1[:n_users + 1],
                       item_init=ego1[n_users + 1:])
    np.testing.assert_allclose(net.embeddings()[0][n_users].numpy(), p, rtol=1e-4, atol=1e-5)
    # and the vectors do not depend on the order or repeats of the history's rows
    rows = np.zeros(2 * len(hist), np.int64)
    items = np.r_[hist, hist][rng.permutation(2 * len(hist))]
    np.testing.assert_allclose(newusers.user_vectors((rows, items), 1, G)[0].numpy(), p / np.linalg.norm(p),
                               rtol=1e-5, atol=1e-6)


def test_neighbours_weigh_trained_users_by_items_in_common():
    user_emb = np.array([[1, 0], [0, 1], [5, 5], [3, 3]], np.float32)
    train = (np.array([0, 0, 1, 2, 3]), np.array([0, 1, 1, 3, 3]))  # item 2: nobody's
    hist = (np.array([0, 0, 1]), np.array([0, 1, 2]))  # new user 0 gave items 0, 1; new user 1 item 2
    N = newusers.neighbours(hist, 2, user_emb, train, 4, knn=2)
    np.testing.assert_allclose(N[0].numpy(), (2 * user_emb[0] + 1 * user_emb[1]) / 3)  # u0 shares 2, u1 one
    np.testing.assert_array_equal(N[1].numpy(), [0, 0])  # no item in common with anyone
    v = newusers.user_vectors(hist, 2, np.eye(4, 2, dtype=np.float32), 2.0, user_emb, train, knn=2)
    p = np.array([1, 1]) / np.sqrt(2)
    np.testing.assert_allclose(v[0].numpy(), p / np.linalg.norm(p) + 2 * N[0].numpy() / np.linalg.norm(N[0].numpy()),
                               rtol=1e-6)


def test_anchors_and_the_item_to_item_term_by_hand():
    """Popularity ranks by training count; ItemKNN by the summed cosine to the history; alpha damps
    popular items: c_ij / (c_i c_j)^(alpha / 2)."""
    train = (np.array([0, 0, 1, 1, 2, 3, 3]), np.array([0, 1, 0, 1, 2, 1, 3]))  # c: 2, 3, 1, 1 (item 4: none)
    hist = (np.array([0]), np.array([1]))
    K = newusers.item_knn(hist, 1, train, 5, 1.0)
    np.testing.assert_allclose(K[0].numpy(), [2 / np.sqrt(6), 3 / 3, 0, 1 / np.sqrt(3), 0], rtol=1e-6)
    K = newusers.item_knn(hist, 1, train, 5, 0.0)  # raw counts
    np.testing.assert_array_equal(K[0].numpy(), [2, 3, 0, 1, 0])
    K = newusers.item_knn(hist, 1, train, 5, 0.5)
    np.testing.assert_allclose(K[0].numpy(), [2 / 6 ** 0.25, 3 / 9 ** 0.25, 0, 1 / 3 ** 0.25, 0], rtol=1e-6)
    evs = dict(test=rec.Evaluator(5, hist, (np.array([0, 0]), np.array([3, 4])), (1, 2)))
    out = newusers.anchors(hist, evs, 1, train, 5, 0.0)
    assert out["popularity"]["test"]["recall@1"] == 0  # item 0 (count 2) first; item 1 is the history
    assert out["popularity"]["test"]["recall@2"] == 0  # items 2, 3 tie at 1: ties count against the item
    assert out["itemknn"]["test"]["recall@2"] == 0.5  # cosines: item 0 0.82, item 3 0.58, item 4 0
    assert out["itemknn_tuned"]["test"]["recall@2"] == 0.5  # counts: item 0 2, item 3 1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n_users=st.integers(2, 12), n_items=st.integers(2, 8),
       lam=st.sampled_from([0.5, 3.0, 100.0]))
def test_ease_is_each_items_ridge_regression_on_the_others(seed, n_users, n_items, lam):
    """EASE's closed form equals, column by column, the ridge regression of item j's column of R on
    the other items' columns, b_j = (G_-j,-j + lam I)^-1 G_-j,j, with B_jj = 0; the item term of a
    history is its rows of B summed."""
    rng = np.random.default_rng(seed)
    R = (rng.random((n_users, n_items)) < 0.5).astype(np.float64)
    R[0, 0] = 1  # at least one pair
    users, items = np.nonzero(R)
    B = newusers.ease((users, items), n_items, lam).numpy()
    G = R.T @ R
    for j in range(n_items):
        o = np.arange(n_items) != j
        b = np.linalg.solve(G[np.ix_(o, o)] + lam * np.eye(n_items - 1), G[o, j])
        np.testing.assert_allclose(B[o, j], b, rtol=1e-4, atol=1e-6)
        assert B[j, j] == 0
    hist = (np.array([0, 0, 1]), np.array([0, n_items - 1, 1]))
    K = newusers.item_term(hist, 2, (users, items), n_items, 1.0, lam).numpy()
    np.testing.assert_allclose(K, [B[0] + B[n_items - 1], B[1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(newusers.item_term(hist, 2, (users, items), n_items, 0.5).numpy(),
                                  newusers.item_knn(hist, 2, (users, items), n_items, 0.5).numpy())


def test_new_users_are_placed_by_the_model_valid_prefers_and_on_a_tie_the_first():
    """fit weighs every model it is given on the new users' valid pairs: each model's figure is
    what fit reports for that model alone; select "best" keeps the best (its arrays in model.npz's
    newuser_*), "one-se" the first unless the best clears it by a paired standard error of the
    same valid recall; a tie keeps the first."""
    rng = np.random.default_rng(0)
    n_users, n_items, new = 40, 60, np.arange(32, 40)
    u, i = np.nonzero(rng.random((n_users, n_items)) < 0.2)
    part = rng.integers(0, 3, len(u))  # a new user's pair: history, valid or test
    is_new = np.isin(u, new)
    train = (u[~is_new], i[~is_new])
    cold = dict(users=new, **{k: (u[is_new & (part == j)], i[is_new & (part == j)])
                              for j, k in enumerate(("history", "valid", "test"))})
    models = {}
    for k in ("a", "b", "c"):
        ego = rng.standard_normal((n_users + n_items, 4)).astype(np.float32)
        models[k] = dict(ego=ego, user_emb=ego[:n_users], item_emb=ego[n_users:])
    fit = lambda ms, select="best": newusers.fit(n_users, n_items, train, ms, 1, cold, ks=(20,), select=select,
                                                 log=lambda s: None)
    alone = {k: fit({k: r})[0]["valid"]["recall@20"] for k, r in models.items()}
    assert len(set(alone.values())) == 3  # the case has something to choose
    entry, arrays = fit(models)
    assert entry["model_grid"] == alone and entry["model"] == max(alone, key=alone.get)
    assert entry["valid"]["recall@20"] == alone[entry["model"]] and arrays["newuser_model"] == entry["model"]
    for k in ("user_emb", "item_emb"):
        np.testing.assert_array_equal(arrays[f"newuser_{k}"], models[entry["model"]][k])
    worst = min(alone, key=alone.get)
    assert fit({"first": models[worst], "second": models[worst]})[0]["model"] == "first"
    assert fit({"second": models[worst], "first": models[worst]})[0]["model"] == "second"
    best = max(alone, key=alone.get)
    for order in (("a", "b", "c"), (worst, best)):  # the first is or is not the best: under one-se
        e = fit({k: models[k] for k in order}, "one-se")[0]
        if order[0] == best:
            assert e["model"] == best and e["margin"] is None
        else:
            g = e["margin"]
            assert g["challenger"] == best and g["gap"] == pytest.approx(alone[best] - alone[order[0]], abs=1e-6)
            assert e["model"] == (best if g["gap"] > g["se"] else order[0])


def test_the_blend_divides_each_term_by_its_spread():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    E = np.array([[1, 0], [0, 1], [2, 2]], np.float32)
    K = torch.tensor([[0.0, 3.0, 6.0], [1.0, 1.0, 1.0]])
    S, user_vec, w = newusers.scores(v, E, K, 0.5)
    dot = v @ torch.as_tensor(E).T
    sd = dot.std(1, keepdim=True)
    np.testing.assert_allclose(user_vec.numpy(), (v / sd).numpy())
    np.testing.assert_allclose(w.numpy(), [0.5 / 3.0, 0.5 / 1e-12], rtol=1e-6)  # a constant row: sd floored
    np.testing.assert_allclose(S.numpy(), (dot / sd + w[:, None] * K).numpy(), rtol=1e-6)
    S0, _, w0 = newusers.scores(v, E)
    np.testing.assert_allclose(S0.numpy(), (dot / sd).numpy(), rtol=1e-6) and np.testing.assert_array_equal(w0, 0)


def test_cold_users_split_follows_the_protocol(tmp_path):
    folder = make_dataset(tmp_path / "toy")
    d = dataset.load_mmrec(str(folder), cold_users=0.25, split_seed=3, log=lambda s: None)
    w = dataset.load_mmrec(str(folder), log=lambda s: None)
    c = d["cold_users"]
    want = np.sort(np.random.default_rng([3, 1]).permutation(np.unique(w["train"][0]))[:15])
    np.testing.assert_array_equal(c["users"], want)
    for s, k in (("train", "history"), ("valid", "valid"), ("test", "test")):
        new = np.isin(w[s][0], want)
        assert sorted(zip(*map(np.ndarray.tolist, c[k]))) == sorted(zip(w[s][0][new].tolist(), w[s][1][new].tolist()))
        assert sorted(zip(*map(np.ndarray.tolist, d[s]))) == sorted(zip(w[s][0][~new].tolist(), w[s][1][~new].tolist()))
    assert w["cold_users"] is None
    other = dataset.load_mmrec(str(folder), cold_users=0.25, split_seed=4, log=lambda s: None)["cold_users"]["users"]
    assert not np.array_equal(other, want)
    both = dataset.load_mmrec(str(folder), cold_users=0.25, cold_items=0.25, split_seed=3, log=lambda s: None)
    assert not np.isin(both["cold"]["test"][0], both["cold_users"]["users"]).any()  # a new user meets no new item
    assert not np.isin(both["cold_users"]["test"][1], both["cold"]["test_items"]).any()
    with pytest.raises(dataset.DataError, match="cold_users must be in"):
        dataset.load_mmrec(str(folder), cold_users=1.0, log=lambda s: None)
    with pytest.raises(dataset.DataError, match="makes 0 of 60 users new"):
        dataset.load_mmrec(str(folder), cold_users=0.001, log=lambda s: None)


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    """A toy MMCPR + LightGCN run with 20% new users, their history as a TSV in the data's ids."""
    root = tmp_path_factory.mktemp("users")
    folder, out = make_dataset(root / "toy", n_users=100, n_items=50), root / "run"
    p = run("--data", folder, "--out", out, "--cold-users", "0.2", *TRAIN)
    assert p.returncode == 0, p.stderr
    assert "new users (20, never trained), test recall@20" in p.stdout
    d = dataset.load_mmrec(str(folder), cold_users=0.2, log=lambda s: None)
    m, z = load(out)
    c = d["cold_users"]
    history = root / "history.tsv"
    history.write_text("user\titem\n" + "".join(f"{z['user_ids'][u]}\t{z['item_ids'][i]}\n" for u, i in zip(*c["history"])))
    return folder, out, history, d


def test_metrics_entry_leaves_the_new_users_out_of_training(cold_run):
    folder, out, _, d = cold_run
    m, z = load(out)
    c = m["cold_users"]
    assert c["users"] == d["cold_users"]["users"].tolist() and m["new_users"] is None
    assert c["chosen_on"] == "the new users' valid pairs" and c["beta"] in newusers.BETA
    assert c["beta_gamma_grid"][f"{c['beta']:g},{c['gamma']:g}"] == c["valid"]["recall@20"]
    assert c["valid"]["recall@20"] == max(c["beta_gamma_grid"].values()) and c["gamma"] in newusers.GAMMA
    assert c["alpha_grid"][f"{c['alpha']:g}"] == max(c["alpha_grid"].values())
    assert set(c["ease_grid"]) == {f"{x:g}" for x in newusers.EASE}  # the toy's catalogue is small
    best = max(c["ease_grid"].values())
    assert c["ease"] == (0 if best <= max(c["alpha_grid"].values()) else  # EASE only where valid prefers it
                         next(float(x) for x, r in c["ease_grid"].items() if r == best))
    assert float(z["newuser_ease"]) == c["ease"]
    assert c["anchors"]["itemknn_tuned"]["valid"]["recall@20"] == c["alpha_grid"][f"{c['alpha']:g}"]
    assert set(c["anchors"]) == {"popularity", "itemknn", "itemknn_tuned"} and "test" in c["anchors"]["itemknn"]
    assert not np.isin(z["ranked_users"], c["users"]).any()  # never trained, never in the run's lists
    assert m["n_train"] == len(d["train"][0]) and not np.isin(d["valid"][0], c["users"]).any()
    np.testing.assert_array_equal(z["newuser_train_users"], d["train"][0])
    assert z["newuser_items"].shape == z["item_emb"].shape
    grid, g = c["model_grid"], c["margin"]  # --select one-se: a challenger only where it clears the first
    first = next(iter(grid))
    if g is None:  # no model beat the first on valid
        assert c["model"] == first and grid[first] == max(grid.values())
    else:
        assert grid[g["challenger"]] > grid[first] and c["model"] == (g["challenger"] if g["gap"] > g["se"] else first)
    assert c["model"] == str(z["newuser_model"])
    assert list(c["model_grid"]) == list(m["candidates"]) and c["model_grid"][c["model"]] == c["valid"]["recall@20"]


def test_serving_the_new_users_reproduces_their_test_recall(cold_run, tmp_path):
    folder, out, history, d = cold_run
    m, z = load(out)
    p = run("--serve", out, "--new-users", history, "--out", tmp_path / "served", "--recommend-k", "20")
    assert p.returncode == 0, p.stderr
    rows = read_tsv(tmp_path / "served" / "recommendations.tsv")
    c = d["cold_users"]
    given = {(z["user_ids"][u], z["item_ids"][i]) for u, i in zip(*c["history"])}
    assert not given & {(u, i) for u, i, _, _ in rows}  # nothing they have given
    top, relevant = {}, {}
    for u, i, r, _ in rows:
        top.setdefault(u, set()).add(i)
    for u, i in zip(*c["test"]):
        relevant.setdefault(z["user_ids"][u], set()).add(z["item_ids"][i])
    recall = np.mean([len(items & top[u]) / len(items) for u, items in relevant.items()])
    assert recall == pytest.approx(m["cold_users"]["test"]["recall@20"], abs=1e-6)
    with np.load(tmp_path / "served" / "new_users.npz", allow_pickle=False) as n:
        assert sorted(n["user_ids"].tolist()) == sorted(z["user_ids"][c["users"]].tolist())
        row = {u: k for k, u in enumerate(n["user_ids"])}
        item = {i: k for k, i in enumerate(z["item_ids"])}
        K = newusers.item_term(newusers.local(c["users"], c["history"]), len(c["users"]),
                               (z["newuser_train_users"], z["newuser_train_items"]), len(item), float(z["newuser_alpha"]),
                               float(z["newuser_ease"]))
        order = np.argsort(z["user_ids"][c["users"]])  # the served rows: ids in sorted order
        got = [n["user_vec"][row[u]] @ z["newuser_item_emb"][item[i]]
               + n["knn_weight"][row[u]] * K[order[row[u]], item[i]].item()
               for u, i, _, _ in rows]  # the formula, by hand
        np.testing.assert_allclose(got, [s for _, _, _, s in rows], rtol=1e-5, atol=1e-5)


def test_bad_input_to_serve_new_users_is_one_line_exit_2_and_writes_nothing(cold_run, tmp_path):
    folder, out, history, d = cold_run
    _, z = load(out)
    trained, first = z["user_ids"][z["ranked_users"][0]], history.read_text().splitlines()[1]
    cases = {
        "was trained by the run": f"user\titem\n{trained}\t{z['item_ids'][0]}\n",
        "is not one of the items the run ranks": f"user\titem\n{first.split(chr(9))[0]}\tno-such-item\n",
        "empty": "",
        "the first line must be the header": first + "\n",
        "3 tab-separated fields": f"user\titem\nnew\tone\t{z['item_ids'][0]}\n",
        "no (user, item) pairs": "user\titem\n",
        "has an empty id": f"user\titem\n\t{z['item_ids'][0]}\n",
    }
    for k, (message, text) in enumerate(cases.items()):
        f = tmp_path / f"case{k}.tsv"
        f.write_text(text)
        p = run("--serve", out, "--new-users", f, "--out", tmp_path / "served")
        assert p.returncode == 2 and message in p.stderr, (message, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: ")
        assert not (tmp_path / "served").exists()
    old = tmp_path / "old"  # a run folder from before new users: no newuser_* arrays
    old.mkdir()
    (old / "metrics.json").write_text((out / "metrics.json").read_text())
    np.savez(old / "model.npz", **{k: v for k, v in z.items() if not k.startswith("newuser_")})
    p = run("--serve", old, "--new-users", history, "--out", tmp_path / "served")
    assert p.returncode == 2 and "no new-user arrays" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "served").exists()
    p = run("--serve", out, "--new-users", history, "--new-items", tmp_path)
    assert p.returncode == 2 and "one of --new-items DIR and --new-users FILE" in p.stderr


def test_a_run_without_cold_users_serves_new_users_too(tmp_path):
    """Every run keeps the arrays; its neighbour weight chosen on pseudo-new users. New ids are served."""
    folder, out = make_dataset(tmp_path / "toy"), tmp_path / "run"
    assert run("--data", folder, "--model", "mf", "--out", out, *TRAIN).returncode == 0
    m, z = load(out)
    assert m["cold_users"] is None and m["new_users"]["chosen_on"].startswith("pseudo-new users: 6 of the trained")
    (tmp_path / "h.tsv").write_text("user\titem\nalice\t3\nalice\t5\nbob\t3\nalice\t3\n")
    p = run("--serve", out, "--new-users", tmp_path / "h.tsv", "--recommend-k", "4")
    assert p.returncode == 0, p.stderr
    rows = read_tsv(out / "new-h" / "recommendations.tsv")
    assert [(u, r) for u, _, r, _ in rows] == [("alice", k) for k in (1, 2, 3, 4)] + [("bob", k) for k in (1, 2, 3, 4)]
    assert not {("alice", "3"), ("alice", "5"), ("bob", "3")} & {(u, i) for u, i, _, _ in rows}


def test_cold_users_with_cold_items_rank_the_warm_items(tmp_path):
    folder, out = make_dataset(tmp_path / "toy", n_users=100, n_items=50), tmp_path / "run"
    p = run("--data", folder, "--out", out, "--cold-users", "0.2", "--cold-items", "0.2", *TRAIN)
    assert p.returncode == 0, p.stderr
    m, z = load(out)
    assert m["cold"]["test"] is not None and m["cold_users"]["test"]["recall@20"] >= 0
    d = dataset.load_mmrec(str(folder), cold_users=0.2, cold_items=0.2, log=lambda s: None)
    assert not np.isin(d["cold_users"]["test"][1], m["cold"]["test_items"] + m["cold"]["valid_items"]).any()
    assert json.loads((out / "metrics.json").read_text())["args"]["cold_users"] == 0.2

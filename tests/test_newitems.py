"""The new-item content head (newitems.py): its content matrix, its fit and the choice of its
settings on new items (cold-valid) never on test, and its entry in metrics.json."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_dataset, run, train_result
import data as dataset  # noqa: E402  (helpers puts the root on sys.path)
import newitems  # noqa: E402  (helpers puts the root on sys.path)
import recommender as rec  # noqa: E402


def content_case(seed=0, n_items=60, n_users=30, d=4):
    rng = np.random.default_rng(seed)
    feats = {"text": rng.standard_normal((n_items, 6)), "image": rng.standard_normal((n_items, 3))}
    fit = np.arange(40)  # items 40..59 are new
    return rng, feats, fit, newitems.content_matrix(feats, newitems.content_stats(feats, fit))


def test_content_matrix_standardises_on_the_fit_items_and_adds_a_bias():
    rng, feats, fit, X = content_case()
    assert X.shape == (60, 10) and torch.all(X[:, -1] == 1)
    assert torch.allclose(X[:, :6].norm(dim=1), torch.ones(60, dtype=X.dtype))  # each modality's block
    assert torch.allclose(X[:, 6:9].norm(dim=1), torch.ones(60, dtype=X.dtype))
    feats["text"][40:] += 100  # a new item's features move nothing fitted on the others
    assert torch.equal(newitems.content_matrix(feats, newitems.content_stats(feats, fit))[:40], X[:40])
    feats["image"][:40, 0] = 3.0  # constant on the fit items: 0 for every item, a new one's offset too
    feats["image"][40:, 0] = 3.0 + 1e-3
    X = newitems.content_matrix(feats, newitems.content_stats(feats, fit))
    assert torch.all(X[:, 6] == 0) and torch.allclose(X[:, 6:9].norm(dim=1), torch.ones(60, dtype=X.dtype))


def test_content_head_recovers_a_linear_map_and_keeps_the_valid_best_strength():
    rng, feats, fit, X = content_case()
    E = (X @ torch.as_tensor(rng.standard_normal((10, 4)))).float().numpy()  # embeddings that content explains
    users = torch.as_tensor(rng.standard_normal((30, 4)), dtype=torch.float32)
    train = (np.arange(30), rng.choice(fit, 30))
    ev = rec.Evaluator(60, train, (np.arange(30), rng.choice(np.arange(40, 60), 30)), ks=(5, 20),
                       candidates=np.arange(40, 60))
    f = newitems.fit_content_head(X, E, fit, users, train, ev, ridge=(1e-8, 1e3), profile=(0.0,), log=lambda s: None)
    U, I = newitems.head_users(f, users), newitems.head_items(X, f["W"])
    np.testing.assert_allclose(I[40:, :4].numpy(), E[40:], atol=1e-3)  # new items, from their content alone
    assert f["ridge"] == max(f["ridge_grid"], key=f["ridge_grid"].get) and f["ridge_grid"][1e-8] >= f["ridge_grid"][1e3]
    assert torch.equal(U[:, 4:], torch.zeros(30, 9))  # β = 0: the head alone
    assert ev.evaluate(U, I) == pytest.approx(ev.evaluate(users, I[:, :4]))
    again = newitems.fit_content_head(X, E, fit, users, train, None, ridge=(f["ridge"],), profile=(0.0,))  # chosen: no evaluator
    assert torch.equal(again["W"], f["W"]) and again["ridge_grid"] == {f["ridge"]: None}
    with pytest.raises(ValueError, match="needs an evaluator"):
        newitems.fit_content_head(X, E, fit, users, train, None)


def test_content_profile_is_weighed_in_when_it_ranks_better_on_valid():
    # Item embeddings that content cannot explain, but each user's held-out new item is the one
    # most like the content of their training items: only the profile ranks it, and β > 0 is kept.
    rng, feats, fit, X = content_case(1, n_items=140)  # 100 new items, 40 with pairs
    x = F.normalize(X[:, :-1].float(), dim=1)
    train = (np.arange(30), rng.choice(fit, 30))
    target = (np.arange(30), 40 + (x[train[1]] @ x[40:].T).argmax(1).numpy())
    ev = rec.Evaluator(140, train, target, ks=(1, 20), candidates=np.arange(40, 140))
    users = torch.as_tensor(rng.standard_normal((30, 4)), dtype=torch.float32)
    E = rng.standard_normal((140, 4)).astype(np.float32)
    f = newitems.fit_content_head(X, E, fit, users, train, ev, log=lambda s: None)
    assert f["beta"] > 0 and f["beta_grid"][f["beta"]] == max(f["beta_grid"].values()) > f["beta_grid"][0.0]
    assert ev.evaluate(newitems.head_users(f, users), newitems.head_items(X, f["W"]))["recall@1"] > 0.5


@pytest.mark.parametrize("model", ["mmcpr", "lightgcn"])
def test_cold_entry_of_metrics(tmp_path, model):
    data, out = make_dataset(tmp_path / "toy"), tmp_path / "out"
    p = run("--data", data, "--model", model, "--device", "cpu", "--epochs", "2", "--pretrain-epochs", "1",
            "--cold-items", "0.25", "--out", out)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "metrics.json").read_text())["cold"]
    assert len(m["valid_items"]) == 5 and len(m["test_items"]) == 5
    if model == "lightgcn":
        assert m["valid"] is m["test"] is None and "cannot rank an item without pairs" in m["note"]
        assert "cannot rank" in p.stdout
    else:
        assert m["note"] is None and m["ridge_grid"][f"{m['ridge']:g}"] == max(m["ridge_grid"].values())
        assert m["profile_grid"][f"{m['profile_weight']:g}"] == max(m["profile_grid"].values()) == m["valid"]["recall@20"]
        assert 0 <= m["test"]["recall@20"] <= 1 and "cold-test" in p.stdout
        assert m["content"] == ["audio", "image"]


def test_new_item_head_reads_the_tags_unless_told_not_to(tmp_path):
    data = make_dataset(tmp_path / "toy")
    np.save(data / "category_tag.npy", np.eye(6, dtype=np.float32)[np.arange(40) % 6])  # each tag on 6 or 7 items
    content = {}
    for flag in ([], ["--no-tags"]):
        out = tmp_path / f"out{len(flag)}"
        p = run("--data", data, "--device", "cpu", "--epochs", "2", "--pretrain-epochs", "1", "--cold-items", "0.25",
                "--out", out, *flag)
        assert p.returncode == 0, p.stderr
        content[len(flag)] = json.loads((out / "metrics.json").read_text())["cold"]["content"]
    assert content == {0: ["audio", "image", "category tags"], 1: ["audio", "image"]}


def test_start_best_picks_the_new_items_start_on_cold_valid(tmp_path):
    """The cold task weighs both starts' heads on cold-valid; the pre-trained one is the same
    head as without --start best. The random start is kept only where its per-user cold-valid
    recall clears the pre-trained's by a paired standard error, their gap that of the grid."""
    data, m = make_dataset(tmp_path / "toy"), {}
    for flag in ("pretrained", "best"):
        out = tmp_path / flag
        p = run("--data", data, "--device", "cpu", "--epochs", "3", "--pretrain-epochs", "2", "--cold-items", "0.25",
                "--start", flag, "--content-view", "off", "--out", out)
        assert p.returncode == 0, p.stderr
        m[flag] = json.loads((out / "metrics.json").read_text())["cold"]
    a, b = m["pretrained"], m["best"]
    assert a["start_grid"] == {"pretrained": a["valid"]["recall@20"]}
    assert b["start_grid"]["pretrained"] == a["valid"]["recall@20"] and set(b["start_grid"]) == {"pretrained", "scratch"}
    if b["start_grid"]["scratch"] > b["start_grid"]["pretrained"]:
        g = b["margin"]
        assert g["challenger"] == "scratch" and g["gap"] == pytest.approx(
            b["start_grid"]["scratch"] - b["start_grid"]["pretrained"], abs=1e-6)
        assert b["start"] == ("scratch" if g["gap"] > g["se"] else "pretrained")
    else:
        assert b["start"] == "pretrained" and b["margin"] is None
    assert b["valid"]["recall@20"] == b["start_grid"][b["start"]]
    p = run("--data", data, "--model", "lightgcn", "--start", "best")
    assert p.returncode == 2 and "--model lightgcn has no pre-trained start" in p.stderr


@pytest.mark.parametrize("cold_valid,select,want", [
    ({1.0: 0.4, 2.0: 0.3}, "best", "pretrained"), ({1.0: 0.3, 2.0: 0.4}, "best", "scratch"),
    ({1.0: 0.4, 2.0: 0.4}, "best", "pretrained"),
    ({1.0: 0.3, 2.0: 0.4}, "one-se", "pretrained")])  # the heads differ by a scale: per user they rank alike
def test_new_items_start_is_chosen_on_cold_valid_alone(tmp_path, monkeypatch, cold_valid, select, want):
    """Warm valid prefers the pre-trained start here; the cold task still keeps its own best, and
    under one-se only where the heads' per-user cold-valid recall says so."""
    import recommender
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), cold_items=0.25, log=lambda s: None)

    def fake_train(n_users, n_items, *args, user_init=None, **kwargs):
        v, e = (0.3, 1.0) if user_init is not None else (0.2, 2.0)  # item_emb marks the start
        return train_result(n_users, n_items, v, v, user=1.0, item=e)

    def fake_head(X, item_emb, *args, **kwargs):
        e = float(item_emb[0, 0])
        return dict(W=torch.full((X.shape[1], 4), e, dtype=torch.float64), profile=torch.ones(data["n_users"], X.shape[1] - 1),
                    sd_head=1.0, sd_prof=1.0, ridge=e, beta=0.0, ridge_grid={e: cold_valid[e]}, beta_grid={0.0: cold_valid[e]})

    monkeypatch.setattr(recommender, "train", fake_train)
    monkeypatch.setattr(newitems, "fit_content_head", fake_head)
    args = run_module.parse_args(["--data", "x", "--pretrain-epochs", "1", "--l2", "1e-2", "--topk", "20",
                                  "--cold-items", "0.25", "--start", "best", "--content-view", "off", "--select", select])
    m = run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / "out"))
    assert m["start"] == "pretrained"
    assert m["cold"]["start"] == want and m["cold"]["ridge"] == {"pretrained": 1.0, "scratch": 2.0}[want]
    if select == "one-se":
        assert m["cold"]["margin"] == dict(challenger="scratch", gap=0.0, se=0.0)


def test_with_new_items_a_tag_is_a_column_only_where_two_trained_items_carry_it(tmp_path):
    """Tag 0 is carried by one trained item and one new item: the conversion's count (two items)
    keeps it, but only a new item makes it two, so the head has no column for it; tag 1 stays."""
    data = make_dataset(tmp_path / "toy")
    d = dataset.load_mmrec(str(data), cold_items=0.25, log=lambda s: None)
    trained, new = np.unique(d["train"][1]), d["cold"]["valid_items"]
    tags = np.zeros((40, 2), np.float32)
    tags[[trained[0], new[0]], 0] = 1
    tags[trained[1:4], 1] = 1
    np.save(data / "category_tag.npy", tags)
    out = tmp_path / "out"
    p = run("--data", data, "--device", "cpu", "--epochs", "2", "--pretrain-epochs", "1", "--cold-items", "0.25",
            "--out", out)
    assert p.returncode == 0, p.stderr
    assert "1 tag columns that fewer than two trained items carry are left out" in p.stdout
    z = np.load(out / "model.npz")
    widths = dict(zip(z["head_blocks"].tolist(), z["head_widths"].tolist()))
    assert widths == {"audio": 7, "image": 12, "category tags": 1}


@pytest.mark.parametrize("n_items,warned", [(40, True), (200, False)])
def test_settings_chosen_on_twenty_new_items_or_fewer_say_they_chose_nothing(tmp_path, n_items, warned):
    """Recall@20 over 20 candidates or fewer is 1 for every setting: said once, and in metrics.json."""
    data, out = make_dataset(tmp_path / "toy", n_items=n_items), tmp_path / "out"
    p = run("--data", data, "--device", "cpu", "--epochs", "2", "--pretrain-epochs", "1", "--cold-items", "0.25",
            "--out", out)
    assert p.returncode == 0, p.stderr
    cold = json.loads((out / "metrics.json").read_text())["cold"]
    assert ("warning" in cold) == warned and p.stdout.count("Recall@20 chooses nothing") == warned
    if warned:
        assert cold["warning"].startswith("the head's settings were chosen on 5 new items")
        assert set(cold["ridge_grid"].values()) == {1.0} and cold["ridge"] == newitems.RIDGE[0]

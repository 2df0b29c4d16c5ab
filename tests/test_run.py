"""End to end through run.py in a subprocess, as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, make_dataset, run, train_result
import data as dataset  # noqa: E402  (helpers puts the root on sys.path)
import runfolder  # noqa: E402


@pytest.mark.parametrize("model,extra", [("mf", []), ("lightgcn", ["--ui-layers", "1"]),
                                         ("mmcpr", ["--pretrain-epochs", "2", "--recommender", "mf"]),
                                         ("mmcpr", ["--pretrain-epochs", "2"])])
def test_run_writes_valid_metrics(tmp_path, model, extra):
    data, out = make_dataset(tmp_path / "toy"), tmp_path / "out"
    p = run("--data", data, "--model", model, "--device", "cpu", "--epochs", "3", "--out", out, *extra)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert (m["dataset"], m["model"], m["seed"]) == ("toy", model, 0)
    assert m["recommender"] == (model if model != "mmcpr" else "mf" if "mf" in extra else "lightgcn")
    assert (m["n_users"], m["n_items"], m["n_train"], m["n_valid"], m["n_test"]) == (60, 40, 360, 60, 60)
    assert 0 <= m["best_epoch"] <= 3
    for split in ("valid", "test"):
        for key in ("recall@20", "ndcg@20", "precision@20", "hit@20", "recall@50"):
            assert 0.0 <= m[split][key] <= 1.0
    assert set(m["timings_s"]) >= {"load", "graphs", "pretrain", "finetune", "eval", "total"}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    if model == "mmcpr":
        assert m["modalities"] == {"user": ["graph", "review"], "item": ["graph", "audio", "image"]}
        for side in ("user", "item"):
            assert sum(m["modality_weights"][side].values()) == pytest.approx(1.0, abs=1e-4)
        with np.load(out / "pretrained.npz", allow_pickle=False) as z:  # the start of fine-tuning
            assert z["user_emb"].shape == (60, 64) and z["item_emb"].shape == (40, 64)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    data = make_dataset(tmp_path / "toy")
    np.save(data / "image_feat.npy", np.ones((41, 3)))
    p = run("--data", data, "--model", "mf")
    assert p.returncode == 2
    assert p.stderr.strip() == "error: image_feat.npy: 41 rows but the data has 40 items"
    p = run("--data", tmp_path / "nowhere")
    assert p.returncode == 2 and "no such folder" in p.stderr and "Traceback" not in p.stderr
    p = run("--data", data, "--modalities", "text")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    p = run("--data", data, "--tau", "0.01")
    assert p.returncode == 2 and "--tau must be at least 0.025" in p.stderr and "Traceback" not in p.stderr
    p = run("--data", data, "--modality-dropout", "1")
    assert p.returncode == 2 and "--modality-dropout must be in [0, 1)" in p.stderr
    p = run("--data", make_dataset(tmp_path / "good"), "--model", "lightgcn", "--content-view", "--modalities", "none")
    assert p.returncode == 2 and p.stderr.strip() == "error: --content-view: no item content modality to view"
    full = tmp_path / "full"  # user 0 has trained on all four items
    full.mkdir()
    (full / "full.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n0\t1\t0\n0\t2\t0\n0\t3\t0\n"
                                     "1\t0\t0\n1\t1\t1\n1\t2\t2\n")
    p = run("--data", full, "--model", "mf")
    assert p.returncode == 2 and p.stderr.strip() == "error: full: user 0 has trained on every item: no negative to sample"


@pytest.mark.parametrize("flags,message", [
    (["--seed", "-1"], "--seed and --split-seed must be at least 0"),
    (["--split-seed", "-3"], "--seed and --split-seed must be at least 0"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--pretrain-lr", "nan"], "--pretrain-lr must be a positive number"),
    (["--pretrain-l2=-1e-3"], "--pretrain-l2 must be a non-negative number"),
    (["--lambda-align", "inf"], "--lambda-align must be a non-negative number"),
    (["--tau", "nan"], "--tau must be at least 0.025"),
    (["--finetune", "network", "--finetune-lr", "attention=1e-3"], "--finetune-lr must be PART=LR"),
    (["--finetune", "network", "--finetune-lr", "id=-1"], "--finetune-lr must be PART=LR"),
    (["--finetune", "network", "--finetune-lr", "id"], "--finetune-lr must be PART=LR"),
    (["--finetune-lr", "id=1e-3"], "--finetune-lr goes with --finetune network"),
    (["--finetune", "network", "--finetune-lr", "id=0,content=0,fusion=0,free=0"], "every part frozen"),
    (["--finetune", "network", "--model", "lightgcn"], "--model lightgcn has no pre-trained network"),
])
def test_bad_flags_are_refused_before_anything_runs(flags, message, capsys):
    sys.path.insert(0, str(ROOT))
    import run as run_module
    with pytest.raises(SystemExit) as e:
        run_module.parse_args(["--data", "anywhere", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_output_path_that_is_a_file_fails_before_training(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import run as run_module
    (tmp_path / "taken").write_text("")
    args = ["--data", str(make_dataset(tmp_path / "toy")), "--model", "mf", "--epochs", "1"]
    assert run_module.main([*args, "--out", str(tmp_path / "taken" / "out")]) == 2
    err = capsys.readouterr()
    assert "taken is not a writable folder" in err.err and "epoch" not in err.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    p = run("--data", make_dataset(tmp_path / "toy"), "--device", "cuda")
    assert p.returncode == 2 and "CUDA is not available" in p.stderr and "Traceback" not in p.stderr


def test_pretraining_sees_training_pairs_only(tmp_path, monkeypatch):
    """run.py must hand mmcpr.pretrain the train split and nothing of valid or test."""
    import mmcpr
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    seen = {}

    def fake_pretrain(R, *args, **kwargs):
        seen["R"], seen["kwargs"] = R, kwargs
        raise ValueError("stop here")

    monkeypatch.setattr(mmcpr, "pretrain", fake_pretrain)
    args = run_module.parse_args(["--data", "x", "--out", str(tmp_path / "out"), "--pretrain-batch", "96",
                                  "--align-batch", "7", "--no-standardize", "--batch", "5"])
    with pytest.raises(ValueError, match="stop here"):
        run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / "out"))
    kw = seen["kwargs"]                                 # the flags reach pre-training, --batch does not
    assert (kw["batch"], kw["align_batch"], kw["standardize"]) == (96, 7, False)
    R = seen["R"].tocsr()
    assert R.nnz == len(data["train"][0]) and R[data["train"]].min() == 1
    for split in ("valid", "test"):
        assert R[data[split]].max() == 0


def fake_pretrain_run(tmp_path, monkeypatch, *flags):
    """The kwargs and features run.py hands mmcpr.pretrain under `flags`."""
    import mmcpr
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    seen = {}

    def fake_pretrain(R, item_feats, user_feat, **kwargs):
        seen.update(kwargs, item_feats=sorted(item_feats), user_feat=user_feat is not None)
        raise KeyboardInterrupt  # stop before fine-tuning

    monkeypatch.setattr(mmcpr, "pretrain", fake_pretrain)
    with pytest.raises(KeyboardInterrupt):
        run_module.run(run_module.parse_args(["--data", "x", *flags]), data, "mmcpr", 0.0, str(tmp_path / "out"))
    return seen


@pytest.mark.parametrize("flags,want", [
    ([], dict(item_feats=["audio", "image"], user_feat=True, fusion="attention", user_graph=True,
              item_graph=True, align=True, modality_dropout=0.0)),
    (["--no-reviews"], dict(user_feat=False)),
    (["--modalities", "image"], dict(item_feats=["image"])),
    (["--modalities", "none"], dict(item_feats=[])),
    (["--fusion", "mean"], dict(fusion="mean")),
    (["--no-user-graph"], dict(user_graph=False, item_graph=True)),
    (["--no-item-graph"], dict(user_graph=True, item_graph=False)),
    (["--no-align"], dict(align=False)),
    (["--modality-dropout", "0.3"], dict(modality_dropout=0.3)),
])
def test_ablation_flags_reach_pretraining(tmp_path, monkeypatch, flags, want):
    seen = fake_pretrain_run(tmp_path, monkeypatch, *flags)
    assert {k: seen[k] for k in want} == want


def test_runs_with_different_settings_never_share_a_folder(tmp_path):
    """Default folders carry a digest of the settings: an ablation leaves the main run's outputs alone."""
    data = make_dataset(tmp_path / "toy")
    base = ["--data", data, "--device", "cpu", "--epochs", "2", "--pretrain-epochs", "1"]
    assert run(*base, "--out", tmp_path / "chosen").returncode == 0  # explicit --out: exactly that folder
    assert (tmp_path / "chosen" / "metrics.json").exists()
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, base)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (main,) = (tmp_path / "runs").iterdir()
    before = {f.name: f.read_bytes() for f in main.iterdir()}
    assert set(before) == {"metrics.json", "model.npz", "recommendations.tsv", "pretrained.npz"}
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, base), "--no-align"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert {f.name: f.read_bytes() for f in main.iterdir()} == before
    assert main.name.startswith("toy-mmcpr+lightgcn-s0-")


def test_divergence_names_the_stage_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    import mmcpr
    import run as run_module

    data = make_dataset(tmp_path / "toy")
    real = mmcpr.pretrain

    def diverged(*args, **kwargs):
        out = real(*args, **kwargs)
        out["item_emb"][0, 0] = np.nan
        return out

    monkeypatch.setattr(mmcpr, "pretrain", diverged)
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--pretrain-epochs", "1", "--epochs", "1"]
    assert run_module.main(argv) == 2
    assert "pre-training diverged" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(mmcpr, "pretrain", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        run_module.main(argv)


def fake_train_run(tmp_path, monkeypatch, model, *flags, threads=None):
    """The kwargs run.py hands recommender.train, and the metrics it writes from its result
    (computed on `threads` threads, default torch's)."""
    import recommender
    import run as run_module

    tmp_path.mkdir(exist_ok=True)
    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    seen, real = {}, recommender.train

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(recommender, "train", spy)
    args = run_module.parse_args(["--data", "x", "--epochs", "1", "--pretrain-epochs", "1", *flags])
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return seen, run_module.run(args, data, model, 0.0, str(tmp_path / "out"))
    finally:
        torch.set_num_threads(before)


def test_recommender_flags_reach_fine_tuning(tmp_path, monkeypatch):
    seen, m = fake_train_run(tmp_path, monkeypatch, "lightgcn", "--ui-layers", "3", "--l2", "0.5", "--lr", "0.2")
    assert (seen["model"], seen["layers"], seen["l2"], seen["lr"]) == ("lightgcn", 3, 0.5, 0.2)
    assert m["start_scale"] is None and "user_init" not in seen
    seen, m = fake_train_run(tmp_path / "b", monkeypatch, "mmcpr", "--recommender", "mf", "--no-rescale")
    assert seen["model"] == "mf" and seen["rescale"] is False and m["start_scale"] is None
    assert seen["user_init"].shape == (60, 64)
    seen, m = fake_train_run(tmp_path / "c", monkeypatch, "mmcpr")
    assert seen["model"] == "lightgcn" and seen["rescale"] is True and m["start_scale"] > 0


VALID = {"pretrained": 0.30, "scratch": 0.20, "pretrained+view": 0.25, "scratch+view": 0.35}


@pytest.mark.parametrize("model,flags,want", [
    ("mmcpr", [], ["pretrained", "pretrained+view", "scratch+view"]),  # auto: the view weighed from both starts
    ("mmcpr", ["--content-view"], ["pretrained+view", "scratch+view"]),  # on: the grid with the view too
    ("mmcpr", ["--content-view", "off"], ["pretrained"]),
    ("mmcpr", ["--start", "best"], ["pretrained", "scratch", "pretrained+view", "scratch+view"]),
    ("mmcpr", ["--start", "pretrained"], ["pretrained", "pretrained+view"]),
    ("mmcpr", ["--modalities", "none"], ["pretrained"]),  # no item content: nothing to view
    ("lightgcn", [], ["scratch"]),  # a baseline is itself alone
    ("lightgcn", ["--content-view", "on"], ["scratch+view"]),
])
def test_valid_weighs_the_content_view_and_the_start_after_the_grid(tmp_path, monkeypatch, model, flags, want):
    """The L2 grid trains the first candidate; the others train at its kept L2, each with every item
    modality in the view or none; valid keeps the best (--select best; one-se below), and test
    (reversed here) is never read."""
    import recommender
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    calls = []

    def fake_train(n_users, n_items, *args, l2, user_init=None, content=None, knn, content_nce, **kwargs):
        name = ("scratch" if user_init is None else "pretrained") + ("" if content is None else "+view")
        assert content is None or sorted(f.shape[1] for f in content) == [7, 12]
        assert (knn, content_nce) == (10, 1e-3)
        calls.append((name, l2))
        v = VALID[name] + (l2 == 1e-2) / 10  # the grid keeps 1e-2
        return train_result(n_users, n_items, v, 1 - v)

    monkeypatch.setattr(recommender, "train", fake_train)
    args = run_module.parse_args(["--data", "x", "--pretrain-epochs", "1", "--l2", "1e-3,1e-2", "--topk", "20",
                                  "--select", "best", *flags])
    m = run_module.run(args, data, model, 0.0, str(tmp_path / "out"))
    assert calls == [(want[0], 1e-3), (want[0], 1e-2)] + [(n, 1e-2) for n in want[1:]]
    kept = max(want, key=VALID.get)
    assert list(m["candidates"]) == want and m["kept"] == kept and m["l2"] == 1e-2
    assert m["start"] == kept.removesuffix("+view") and m["content_view"] == kept.endswith("+view")
    assert m["valid"]["recall@20"] == VALID[kept] + 0.1 and m["test"]["recall@20"] == 1 - m["valid"]["recall@20"]


def test_a_content_view_without_content_is_refused_and_a_tie_keeps_the_grids_candidate(tmp_path, monkeypatch):
    import recommender
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    args = run_module.parse_args(["--data", "x", "--pretrain-epochs", "1", "--l2", "1e-2", "--modalities", "none",
                                  "--content-view", "on"])
    with pytest.raises(dataset.DataError, match="--content-view: no item content modality"):
        run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / "a"))

    def fake_train(n_users, n_items, *args, **kwargs):
        return train_result(n_users, n_items, 0.5, 0.5)

    monkeypatch.setattr(recommender, "train", fake_train)
    args = run_module.parse_args(["--data", "x", "--pretrain-epochs", "1", "--l2", "1e-2", "--topk", "20"])
    m = run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / "b"))
    assert len(m["candidates"]) == 3 and m["kept"] == "pretrained" and not m["content_view"] and m["margin"] is None


def hits(data, users):
    """Final embeddings under which exactly `users` find their valid item first (Recall@20 1) and
    every other user scores every item 0 (a tie, which counts against the item: Recall@20 0)."""
    user_emb = np.zeros((data["n_users"], data["n_items"]), np.float32)
    u, i = data["valid"]
    user_emb[u[np.isin(u, users)], i[np.isin(u, users)]] = 1
    return user_emb, np.eye(data["n_items"], dtype=np.float32)


@pytest.mark.parametrize("lost,won", [(0, 2), (4, 6)])
def test_one_se_keeps_the_grids_candidate_unless_the_best_clears_it_by_a_paired_standard_error(
        tmp_path, monkeypatch, lost, won):
    """Of 60 users the hand-off finds 30's valid item; the view from the pre-trained start loses 3 of
    them and wins 4 others; from the random start it loses `lost` and wins `won`: valid 32/60, the
    best, both times. Two wins alone clear one paired standard error; six wins against four losses
    do not, and the hand-off is kept. --select best keeps the best either way."""
    import recommender
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    sets = {"pretrained": range(30), "pretrained+view": range(3, 34), "scratch+view": range(lost, 30 + won)}

    def fake_train(n_users, n_items, *args, user_init=None, content=None, **kwargs):
        name = ("scratch" if user_init is None else "pretrained") + ("" if content is None else "+view")
        r = train_result(n_users, n_items, len(sets[name]) / 60, 0.5)
        r["user_emb"], r["item_emb"] = hits(data, sets[name])
        return r

    monkeypatch.setattr(recommender, "train", fake_train)
    d = np.r_[-np.ones(lost), np.ones(won), np.zeros(60 - lost - won)]  # per user: scratch+view - pretrained
    se = np.sqrt(((d - 2 / 60) ** 2).sum() / 59 / 60)  # by hand: sqrt(s^2 / n); 0.023, then 0.053
    assert (2 / 60 > se) == (lost == 0)  # the cases are the two sides of the rule
    for select, want in (("one-se", "scratch+view" if lost == 0 else "pretrained"), ("best", "scratch+view")):
        args = run_module.parse_args(["--data", "x", "--pretrain-epochs", "1", "--l2", "1e-2", "--topk", "20",
                                      "--select", select])
        m = run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / select))
        assert m["kept"] == want and m["valid"]["recall@20"] == len(sets[want]) / 60
        if select == "one-se":
            assert m["margin"] == pytest.approx(dict(challenger="scratch+view", gap=2 / 60, se=se))
        else:
            assert m["margin"] is None


def test_the_default_fine_tuning_is_the_vector_hand_off_as_before(tmp_path, monkeypatch):
    """No --finetune: the pre-trained vectors are handed over and fine-tuned as before --finetune
    network existed (and --content-view, which is off here: the default fine-tunes this first, then the
    view). The numbers are that code's (commit bd93cd2) on the toy set at one thread; a change of the
    default path moves them far more than the tolerance (float rounding across machines)."""
    seen, m = fake_train_run(tmp_path, monkeypatch, "mmcpr", "--epochs", "3", "--pretrain-epochs", "2", "--l2", "1e-2",
                             "--seed", "1", "--content-view", "off", threads=1)
    assert "layer0" not in seen and seen["user_init"].shape == (60, 64) and m["args"]["finetune"] == "vectors"
    assert m["start_scale"] == pytest.approx(1.6200081655973688, rel=1e-5)
    assert [h["loss"] for h in m["history"]] == pytest.approx(
        [None, 1.1461292690700955, 1.1400504218207466, 1.153563266330295], rel=1e-5)
    assert [h["valid_recall@20"] for h in m["history"]] == pytest.approx([0.65, 2 / 3, 2 / 3, 2 / 3])
    assert m["test"]["recall@20"] == pytest.approx(0.6833333333333333)
    with np.load(tmp_path / "out" / "model.npz") as z:
        assert np.abs(z["user_emb"]).sum() == pytest.approx(709.9359741210938, rel=1e-5)
        assert np.abs(z["item_emb"]).sum() == pytest.approx(428.4964904785156, rel=1e-5)


def test_finetune_network_hands_the_pretrained_network_to_fine_tuning(tmp_path, monkeypatch):
    """--finetune network: layer 0 is the pre-trained network (no vectors), its parts at --lr but the
    IDs (a tenth), or at --finetune-lr; it starts where the vectors would, at epoch 0."""
    import mmcpr

    flags = ["--epochs", "2", "--pretrain-epochs", "2", "--l2", "1e-2", "--lr", "0.005"]
    seen, m = fake_train_run(tmp_path / "a", monkeypatch, "mmcpr", *flags, "--finetune", "network")
    seen = dict(seen)  # the next spy wraps this one, which would record that call too
    _, v = fake_train_run(tmp_path / "b", monkeypatch, "mmcpr", *flags)
    assert isinstance(seen["layer0"], mmcpr.Encoder) and "user_init" not in seen
    assert seen["layer0"].lr == pytest.approx(dict(id=0.0005, content=0.005, fusion=0.005, free=0.005))
    assert m["start_scale"] == v["start_scale"] and m["history"][0] == v["history"][0]
    assert m["history"][2]["loss"] != v["history"][2]["loss"]  # one step an epoch: epoch 1 logs the start's loss
    seen, m = fake_train_run(tmp_path / "c", monkeypatch, "mmcpr", *flags, "--finetune", "network",
                             "--finetune-lr", "content=0,free=1e-2")
    assert seen["layer0"].lr == pytest.approx(dict(id=0.0005, content=0.0, fusion=0.005, free=1e-2))


def test_demo_runs_the_three_models_side_by_side(tmp_path, monkeypatch, capsys):
    """The demo (no --data) writes its data under --out and runs MF, LightGCN and MMCPR."""
    import features
    import run as run_module

    made = {}

    def fake_demo(folder, seed):  # the toy MMRec folder instead of encoding synthetic raw data
        made.update(folder=folder, seed=seed)
        Path(folder).parent.mkdir(parents=True, exist_ok=True)
        make_dataset(Path(folder))

    monkeypatch.setattr(features, "make_demo", fake_demo)
    out = tmp_path / "demo"
    assert run_module.main(["--out", str(out), "--seed", "3", "--epochs", "1", "--pretrain-epochs", "1"]) == 0
    assert made == dict(folder=str(out / "demo-data-3"), seed=3)
    runs = sorted(p.name.split("-s3-")[0] for p in out.iterdir() if p.name != "demo-data-3")
    assert runs == ["toy-lightgcn", "toy-mf", "toy-mmcpr+lightgcn"]
    assert "demo (synthetic data), test split" in capsys.readouterr().out


def cold_variant(src, dst, cold_items, seed):
    """A copy of dataset src whose new items' pairs are rewritten (other users, other x_labels) and
    whose new items' features are redrawn; every new item keeps a pair, so the split is the same.
    The review features are redrawn too: a user's pools reviews of new items, so a cold run
    must ignore them."""
    dst.mkdir()
    rng = np.random.default_rng(seed)
    lines = (src / "toy.inter").read_text().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    keep = [r for r in rows if int(r[1]) not in cold_items]
    users = sorted({int(r[0]) for r in keep})
    new = {(int(u), int(i)) for u, i in zip(rng.choice(users, 3 * len(cold_items)), np.repeat(cold_items, 3))}
    new -= {(int(r[0]), int(r[1])) for r in keep}
    rows = keep + [[str(u), str(i), "5", str(rng.integers(3))] for u, i in sorted(new)]
    (dst / "toy.inter").write_text("\n".join([lines[0]] + ["\t".join(r) for r in rows]) + "\n")
    for f in ("image_feat.npy", "audio_feat.npy"):
        x = np.load(src / f).astype(np.float32)
        x[cold_items] = rng.standard_normal((len(cold_items), x.shape[1])) * 5
        np.save(dst / f, x)
    np.save(dst / "review_feat.npy", rng.standard_normal(np.load(src / "review_feat.npy").shape))  # see below
    return dst


def test_new_items_pairs_and_features_change_nothing_trained(tmp_path):
    """Rewrite every pair and the features of the new items: pre-training, fine-tuning and the
    warm task must not move at all (no graph edge, negative, L2 term or standardisation sees them)."""
    a = make_dataset(tmp_path / "a")
    cold = dataset.load_mmrec(str(a), cold_items=0.3, split_seed=1, log=lambda s: None)["cold"]
    cold_items = np.r_[cold["valid_items"], cold["test_items"]]
    b = cold_variant(a, tmp_path / "b", cold_items, seed=5)
    out = {}
    for name, data in (("a", a), ("b", b)):
        out[name] = tmp_path / f"out-{name}"
        p = run("--data", data, "--device", "cpu", "--cold-items", "0.3", "--split-seed", "1", "--epochs", "3",
                "--pretrain-epochs", "3", "--pretrain-batch", "64", "--batch", "64", "--id-dropout", "0.5",
                "--out", out[name])
        assert p.returncode == 0, p.stderr
    ma, mb = (json.loads((out[k] / "metrics.json").read_text()) for k in "ab")
    assert ma["cold"]["test_items"] == mb["cold"]["test_items"] == cold["test_items"].tolist()
    assert ma["modalities"]["user"] == ["graph"]  # review_feat.npy ignored
    assert ma["cold"]["test"] != mb["cold"]["test"]  # the rewritten pairs are what the cold task scores
    for key in ("valid", "test", "history", "best_epoch", "n_train", "n_valid", "n_test"):
        assert ma[key] == mb[key], key
    np.testing.assert_array_equal(np.load(out["a"] / "pretrained.npz")["user_emb"], np.load(out["b"] / "pretrained.npz")["user_emb"])
    warm = np.setdiff1d(np.arange(40), cold_items)
    ia, ib = np.load(out["a"] / "pretrained.npz")["item_emb"], np.load(out["b"] / "pretrained.npz")["item_emb"]
    np.testing.assert_array_equal(ia[warm], ib[warm])
    assert not np.allclose(ia[cold_items], ib[cold_items])  # a new item's h_i is its (new) content's


def test_l2_grid_keeps_the_valid_best_not_the_test_best(tmp_path, monkeypatch):
    """Three values whose valid and test orders disagree: the kept one is valid's best."""
    import recommender
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    scores = {1e-3: (0.20, 0.50), 1e-2: (0.30, 0.10), 1e-1: (0.25, 0.40)}  # l2: (valid, test) Recall@20
    calls = []

    def fake_train(n_users, n_items, *args, l2, **kwargs):
        calls.append(l2)
        v, t = scores[l2]
        return train_result(n_users, n_items, v, t, best_epoch=int(l2 * 1000), item=l2)

    monkeypatch.setattr(recommender, "train", fake_train)
    for flags, want_calls in ((["--l2", "1e-3,1e-2,1e-1"], [1e-3, 1e-2, 1e-1]), (["--l2", "1e-1"], [1e-1])):
        calls.clear()
        args = run_module.parse_args(["--data", "x", "--model", "lightgcn", "--topk", "20", *flags])
        m = run_module.run(args, data, "lightgcn", 0.0, str(tmp_path / "out"))
        assert calls == want_calls  # one value: no grid, one training
        kept = 1e-2 if len(want_calls) > 1 else 1e-1
        assert m["l2"] == kept and m["test"]["recall@20"] == scores[kept][1] and m["best_epoch"] == int(kept * 1000)
        saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert saved["grid"] == [{"l2": v, "best_epoch": int(v * 1000), "valid_recall@20": scores[v][0]}
                                 for v in want_calls]


def test_l2_default_is_the_grid_and_names_the_run(tmp_path):
    sys.path.insert(0, str(ROOT))
    import recommender
    import run as run_module

    parse = run_module.parse_args
    assert parse(["--data", "x"]).l2 == recommender.L2_GRID
    assert parse(["--data", "x", "--l2", "1e-3,1e-2,1e-3"]).l2 == (1e-3, 1e-2)
    assert parse([]).l2 is None  # the demo: each model's one tuned value
    names = {runfolder.run_name(parse(["--data", "x", *f]), "toy", "mf") for f in ([], ["--l2", "1e-2"], ["--l2", "1e-2,1e-1"])}
    assert len(names) == 3
    # --select best is the code before --select: its settings, run name and progress are that code's
    s = {f: runfolder.settings(parse(["--data", "x", *f]), "mmcpr") for f in ((), ("--select", "best"))}
    assert s[()]["select"] == "one-se" and s[()].keys() - s[("--select", "best")].keys() == {"select"}
    p = run("--data", make_dataset(tmp_path / "toy"), "--l2", "1e-2,x")
    assert p.returncode == 2 and "--l2 must be non-negative numbers" in p.stderr


def test_start_best_keeps_the_valid_best_start_and_its_twin_is_the_baseline(tmp_path, monkeypatch):
    """--start best: the random-start twin is the baseline alone, same call and same result, and
    the kept start is the one with the higher valid Recall@20."""
    import recommender
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)
    calls, real = [], recommender.train

    def spy(*args, **kwargs):
        r = real(*args, **kwargs)
        calls.append((args, kwargs, r))
        return r

    monkeypatch.setattr(recommender, "train", spy)
    flags = ["--data", "x", "--epochs", "4", "--patience", "2", "--l2", "1e-2", "--topk", "20"]
    base = run_module.run(run_module.parse_args(flags), data, "lightgcn", 0.0, str(tmp_path / "a"))
    m = run_module.run(run_module.parse_args(flags + ["--pretrain-epochs", "2", "--start", "best", "--content-view",
                                                      "off"]), data, "mmcpr", 0.0, str(tmp_path / "b"))
    (a_args, a_kw, a), (_, p_kw, p), (t_args, t_kw, t) = calls
    assert base["start"] == "scratch" and list(base["candidates"]) == ["scratch"]
    assert "user_init" in p_kw and t_kw.keys() == a_kw.keys() and "user_init" not in t_kw
    a_kw.pop("checkpoint"), t_kw.pop("checkpoint")  # each in its own run's progress folder
    assert all(np.array_equal(x, y) for x, y in zip(a_args + tuple(a_kw.values()), t_args + tuple(t_kw.values())))
    np.testing.assert_array_equal(t["item_emb"], a["item_emb"])
    assert m["candidates"]["scratch"] == {"best_epoch": base["best_epoch"], "valid_recall@20": base["valid"]["recall@20"]}
    if t["valid"]["recall@20"] > p["valid"]["recall@20"]:  # one-se: scratch only if it clears valid's noise
        g = m["margin"]  # its gap, from the final embeddings' per-user recall, is train's own valid gap
        assert g["challenger"] == "scratch" and g["gap"] == pytest.approx(
            t["valid"]["recall@20"] - p["valid"]["recall@20"], abs=1e-6)
        assert m["start"] == ("scratch" if g["gap"] > g["se"] else "pretrained")
    else:
        assert m["start"] == "pretrained" and m["margin"] is None
    assert m["valid"] == (t if m["start"] == "scratch" else p)["valid"]
    assert len(m["grid"]) == 1


@pytest.mark.parametrize("pretrained_valid,want", [(0.30, "pretrained"), (0.20, "scratch"), (0.25, "pretrained")])
def test_start_best_reads_valid_not_test(tmp_path, monkeypatch, pretrained_valid, want):
    import recommender
    import run as run_module

    data = dataset.load_mmrec(str(make_dataset(tmp_path / "toy")), log=lambda s: None)

    def fake_train(n_users, n_items, *args, l2, user_init=None, **kwargs):
        v, t = (pretrained_valid, 0.1) if user_init is not None else (0.25, 0.9)  # test always prefers scratch
        return train_result(n_users, n_items, v, t)

    monkeypatch.setattr(recommender, "train", fake_train)
    args = run_module.parse_args(["--data", "x", "--pretrain-epochs", "1", "--l2", "1e-2", "--topk", "20",
                                  "--start", "best", "--content-view", "off", "--select", "best"])
    m = run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / "out"))
    assert m["start"] == want
    assert m["test"]["recall@20"] == (0.9 if want == "scratch" else 0.1)
    args = run_module.parse_args(["--data", "x", "--pretrain-epochs", "1", "--l2", "1e-2", "--topk", "20",
                                  "--content-view", "off"])
    assert run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / "out"))["start"] == "pretrained"



"""The run folder (runfolder.py): what a run delivers (model.npz reproduces the metrics, each
user's unseen top K), and an interrupted run resumed from its progress/ to the result of an
uninterrupted one, real signals to run.py included."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import ROOT, load, make_dataset, quiet, read_tsv, run, stop_once
import data as dataset  # noqa: E402  (helpers puts the root on sys.path)
import recommender  # noqa: E402
import run as run_module  # noqa: E402

TRAIN = ["--device", "cpu", "--epochs", "4", "--pretrain-epochs", "2", "--l2", "1e-2", "--batch", "256",
         "--pretrain-batch", "256"]


# run.py: pre-training, a grid of two L2 values, the --start best twin, the new items' heads
FLAGS = ["--pretrain-epochs", "3", "--epochs", "5", "--patience", "5", "--l2", "1e-3,1e-1", "--start", "best",
         "--cold-items", "0.25", "--topk", "20", "--checkpoint-every", "0"]


def comparable(out):
    """out/metrics.json less the timings and the folder's own name, with model.npz's arrays and the recommendations."""
    m = json.loads((out / "metrics.json").read_text())
    m["args"].pop("out")
    with np.load(out / "model.npz", allow_pickle=False) as z:
        arrays = {k: z[k].tolist() for k in z.files}
    return {k: v for k, v in m.items() if k not in ("timings_s", "seconds_per_epoch")} | dict(
        model=arrays, recommendations=(out / "recommendations.tsv").read_text())


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """(args, data, uninterrupted metrics.json less timings) of the FLAGS run on the toy data."""
    folder = toy[0]
    args = run_module.parse_args(["--data", str(folder), *FLAGS])
    data = dataset.load_mmrec(str(folder), cold_items=0.25, log=quiet)
    out = tmp_path_factory.mktemp("reference")
    run_module.run(args, data, "mmcpr", 0.0, str(out))
    return args, data, comparable(out)


@pytest.mark.parametrize("where", ["pre-training", "between grid values", "fine-tuning", "the scratch twin"])
def test_run_resumes_where_it_stopped_to_the_same_metrics(reference, tmp_path, capsys, where):
    args, data, want = reference
    out, prog = tmp_path / "out", tmp_path / "out" / "progress"
    has = lambda name: lambda: (prog / name).exists()  # noqa: E731
    grid = {"pretrain.npz", "finetune-0.001.npz", "finetune-0.1.npz"}
    stop, left = {  # stop_once: run.run asks before each unit, the modules after each epoch
        "pre-training": (stop_once(after=2), {"pretrain.pt"}),
        "between grid values": (stop_once(has("finetune-0.001.npz")), {"pretrain.npz", "finetune-0.001.npz"}),
        "fine-tuning": (stop_once(has("finetune-0.001.npz"), after=2),
                        {"pretrain.npz", "finetune-0.001.npz", "finetune-0.1.pt"}),
        "the scratch twin": (stop_once(has("finetune-0.1.npz"), after=2), grid | {f"scratch-{want['l2']!r}.pt"}),
    }[where]
    with pytest.raises(KeyboardInterrupt):
        run_module.run(args, data, "mmcpr", 0.0, str(out), stop=stop)
    assert set(os.listdir(prog)) == left | {"settings.json"}
    capsys.readouterr()
    run_module.run(args, data, "mmcpr", 0.0, str(out))
    log = capsys.readouterr().out
    assert comparable(out) == want
    assert log.count("resuming the run") == 1 and "epoch   1 " not in log  # no pre-training epoch redone
    assert sorted(os.listdir(out)) == ["metrics.json", "model.npz", "pretrained.npz", "recommendations.tsv"]  # no progress


@pytest.mark.parametrize("where", ["pre-training", "fine-tuning"])
def test_a_network_fine_tuning_resumes_to_the_same_metrics(toy, tmp_path, capsys, where):
    """--finetune network: the pre-trained network comes back from progress/pretrain.npz, the
    fine-tuning's from its checkpoint; the new items' head is fitted from the kept model as before."""
    flags = ["--data", str(toy[0]), "--pretrain-epochs", "3", "--epochs", "5", "--patience", "5", "--l2", "1e-2",
             "--cold-items", "0.25", "--topk", "20", "--checkpoint-every", "0", "--finetune", "network",
             "--lr", "3e-2", "--finetune-lr", "content=3e-3,free=1e-3"]
    args, data = run_module.parse_args(flags), dataset.load_mmrec(str(toy[0]), cold_items=0.25, log=quiet)
    run_module.run(args, data, "mmcpr", 0.0, str(tmp_path / "reference"))
    want = comparable(tmp_path / "reference")
    assert want["cold"]["test"]["recall@20"] > 0 and want["best_epoch"] > 0
    out, prog = tmp_path / "out", tmp_path / "out" / "progress"
    stop = stop_once(after=2) if where == "pre-training" else stop_once(lambda: (prog / "pretrain.npz").exists(), after=2)
    with pytest.raises(KeyboardInterrupt):
        run_module.run(args, data, "mmcpr", 0.0, str(out), stop=stop)
    assert ("pretrain.pt" if where == "pre-training" else "finetune-0.01.pt") in os.listdir(prog)
    run_module.run(args, data, "mmcpr", 0.0, str(out))
    assert comparable(out) == want


@pytest.mark.parametrize("name", ["finetune-0.1.pt", "finetune-0.001.npz"])
def test_a_half_written_progress_file_is_one_line_then_the_same_result(reference, tmp_path, capsys, name):
    args, data, want = reference
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_module.run(args, data, "mmcpr", 0.0, str(out), stop=stop_once(lambda: (out / "progress" / name).exists()))
    path = out / "progress" / name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    capsys.readouterr()
    run_module.run(args, data, "mmcpr", 0.0, str(out))
    assert len([line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]) == 1
    assert comparable(out) == want


def test_other_settings_never_resume_the_progress(toy, tmp_path, capsys):
    folder, out = toy[0], tmp_path / "out"
    argv = ["--data", str(folder), "--model", "lightgcn", "--epochs", "4", "--l2", "1e-3,1e-1", "--topk", "20",
            "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        run_module.run(run_module.parse_args(argv), toy[1], "lightgcn", 0.0, str(out), stop=stop_once(after=2))
    before = {f: (out / "progress" / f).read_bytes() for f in os.listdir(out / "progress")}
    capsys.readouterr()
    assert run_module.main(argv + ["--epochs", "3", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (differing: epochs, seed)" in err and "--fresh" in err
    assert {f: (out / "progress" / f).read_bytes() for f in os.listdir(out / "progress")} == before
    assert run_module.main(argv + ["--epochs", "3", "--fresh"]) == 0
    assert "--fresh: discarding" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["args"]["epochs"] == 3
    assert not (out / "progress").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_in_a_fine_tuning_stops_the_run_and_the_same_command_resumes(toy, tmp_path, capsys, sig, code):
    """SIGINT: also resumed, to an uninterrupted run's metrics."""
    argv = ["--data", str(toy[0]), "--model", "lightgcn", "--epochs", "300", "--patience", "300", "--l2", "1e-3,1e-1",
            "--topk", "20", "--checkpoint-every", "0.2"]
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "run.py"), *argv, "--out", str(out)]
    p = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    second = False
    for line in p.stdout:  # into the second grid value's fine-tuning
        second = second or line.startswith("--- lightgcn with l2 0.1 (2 of 2)")
        if second and line.startswith("lightgcn epoch 5:"):
            break
    t = time.monotonic()
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and time.monotonic() - t < 10
    assert len(err.splitlines()) == 1 and f"stopped by {sig.name}" in err and "the same command" in err
    assert "finetune-0.1.pt" in os.listdir(out / "progress")
    if sig != signal.SIGINT:
        return
    q = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    assert q.stdout.count("resuming the run") == 1 and "lightgcn: resumed from" in q.stdout
    assert run_module.main([*argv, "--out", str(tmp_path / "reference")]) == 0
    assert comparable(out) == comparable(tmp_path / "reference")


@pytest.mark.parametrize("model,extra", [("mf", []), ("lightgcn", []), ("mmcpr", []), ("mmcpr", ["--cold-items", "0.25"])])
def test_model_npz_reproduces_the_metrics_exactly(tmp_path, model, extra):
    """valid and test recomputed from model.npz, each user's training items masked, equal metrics.json's."""
    data, out = make_dataset(tmp_path / "toy"), tmp_path / "out"
    p = run("--data", data, "--model", model, "--out", out, *TRAIN, *extra)
    assert p.returncode == 0, p.stderr
    m, z = load(out)
    d = dataset.load_mmrec(str(data), cold_items=0.25 if extra else 0.0, log=lambda s: None)
    assert z["user_emb"].shape == (60, 64) and z["item_emb"].dtype == np.float32
    assert z["user_ids"].tolist() == [str(u) for u in range(60)] and z["item_ids"].tolist() == [str(i) for i in range(40)]
    for split in ("valid", "test"):
        ev = recommender.Evaluator(40, d["train"], d[split], m["args"]["topk"], candidates=z["ranked_items"])
        assert ev.evaluate(torch.from_numpy(z["user_emb"]), torch.from_numpy(z["item_emb"])) == m[split]
    assert ("head_W" in z) == (model == "mmcpr") and (model == "mmcpr") == os.path.exists(out / "pretrained.npz")
    if extra:
        assert len(z["ranked_items"]) == 40 - len(m["cold"]["valid_items"]) - len(m["cold"]["test_items"])
    elif model == "mmcpr":  # no cold split: the head's settings were chosen on pseudo-new items
        assert m["head"]["chosen_on"].startswith("pseudo-new items") and float(z["head_ridge"]) == m["head"]["ridge"]


def test_recommendations_are_each_users_unseen_top_k(tmp_path):
    data, out = make_dataset(tmp_path / "toy"), tmp_path / "out"
    p = run("--data", data, "--model", "lightgcn", "--out", out, "--recommend-k", "5", *TRAIN)
    assert p.returncode == 0, p.stderr
    _, z = load(out)
    rows = read_tsv(out / "recommendations.tsv")
    d = dataset.load_mmrec(str(data), log=lambda s: None)
    known = {(str(u), str(i)) for s in ("train", "valid", "test") for u, i in zip(*d[s])}
    assert not known & {(u, i) for u, i, _, _ in rows}
    assert len(rows) == 5 * 60 and [r for _, _, r, _ in rows] == [1, 2, 3, 4, 5] * 60
    scores = z["user_emb"] @ z["item_emb"].T  # [U, I], the brute force
    for u, i, _, s in rows:
        assert s == pytest.approx(scores[int(u), int(i)], rel=1e-5)
    for u in range(60):
        unseen = [i for i in range(40) if (str(u), str(i)) not in known]
        best = sorted(unseen, key=lambda i: -scores[u, i])[:5]
        got = [i for v, i, _, _ in rows if v == str(u)]
        assert [scores[u, int(i)] for i in got] == pytest.approx([scores[u, i] for i in best], rel=1e-5)

"""An interrupted run resumes to the result of an uninterrupted one: the checkpoints of
mmcpr.pretrain and recommender.train, run.py's progress folder, and real signals to run.py."""
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import features  # noqa: E402
import mmcpr  # noqa: E402
import recommender  # noqa: E402
import run as run_module  # noqa: E402
from test_run import make_dataset  # noqa: E402

quiet = lambda s: None  # noqa: E731


class Killed(Exception):
    """Stands in for SIGKILL: the process ends at once, no checkpoint written."""


def stop_once(ready=lambda: True, after=0, kill=False):
    """A stop() for the modules and run.run: True (or, kill: raise Killed) from the `after`-th
    call after the first at which ready() holds. The modules ask it at the end of every epoch,
    run.run once before each unit (the pre-training, each fine-tuning)."""
    calls = itertools.count()

    def stop():
        if ready() and next(calls) >= after:
            if kill:
                raise Killed
            return True
        return False
    return stop


def assert_same(got, want, timing=("epoch_seconds", "eval_seconds")):
    assert got.keys() == want.keys()
    for k in want.keys() - set(timing):
        if isinstance(want[k], np.ndarray):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            assert got[k] == want[k], k


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = make_dataset(tmp_path_factory.mktemp("resume") / "toy")
    return folder, features.load_mmrec(str(folder), log=quiet)


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_fine_tuning_stopped_then_killed_ends_as_an_uninterrupted_one(toy, tmp_path, model):
    d = toy[1]
    rng = np.random.default_rng(1)
    pos = (d["n_users"], d["n_items"], d["train"], d["valid"], d["test"])
    # from a given start, rescaled (fit_scale) before epoch 1: a resumed training must not redo that
    kw = dict(model=model, epochs=12, patience=12, batch=64, lr=1e-2, l2=1e-3, ks=(20,), log=quiet,
              user_init=rng.standard_normal((d["n_users"], 8)), item_init=rng.standard_normal((d["n_items"], 8)))
    want = recommender.train(*pos, **kw)
    ck = str(tmp_path / "ck.pt")
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 3: checkpoint written
        recommender.train(*pos, **kw, checkpoint=ck, checkpoint_every=float("inf"), stop=stop_once(after=2))
    with pytest.raises(Killed):  # every epoch checkpointed, killed after epoch 7 before its checkpoint
        recommender.train(*pos, **kw, checkpoint=ck, checkpoint_every=0, stop=stop_once(after=3, kill=True))
    assert recommender.load_checkpoint(ck)["epoch"] == 6
    assert_same(recommender.train(*pos, **kw, checkpoint=ck), want)


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
    data = features.load_mmrec(str(folder), cold_items=0.25, log=quiet)
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

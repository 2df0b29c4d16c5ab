"""The run folder (runfolder.py): what a run delivers (model.npz reproduces the metrics, each
user's unseen top K), and an interrupted run resumed from its progress/ to the result of an
uninterrupted one, real signals to run.py included."""
import json
import os
import shutil
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
import runfolder  # noqa: E402

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


# The run folder's seams: one run per folder, nothing deleted that a run did not write, resume
# trusts the data, a failed write keeps the progress, units on disk, this invocation's timings.
LONG = ["--model", "lightgcn", "--epochs", "300", "--patience", "300", "--l2", "1e-3", "--topk", "20",
        "--checkpoint-every", "0"]


def running(command, until):
    """run.py started in a subprocess, returned once it has printed a line that starts with `until`."""
    p = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith(until):
            return p
    raise AssertionError(f"run.py ended before printing {until!r}: {p.communicate()[1]}")


def test_a_second_run_on_a_folder_in_use_is_one_line_and_the_first_finishes_untouched(toy, tmp_path):
    argv = ["--data", str(toy[0]), *LONG]
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "run.py"), *argv, "--out", str(out)]
    first = running(command, "lightgcn epoch 3:")
    first.send_signal(signal.SIGSTOP)  # paused mid-training, so that it is still at it whatever the load
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and len(second.stderr.splitlines()) == 1
    assert f"is in use by process {first.pid} (python " in second.stderr and "one run per folder" in second.stderr
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert run_module.main([*argv, "--out", str(tmp_path / "reference")]) == 0
    assert comparable(out) == comparable(tmp_path / "reference")
    assert sorted(os.listdir(out)) == ["metrics.json", "model.npz", "recommendations.tsv"]  # lock and progress gone


def test_a_killed_run_leaves_the_folder_free(toy, tmp_path):
    """The lock is the kernel's: SIGKILL releases it, and the same command resumes."""
    argv = ["--data", str(toy[0]), *LONG]
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "run.py"), *argv, "--out", str(out)]
    p = running(command, "lightgcn epoch 5:")
    p.kill()
    p.communicate(timeout=60)
    assert (out / ".lock").exists()  # left by the killed process, held by no one
    q = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr
    assert "resuming the run" in q.stdout and not (out / ".lock").exists()


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_a_progress_folder_that_no_run_wrote_is_refused_and_kept(toy, tmp_path, capsys, fresh):
    out = tmp_path / "out"
    (out / "progress").mkdir(parents=True)
    (out / "progress" / "notes.txt").write_text("mine")
    assert run_module.main(["--data", str(toy[0]), "--model", "mf", "--epochs", "2", "--out", str(out), *fresh]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run's progress" in err and "left as it is" in err
    assert sorted(os.listdir(out)) == ["progress"] and (out / "progress" / "notes.txt").read_text() == "mine"


def test_data_changed_between_a_stop_and_the_resume_is_refused(toy, tmp_path, capsys):
    folder = tmp_path / "toy"
    shutil.copytree(toy[0], folder)
    out = tmp_path / "out"
    argv = ["--data", str(folder), "--model", "lightgcn", "--epochs", "4", "--l2", "1e-3,1e-1", "--topk", "20",
            "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        run_module.run(run_module.parse_args(argv), dataset.load_mmrec(str(folder), log=quiet), "lightgcn", 0.0,
                       str(out), stop=stop_once(after=6))
    before = {f: (out / "progress" / f).read_bytes() for f in os.listdir(out / "progress")}
    assert "finetune-0.001.npz" in before
    x = np.load(folder / "image_feat.npy")
    np.save(folder / "image_feat.npy", x[::-1])  # the same shape, other features
    capsys.readouterr()
    assert run_module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other data (changed since: image_feat.npy)" in err and "--fresh" in err
    assert {f: (out / "progress" / f).read_bytes() for f in os.listdir(out / "progress")} == before
    np.save(folder / "image_feat.npy", x)  # back as it was: the run resumes
    assert run_module.main(argv) == 0 and "resuming the run" in capsys.readouterr().out


def test_a_failed_write_keeps_the_progress_and_the_same_command_finishes(reference, tmp_path, capsys, monkeypatch):
    args, data, want = reference
    out = tmp_path / "out"
    argv = ["--data", str(args.data), *FLAGS, "--out", str(out)]
    real = runfolder.write_atomic

    def no_space(folder, outputs):  # the deliverables fail; the progress units are written
        if os.path.samefile(folder, out):
            raise OSError(28, "No space left on device")
        real(folder, outputs)
    monkeypatch.setattr(runfolder, "write_atomic", no_space)
    assert run_module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "the same command writes them" in err
    assert {"pretrain.npz", "finetune-0.001.npz", "finetune-0.1.npz"} <= set(os.listdir(out / "progress"))
    monkeypatch.setattr(runfolder, "write_atomic", real)
    assert run_module.main(argv) == 0
    log = capsys.readouterr().out
    assert "resuming the run" in log and "epoch   1 " not in log and "lightgcn epoch 1:" not in log  # nothing retrained
    assert comparable(out) == want


def test_a_units_result_is_on_disk_before_its_checkpoint_is_removed(tmp_path, monkeypatch):
    """fsync of the result file, then of its folder (the rename), and only then the checkpoint's unlink."""
    events = []
    real_fsync, real_unlink = os.fsync, os.unlink
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "unlink", lambda p, **kw: events.append(("unlink", str(p))) or real_unlink(p, **kw))

    def train(checkpoint):
        open(checkpoint, "wb").close()
        return dict(x=np.arange(3), best_epoch=1)
    prog = str(tmp_path)
    assert runfolder.unit(prog, "u", None, train)["best_epoch"] == 1
    tmp_file = next(p for e, p in events if e == "fsync" and ".u.npz." in p)
    order = [events.index(("fsync", tmp_file)), events.index(("fsync", prog)),
             events.index(("unlink", os.path.join(prog, "u.pt")))]
    assert order == sorted(order)


def test_a_resumed_runs_timings_are_this_invocations_and_none_is_negative(toy, tmp_path, capsys):
    """The restored part of a fine-tuning must not count: its evaluations ran in another invocation."""
    out = tmp_path / "out"
    argv = ["--data", str(toy[0]), "--model", "lightgcn", "--epochs", "40", "--patience", "40", "--l2", "1e-3",
            "--topk", "20", "--checkpoint-every", "0", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 39 of 40: one epoch is left
        run_module.run(run_module.parse_args(argv), toy[1], "lightgcn", 0.0, str(out), stop=stop_once(after=38))
    assert run_module.main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert all(v >= 0 for v in m["timings_s"].values()), m["timings_s"]
    assert m["history"][-1]["epoch"] == 40


def test_ids_that_no_split_has_are_never_ranked_nor_recommended(tmp_path):
    """Item ids from 1: row 0 is no item; recommendations.tsv has four fields a line, items of the data only."""
    data = make_dataset(tmp_path / "toy")
    lines = (data / "toy.inter").read_text().splitlines()
    (data / "toy.inter").write_text("\n".join([lines[0]] + [f"{u}\t{int(i) + 1}\t{r}\t{s}" for u, i, r, s in
                                                             (line.split("\t") for line in lines[1:])]) + "\n")
    for f in ("image_feat.npy", "audio_feat.npy"):
        x = np.load(data / f)
        np.save(data / f, np.vstack([x[:1], x]))  # a row for item 0 too
    out = tmp_path / "out"
    p = run("--data", data, "--model", "lightgcn", "--out", out, "--recommend-k", "50", *TRAIN)
    assert p.returncode == 0, p.stderr
    assert "1 item ids below 41 appear in no split (such as 0)" in p.stdout
    m, z = load(out)
    assert 0 not in z["ranked_items"].tolist() and len(z["ranked_items"]) == 40
    rows = read_tsv(out / "recommendations.tsv")
    assert all(line.count("\t") == 3 for line in (out / "recommendations.tsv").read_text().splitlines())
    assert "0" not in {i for _, i, _, _ in rows} and m["notes"][0].startswith("1 item ids")

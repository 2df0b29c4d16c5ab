"""The run folder: where a run keeps what it has done and what it delivers.

    runs/<dataset>-<model>[+<recommender>]-s<seed>-<digest of every setting>/   (run_name)
        metrics.json         the settings, every choice made on valid, valid and test metrics
        model.npz            the kept model (below)
        recommendations.tsv  each trained user's top K unseen items: user, item, rank, score
                             in the dataset's own ids (recommendations_tsv)
        pretrained.npz       MMCPR only: the fine-tuning's start, user_emb and item_emb
        progress/            while it runs: settings.json, one <unit>.npz per finished unit
                             (the pre-training, each fine-tuning) and the checkpoint <unit>.pt
                             of the one in flight, so the same command resumes (open_progress,
                             unit); removed once the deliverables are written (finish)

Every file is written whole to a temporary file first and renamed into place (write_atomic):
a failed or stopped run leaves the files of the last finished one, never half of one.

model.npz (numpy only: np.load(path, allow_pickle=False)); U users, I items, d, F content columns:
    user_emb [U, d], item_emb [I, d]   float32, the kept model's final embeddings: score = dot
    user_ids [U], item_ids [I]         str, the dataset's own ids, in row order
    ranked_users, ranked_items         int64 rows: the users with a training pair (they get
                                       recommendations), the items ranked (with --cold-items, the warm ones)
and, where there is a content head:
    head_blocks [B], head_widths [B]   the content blocks in order (modalities, then '<b> tags'), widths
    head_mean [F], head_sd [F]         float64 standardisation on the catalogue (sd inf: a constant column)
    head_fill [F]                      float32, each block's mean row: what an item missing a modality gets
    head_W [F + 1, d]                  float64 ridge weights from content (last row: the bias) to item_emb's space
    head_user_emb [U, d], head_profile [U, F], head_sd_head, head_sd_prof, head_beta, head_ridge
                                       the head's users: score = e_u . x W / sd_head + beta p_u . x̂ / sd_prof
    head_start                         str, the fine-tuned model the head serves from: 'pretrained', or with
                                       --start best possibly 'scratch' where the kept model is the other
    tag_<b> [k]                        str, the columns of tag block b (raw data)
    encoder_text, encoder_image, precision   str, how the catalogue was encoded ('' : the packaged model)
and, in every run, what places a new user from their history (newusers.py, serve.serve_users):
    newuser_items [I, d]               float32, LightGCN's propagation of a history: p = |H|^-1/2 sum_H G_i
    newuser_train_users, newuser_train_items   int64, the training pairs (neighbours, item-to-item counts)
    newuser_alpha, newuser_beta, newuser_gamma, newuser_knn   the method's settings, chosen on valid
"""
import hashlib
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

from data import DataError


def settings(args, model):
    """Every setting that can change the result, JSON-able."""
    s = {k: v for k, v in sorted(vars(args).items())
         if k not in ("data", "out", "rebuild_features", "fresh", "checkpoint_every", "serve", "new_items", "new_users")
         and not (k == "cold_users" and not v)}  # off: the settings (and run names) of the runs before it
    s.update(model=model, data=os.path.abspath(args.data) if args.data else None)
    return json.loads(json.dumps(s, sort_keys=True, default=str))


def run_name(args, dataset, model):
    """<dataset>-<model>-s<seed>-<digest>: the digest covers every setting that can change
    the result, so runs with different settings never share (or overwrite) a folder."""
    digest = hashlib.sha1(json.dumps(settings(args, model), sort_keys=True).encode()).hexdigest()[:8]
    return f"{dataset}-{model}" + (f"+{args.recommender}" if model == "mmcpr" else "") + f"-s{args.seed}-{digest}"


def check_writable(path):
    """Fail before training, not after it: the nearest existing folder on `path` must be writable."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not (os.path.isdir(p) and os.access(p, os.W_OK)):
        raise PermissionError(f"cannot write the output folder {path}: {p} is not a writable folder")


def write_atomic(folder, outputs):
    """outputs {file name: write(binary file)}: every file is written in full to a temporary
    file in `folder` first, and only then are they all renamed into place, back to back:
    a failed run changes nothing."""
    tmps = {}
    try:
        for name, write in outputs.items():
            fd, tmps[name] = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.fchmod(fd, 0o644)  # mkstemp makes 0600
            with os.fdopen(fd, "wb") as f:
                write(f)
        for name, tmp in tmps.items():
            os.replace(tmp, os.path.join(folder, name))
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def open_progress(args, model, out):
    """OUT/progress/, where a run keeps what it has done until metrics.json is written, with
    the run's settings in settings.json: created, or, left by an interrupted run of the same
    settings, resumed (one line says from what). --fresh discards it first; an unreadable
    settings.json is reported and the progress discarded. Progress of other settings is never
    resumed or overwritten: FileExistsError, naming the settings that differ."""
    prog, want = os.path.join(out, "progress"), settings(args, model)
    if args.fresh and os.path.isdir(prog):
        print(f"--fresh: discarding the progress in {prog}/")
        shutil.rmtree(prog)
    if os.path.isdir(prog):
        try:
            with open(os.path.join(prog, "settings.json")) as f:
                have = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{prog}/settings.json is unreadable ({type(e).__name__}): discarding that progress, starting afresh")
            shutil.rmtree(prog)
        else:
            if have != want:
                differ = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
                raise FileExistsError(f"{prog}/ holds the progress of a run with other settings (differing: "
                                      f"{', '.join(differ)}): rerun with those, or add --fresh to discard it")
            done = sorted(f for f in os.listdir(prog) if f.endswith((".npz", ".pt")))
            print(f"resuming the run in {out}/ from {prog}/: {', '.join(done) or 'nothing finished yet'}")
            return prog
    os.makedirs(prog)
    write_atomic(prog, {"settings.json": lambda f: f.write(json.dumps(want, indent=1).encode())})
    return prog


def discard_progress(out):
    """Remove OUT/progress/, and OUT if that leaves it empty."""
    shutil.rmtree(os.path.join(out, "progress"), ignore_errors=True)
    try:
        os.rmdir(out)
    except OSError:  # not empty, or not there
        pass


def unit(prog, name, stop, train):
    """One resumable unit of a run, the pre-training or one fine-tuning: its result, loaded from
    prog/<name>.npz where an earlier invocation finished it; else train(checkpoint) with the
    checkpoint file prog/<name>.pt, its result (a dict of numpy arrays and JSON values) saved to
    prog/<name>.npz atomically, then that checkpoint removed. An unreadable result is reported
    in one line and the unit trained again. stop(): asked first; True raises KeyboardInterrupt."""
    path, checkpoint = os.path.join(prog, f"{name}.npz"), os.path.join(prog, f"{name}.pt")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return json.loads(str(z["json"])) | {k: z[k] for k in z.files if k != "json"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f"{path} is unreadable ({type(e).__name__}): training {name} again")
    if stop is not None and stop():
        raise KeyboardInterrupt(f"stopped before {name}")
    res = train(checkpoint)
    arrays = {k: v for k, v in res.items() if isinstance(v, np.ndarray)}
    rest = np.array(json.dumps({k: v for k, v in res.items() if k not in arrays}))
    write_atomic(prog, {f"{name}.npz": lambda f: np.savez(f, json=rest, **arrays)})
    if os.path.exists(checkpoint):
        os.unlink(checkpoint)
    return res


def finish(out, prog, outputs):
    """The run's last step: its deliverables {file name: write(binary file)} written into `out`
    (write_atomic), the stale files of an earlier run in a reused --out removed, then the progress."""
    os.makedirs(out, exist_ok=True)
    write_atomic(out, outputs)
    for stale in {"pretrained.npz", "user_emb.npy", "item_emb.npy"} - set(outputs):  # a reused --out: one run's files
        if os.path.exists(os.path.join(out, stale)):
            os.unlink(os.path.join(out, stale))
    shutil.rmtree(prog)  # the run folder keeps the deliverables, not the progress


def recommendations_tsv(user_ids, item_ids, users, items, scores):
    """recommendations.tsv's bytes: columns user, item, rank, score, tab-separated, best first, in
    the dataset's own ids. users [n] rows, items [n, k] rows (-1: none left), scores [n, k]."""
    n, k = items.shape
    keep = items.ravel() >= 0
    rows = zip(np.repeat(user_ids[users], k)[keep], item_ids[items.ravel()[keep]], np.tile(np.arange(1, k + 1), n)[keep],
               scores.ravel()[keep].tolist())
    return ("user\titem\trank\tscore\n" + "".join(f"{u}\t{i}\t{r}\t{s:.7g}\n" for u, i, r, s in rows)).encode()


def load_run(folder):
    """model.npz of a finished run folder, as {name: array}; DataError if it is not one."""
    path = os.path.join(folder, "model.npz")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, "metrics.json"))):
        raise DataError(f"{folder}: not a finished run folder (no model.npz and metrics.json)")
    try:
        with np.load(path, allow_pickle=False) as z:
            m = dict(z)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    missing = [k for k in ("user_emb", "item_emb", "user_ids", "item_ids", "ranked_users", "ranked_items") if k not in m]
    if missing:
        raise DataError(f"{path}: not a run's model (no {', '.join(missing)})")
    return m

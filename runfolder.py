"""The run folder: where a run keeps what it has done and what it delivers.

    runs/<dataset>-<model>[+<recommender>]-s<seed>-<digest of every setting>/   (run_name)
        metrics.json         the settings, every choice made on valid, valid and test metrics
        model.npz            the kept model (below)
        recommendations.tsv  each trained user's top K unseen items: user, item, rank, score
                             in the dataset's own ids (recommendations_tsv)
        pretrained.npz       MMCPR only: the fine-tuning's start, user_emb and item_emb
        progress/            while it runs: settings.json (the settings and a digest of the data
                             trained on), one <unit>.npz per finished unit (the pre-training, each
                             fine-tuning) and the checkpoint <unit>.pt of the one in flight, so
                             the same command resumes (open_progress, unit); removed once the
                             deliverables are written (finish)
        .lock                while it runs: the OS lock that keeps one run per folder (locked)

Every file is written whole to a temporary file first, flushed to disk, and renamed into place
(write_atomic): a failed, stopped or powered-off run leaves the files of the last finished one,
never half of one. A run deletes only what a run wrote: a progress/ without its settings.json
is someone else's, and is refused, never removed.

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
    head_start                         str, the fine-tuned model the head serves from (run.py's candidates:
                                       'pretrained', 'scratch', each '+view'), chosen on its own: it can
                                       differ from the kept model
    tag_<b> [k]                        str, the columns of tag block b (raw data)
    encoder_text, encoder_image, precision   str, how the catalogue was encoded ('' : the packaged model)
and, in every run, what places a new user from their history (newusers.py, serve.serve_users):
    newuser_items [I, d]               float32, LightGCN's propagation of a history: p = |H|^-1/2 sum_H G_i
    newuser_user_emb [U, d], newuser_item_emb [I, d]   float32, the final embeddings of newuser_model
                                       (str), the candidate that places new users, chosen on its own: it
                                       can differ from the kept model
    newuser_train_users, newuser_train_items   int64, the training pairs (neighbours, item-to-item counts)
    newuser_alpha, newuser_ease, newuser_beta, newuser_gamma, newuser_knn   the method's settings,
                                       chosen on valid (newuser_ease: EASE's lambda, 0 for ItemKNN)
"""
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import zipfile

import numpy as np

from data import DataError


class WriteError(Exception):
    """The deliverables could not be written; progress/ is kept, so the same command writes them."""


def settings(args, model):
    """Every setting that can change the result, JSON-able."""
    s = {k: v for k, v in sorted(vars(args).items())
         if k not in ("data", "out", "rebuild_features", "fresh", "checkpoint_every", "serve", "new_items", "new_users")
         and not (k == "cold_users" and not v) and not (k == "select" and v == "best")}  # off, best: as before them
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
    file in `folder` and flushed to disk first, and only then are they all renamed into place,
    back to back, the folder flushed after: a failed run changes nothing."""
    tmps = {}
    try:
        for name, write in outputs.items():
            fd, tmps[name] = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.fchmod(fd, 0o644)  # mkstemp makes 0600
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # on disk before its name is: a power loss leaves old or new, never empty
        for name, tmp in tmps.items():
            os.replace(tmp, os.path.join(folder, name))
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames themselves
        finally:
            os.close(fd)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def locked(out):
    """Hold the run folder `out` (made if missing) for this process: an OS lock (flock) on
    out/.lock, which the kernel releases when the process ends, even by SIGKILL. A second run
    on the folder gets FileExistsError naming the process that holds it, and the first goes on
    untouched. Released and removed on leaving; `out` too if this call made it and it is empty."""
    made, path = not os.path.isdir(out), os.path.join(out, ".lock")
    os.makedirs(out, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace") or "another process"
            os.close(fd)
            raise FileExistsError(f"{out}/ is in use by {holder}: one run per folder (wait for it to end, or "
                                  "choose another --out)") from None
        try:  # the lock's file may have been removed by its last holder after we opened it: take the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} ({shlex.join(['python', *sys.argv])})".encode())
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)
        if made:
            try:
                os.rmdir(out)
            except OSError:  # not empty: the run wrote into it
                pass


def digest(arrays):
    """{name: sha1 of its bytes} of {name: array or tuple of arrays}: what a run trained on, so
    that a resumed run can tell that the data changed under it."""
    out = {}
    for name, x in arrays.items():
        h = hashlib.sha1()
        for a in x if isinstance(x, tuple) else (x,):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.data)
        out[name] = h.hexdigest()
    return out


def open_progress(args, model, out, trained_on):
    """OUT/progress/, where a run keeps what it has done until metrics.json is written, with the
    run's settings and `trained_on` (digest's record of its data) in settings.json: created, or,
    left by an interrupted run of the same settings on the same data, resumed (one line says from
    what). --fresh discards it first. A progress/ without a readable settings.json is not a run's,
    and progress of other settings or other data is never resumed or overwritten: FileExistsError,
    naming what differs, the folder left as it is. Call it holding the folder (locked)."""
    prog, want = os.path.join(out, "progress"), settings(args, model) | dict(trained_on=trained_on)
    if os.path.isdir(prog):
        try:
            with open(os.path.join(prog, "settings.json")) as f:
                have = json.load(f)
            assert isinstance(have, dict)
        except (OSError, ValueError, AssertionError) as e:
            raise FileExistsError(f"{prog}/ is not a run's progress (its settings.json: {type(e).__name__}): "
                                  "it is left as it is; move it, or choose another --out") from None
        if args.fresh:
            print(f"--fresh: discarding the progress in {prog}/")
            shutil.rmtree(prog)
        elif have != want:
            differ = sorted(k for k in (have.keys() | want.keys()) - {"trained_on"} if have.get(k) != want.get(k))
            data = have.get("trained_on") or {}
            changed = sorted(k for k in data.keys() | trained_on.keys() if data.get(k) != trained_on.get(k))
            raise FileExistsError(f"{prog}/ holds the progress of a run with other "
                                  + (f"settings (differing: {', '.join(differ)})" if differ else
                                     f"data (changed since: {', '.join(changed)})")
                                  + ": rerun with those, or add --fresh to discard it")
        else:
            done = sorted(f for f in os.listdir(prog) if f.endswith((".npz", ".pt")))
            print(f"resuming the run in {out}/ from {prog}/: {', '.join(done) or 'nothing finished yet'}")
            return prog
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".progress.")  # progress/ appears with its settings.json, never without
    write_atomic(tmp, {"settings.json": lambda f: f.write(json.dumps(want, indent=1).encode())})
    os.chmod(tmp, 0o755)
    os.rename(tmp, prog)
    return prog


def discard_progress(out):
    """Remove OUT/progress/ (open_progress's, of the run that holds the folder)."""
    shutil.rmtree(os.path.join(out, "progress"), ignore_errors=True)


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
    (write_atomic), the stale files of an earlier run in a reused --out removed, then the progress.
    WriteError where they cannot be written: the progress stays, so the same command writes them."""
    try:
        write_atomic(out, outputs)
    except OSError as e:
        raise WriteError(f"cannot write the run's files into {out}/ ({e}); {prog}/ keeps its finished units: "
                         "the same command writes them") from None
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

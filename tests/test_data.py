"""Loading the MMRec layout: what loads, and every malformed input's one-line error."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as dataset  # noqa: E402

ROWS = [(0, 0, 0), (0, 1, 0), (0, 2, 1), (1, 1, 0), (1, 3, 2), (2, 2, 0), (2, 0, 1), (2, 3, 2)]


def write(folder, rows=ROWS, header="userID\titemID\tx_label", name="toy.inter"):
    folder.mkdir(exist_ok=True)
    lines = [header] + ["\t".join(map(str, r)) for r in rows]
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def load(folder):
    return dataset.load_mmrec(str(folder), log=lambda s: None)


def test_loads_mmrec_layout_with_extra_columns_and_features(tmp_path):
    rows = [(u, i, 4.0, 1000 + k, s) for k, (u, i, s) in enumerate(ROWS)]
    write(tmp_path, rows, header="userID\titemID\trating\ttimestamp\tx_label")
    np.save(tmp_path / "image_feat.npy", np.ones((4, 3), np.float16))
    np.save(tmp_path / "text_feat.npy", np.arange(8, dtype=np.float64).reshape(4, 2))
    np.save(tmp_path / "review_feat.npy", np.zeros((3, 5)))
    d = load(tmp_path)
    assert (d["name"], d["n_users"], d["n_items"]) == ("toy", 3, 4)
    assert [len(d[s][0]) for s in ("train", "valid", "test")] == [4, 2, 2]
    np.testing.assert_array_equal(d["train"][1], [0, 1, 1, 2])
    assert sorted(d["item_feats"]) == ["image", "text"]
    assert all(x.dtype == np.float32 for x in (*d["item_feats"].values(), d["user_feat"]))
    assert d["user_feat"].shape == (3, 5) and d["n_cold"] == 0 and d["item_tags"] == {}


def test_item_tags_are_read_and_empty_blocks_left_out(tmp_path):
    write(tmp_path)
    np.save(tmp_path / "category_tag.npy", np.eye(4, 2))
    np.save(tmp_path / "year_tag.npy", np.zeros((4, 0), np.float32))
    np.save(tmp_path / "image_feat.npy", np.ones((4, 3)))
    d = load(tmp_path)
    assert list(d["item_tags"]) == ["category"] and list(d["item_feats"]) == ["image"]  # tags are no modality
    np.testing.assert_array_equal(d["item_tags"]["category"], np.eye(4, 2, dtype=np.float32))
    np.save(tmp_path / "year_tag.npy", np.zeros((3, 1)))
    with pytest.raises(dataset.DataError, match=r"year_tag\.npy: 3 rows but the data has 4 items"):
        load(tmp_path)


def test_duplicates_inside_a_split_are_dropped_with_a_count(tmp_path):
    write(tmp_path, ROWS + [ROWS[0], ROWS[0], ROWS[2]])
    with pytest.warns(UserWarning, match="dropped 3 duplicate rows"):
        d = load(tmp_path)
    assert len(d["train"][0]) == 4 and len(d["valid"][0]) == 2


def test_users_without_training_items_leave_evaluation(tmp_path):
    write(tmp_path, ROWS + [(3, 0, 1), (3, 1, 2)])
    d = load(tmp_path)
    assert d["n_cold"] == 1 and 3 not in d["valid"][0] and 3 not in d["test"][0]
    assert d["n_users"] == 4


BAD = {
    "missing column": (dict(header="userID\titem\tx_label"), "missing column 'itemID'"),
    "non-integer id": (dict(rows=ROWS + [(1.5, 0, 0)]), "userID must be a non-negative integer"),
    "negative id": (dict(rows=ROWS + [(0, -1, 0)]), "itemID must be a non-negative integer"),
    "nan id": (dict(rows=ROWS + [("nan", 0, 0)]), "userID must be a non-negative integer"),
    "inf id": (dict(rows=ROWS + [(0, "inf", 0)]), "itemID must be a non-negative integer"),
    "text id": (dict(rows=ROWS + [("bob", 0, 0)]), "unreadable row"),
    "bad label": (dict(rows=ROWS + [(0, 3, 3)]), "x_label must be 0, 1 or 2"),
    "pair in two splits": (dict(rows=ROWS + [(0, 0, 2)]), r"pair \(user 0, item 0\) appears in more than one split"),
    "empty train": (dict(rows=[(0, 0, 1), (1, 1, 2)]), "train split .* is empty"),
    "empty valid": (dict(rows=[(0, 0, 0), (1, 1, 2)]), "valid split .* is empty"),
    "only cold users in test": (dict(rows=[(0, 0, 0), (0, 1, 1), (1, 1, 2)]), "no user of the test split"),
    "no rows": (dict(rows=[]), "no interactions"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_inter_gives_one_line_error_naming_the_file(tmp_path, case):
    kwargs, message = BAD[case]
    write(tmp_path, **kwargs)
    with pytest.raises(dataset.DataError, match=message) as e:
        load(tmp_path)
    assert str(e.value).startswith("toy.inter:") and "\n" not in str(e.value)


def test_folder_problems(tmp_path):
    with pytest.raises(dataset.DataError, match="no such folder"):
        load(tmp_path / "absent")
    with pytest.raises(dataset.DataError, match="exactly one .*found none"):
        load(tmp_path)
    write(tmp_path)
    write(tmp_path, name="other.inter")
    with pytest.raises(dataset.DataError, match="found other.inter, toy.inter"):
        load(tmp_path)


@pytest.mark.parametrize("name,array,message", [
    ("image_feat.npy", np.ones((5, 3)), "image_feat.npy: 5 rows but the data has 4 items"),
    ("review_feat.npy", np.ones((4, 3)), "review_feat.npy: 4 rows but the data has 3 users"),
    ("text_feat.npy", np.full((4, 3), np.nan), "text_feat.npy: contains NaN or inf"),
    ("audio_feat.npy", np.array([[1.0, np.inf]] * 4), "audio_feat.npy: contains NaN or inf"),
    ("image_feat.npy", np.ones(4), "expected a 2-d numeric array"),
    ("image_feat.npy", None, "image_feat.npy: not a numpy array file"),  # an empty file
    ("img.v2_feat.npy", np.ones((4, 3)), r"img\.v2_feat\.npy: modality names may use letters, digits and _ only"),
])
def test_bad_feature_files(tmp_path, name, array, message):
    write(tmp_path)
    if array is None:
        (tmp_path / name).write_bytes(b"")
    else:
        np.save(tmp_path / name, array)
    with pytest.raises(dataset.DataError, match=message):
        load(tmp_path)


def test_inter_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "toy.inter").write_bytes(b"userID\titemID\tx_label\n0\t0\t0\n\xff\xfe\t1\t0\n")
    with pytest.raises(dataset.DataError, match=r"^toy\.inter: not UTF-8 text"):
        load(tmp_path)


def random_rows(n_users=30, n_items=20, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, 6, replace=False)
        rows += [(u, int(i), s) for i, s in zip(items, (0, 0, 0, 0, 1, 2))]
    return rows


@pytest.mark.parametrize("frac", [0.2, 0.35])
def test_cold_split_follows_the_protocol(tmp_path, frac):
    rows = random_rows()
    write(tmp_path, rows)
    np.save(tmp_path / "image_feat.npy", np.arange(40, dtype=np.float32).reshape(20, 2))
    d = dataset.load_mmrec(str(tmp_path), cold_items=frac, split_seed=3, log=lambda s: None)
    order = np.random.default_rng(3).permutation(np.unique([i for _, i, _ in rows]))
    c = round(frac * len(order))
    np.testing.assert_array_equal(d["cold"]["valid_items"], np.sort(order[:c // 2]))
    np.testing.assert_array_equal(d["cold"]["test_items"], np.sort(order[c // 2:c]))
    new = set(order[:c].tolist())
    for s in ("train", "valid", "test"):  # no pair of a new item is left in the warm task
        assert not new & set(d[s][1].tolist())
    has_train = set(d["train"][0].tolist())
    for s in ("valid", "test"):  # every pair of a cold item, whatever its x_label, of a user with a training pair
        want = sorted((u, i) for u, i, _ in rows if i in d["cold"][f"{s}_items"] and u in has_train)
        assert sorted(zip(*map(np.ndarray.tolist, d["cold"][s]))) == want
    warm = sorted((u, i, x) for u, i, x in rows if i not in new)
    got = sorted((u, i, x) for x, s in enumerate(("train", "valid", "test")) for u, i in zip(*d[s]))
    assert got == [r for r in warm if r[0] in has_train]
    assert d["item_feats"]["image"].shape == (20, 2)  # new items keep their content


def test_cold_split_depends_on_split_seed_alone(tmp_path):
    write(tmp_path, random_rows())
    load_ = lambda seed: dataset.load_mmrec(str(tmp_path), cold_items=0.3, split_seed=seed, log=lambda s: None)["cold"]
    a, b, c = load_(0), load_(0), load_(1)
    for k in ("valid_items", "test_items"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["test_items"], c["test_items"])
    assert dataset.load_mmrec(str(tmp_path), log=lambda s: None)["cold"] is None
    with pytest.raises(dataset.DataError, match="cold_items"):
        dataset.load_mmrec(str(tmp_path), cold_items=1.0, log=lambda s: None)
    with pytest.raises(dataset.DataError, match="cold-valid and cold-test need one each"):
        dataset.load_mmrec(str(tmp_path), cold_items=0.05, log=lambda s: None)  # 1 of 20 items


def test_ids_that_no_split_has_are_no_items_and_a_note_counts_them(tmp_path):
    """Ids from 1 leave a row 0: it is no item of the dataset (catalogue), and one note says so."""
    write(tmp_path, [(u + 1, i + 1, s) for u, i, s in ROWS])
    d = load(tmp_path)
    assert d["n_items"] == 5 and d["catalogue"].tolist() == [1, 2, 3, 4]
    assert len(d["notes"]) == 1 and d["notes"][0].startswith("1 item ids below 5 appear in no split (such as 0)")
    assert load(write(tmp_path / "b"))["notes"] == [] and load(tmp_path / "b")["catalogue"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("col,value", [(0, 2 ** 53), (1, 2 ** 53 + 2), (0, 10 ** 12), (1, 20_008)])
def test_ids_that_are_too_large_are_one_line(tmp_path, col, value):
    """2**53 is where float64 stops holding every integer; far beyond the count, a row per id costs memory."""
    rows = [tuple(value if j == col and k == 0 else x for j, x in enumerate(r)) for k, r in enumerate(ROWS)]
    with pytest.raises(dataset.DataError, match=r"toy\.inter: (userID|itemID) (must be a non-negative integer "
                                                r"below 2\*\*53|runs to \d+ for \d+ distinct ids)") as e:
        load(write(tmp_path, rows))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,rows,message", [
    ("image_feat.npy", 4, r"image_feat\.npy: no columns"),
    ("review_feat.npy", 3, r"review_feat\.npy: no columns"),
    ("graph_feat.npy", 4, r"graph_feat\.npy: 'graph' names the ID modality")])
def test_a_feature_without_columns_or_with_a_reserved_name_is_one_line(tmp_path, name, rows, message):
    write(tmp_path)
    np.save(tmp_path / name, np.zeros((rows, 0 if "graph" not in name else 3), np.float32))
    with pytest.raises(dataset.DataError, match=message):
        load(tmp_path)

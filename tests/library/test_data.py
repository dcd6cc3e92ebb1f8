"""Datalists from CSVs, class folders and MONAI Label studies folders; case-grouped splits."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from thyroid_plugin.data import (
    FixedGroupSplit,
    class_counts,
    cross_centre_split,
    datalist_from_csv,
    datalist_from_datastore,
    datalist_from_folder,
    grouped_kfold,
    grouped_split,
    load_datalist,
    write_datalist_csv,
)
from thyroid_plugin.errors import DatalistError
from tests.support.paths import BUSBRA, DDTI, ddti_subset


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fp:
        w = csv.writer(fp)
        w.writerow(header)
        w.writerows(rows)
    return path


def _touch_images(folder: Path, names: list[str]) -> None:
    src = ddti_subset(1, 0)[0]["file"]
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / n)


# ----------------------------------------------------------------------------------------- CSV
def test_csv_labels_in_every_accepted_spelling(tmp_path):
    _touch_images(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png", "sub/f.png"])
    csv_path = _write(tmp_path / "data.csv", ["file", "label", "case", "device", "mask"], [
        ["a.png", "benign", "p1", "GE", "a.png"],
        ["b.png", "malignant", "p1", "GE", ""],
        ["c.png", "0", "p2", "Toshiba", ""],
        ["d.png", "1", "", "", ""],
        ["e.png", " Malignant ", "p3", "", ""],
        ["sub/f.png", "BENIGN", "p3", "", ""],
    ])
    items = datalist_from_csv(csv_path)
    assert [d["label"] for d in items] == [0, 1, 0, 1, 1, 0]
    assert [d["group"] for d in items] == ["p1", "p1", "p2", "d", "p3", "p3"]  # no case: the file is its own group
    assert [d["centre"] for d in items] == ["GE", "GE", "Toshiba", "", "", ""]
    assert items[5]["image"] == str((tmp_path / "sub" / "f.png").resolve())  # relative to the CSV's folder
    assert Path(items[0]["image"]).is_absolute()
    assert items[0]["mask"] == str((tmp_path / "a.png").resolve()) and "mask" not in items[1]
    assert class_counts(items) == [3, 3]


def test_csv_on_real_ddti_labels():
    items = datalist_from_csv(DDTI / "labels.csv")
    assert len(items) == 456
    assert all(Path(d["image"]).is_file() and Path(d["mask"]).is_file() for d in items)
    assert class_counts(items) == [70, 386]
    assert len({d["group"] for d in items}) == 290


@pytest.mark.parametrize(
    "header, rows, match",
    [
        (["image_file", "label"], [["a.png", "benign"]], "file column"),
        (["file", "diagnosis_text"], [["a.png", "benign"]], "label column"),
        (["file", "label"], [["a.png", "suspicious"]], r"line 2: invalid label 'suspicious'"),
        (["file", "label"], [["a.png", "benign"], ["", "benign"]], "line 3: empty file name"),
        (["file", "label"], [["a.png", "benign"], ["missing.png", "malignant"]], "line 3: image not found: missing.png"),
        (["file", "label"], [], "no rows"),
    ],
)
def test_csv_problems_are_named(tmp_path, header, rows, match):
    _touch_images(tmp_path, ["a.png"])
    with pytest.raises(DatalistError, match=match):
        datalist_from_csv(_write(tmp_path / "bad.csv", header, rows))


def test_missing_csv(tmp_path):
    with pytest.raises(DatalistError, match="CSV not found"):
        datalist_from_csv(tmp_path / "nope.csv")
    with pytest.raises(DatalistError, match="CSV not found"):
        load_datalist(tmp_path / "nope.csv")


def test_write_datalist_csv_round_trip(tmp_path):
    items = datalist_from_csv(DDTI / "labels.csv")[:10]
    for n, d in enumerate(items):
        d["centre"] = "site-a" if n % 2 else "site-b"
    out = tmp_path / "nested" / "split.csv"
    write_datalist_csv(items, out)
    back = datalist_from_csv(out)
    assert back == items
    # paths are written relative to the CSV's folder, so the folder can move with the data
    with open(out) as fp:
        first = next(csv.DictReader(fp))
    assert not Path(first["file"]).is_absolute()


# -------------------------------------------------------------------------------------- folders
def test_class_folders(tmp_path):
    _touch_images(tmp_path, ["benign/a.png", "benign/case7/b.png", "benign/case7/c.png", "malignant/d.png",
                             "malignant/x/y/e.png", "malignant/.hidden.png", "malignant/notes.txt", "other/z.png"])
    items = datalist_from_folder(tmp_path)
    by_name = {Path(d["image"]).name: d for d in items}
    assert set(by_name) == {"a.png", "b.png", "c.png", "d.png", "e.png"}
    assert [by_name[n]["label"] for n in ("a.png", "b.png", "d.png", "e.png")] == [0, 0, 1, 1]
    assert by_name["b.png"]["group"] == by_name["c.png"]["group"] == "case7"
    assert by_name["a.png"]["group"] == "a" and by_name["e.png"]["group"] == "x"
    assert load_datalist(tmp_path) == items


def test_folder_without_class_folders(tmp_path):
    _touch_images(tmp_path, ["images/a.png"])
    with pytest.raises(DatalistError, match="benign"):
        datalist_from_folder(tmp_path)
    with pytest.raises(DatalistError, match="not found"):
        datalist_from_folder(tmp_path / "absent")


# -------------------------------------------------------------------------------- studies folder
def test_studies_folder_with_confirmed_cases(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    rows = ddti_subset(2, 2)
    for r in rows:
        shutil.copyfile(r["file"], studies / Path(r["file"]).name)
    store = LocalDatastore(str(studies), extensions=("*.png",), auto_reload=False)
    ids = sorted(store.list_images())
    assert len(ids) == 4
    store.update_image_info(ids[0], {"diagnosis": "malignant", "case": "C1", "centre": "site", "roi": [1, 2, 50, 60]})
    store.update_image_info(ids[1], {"diagnosis": "benign"})
    store.update_image_info(ids[2], {"diagnosis": "not-a-label"})
    store.save_label(ids[0], rows[0]["mask"], "final", {})

    items = load_datalist(studies)
    assert [d["id"] for d in items] == ids[:2]  # unconfirmed and invalid diagnoses are not training cases
    first, second = items
    assert first["label"] == 1 and first["group"] == "C1" and first["centre"] == "site"
    assert first["roi"] == [1, 2, 50, 60]
    assert Path(first["image"]) == (studies / f"{ids[0]}.png").resolve()
    assert Path(first["mask"]).is_file()
    assert second["label"] == 0 and second["group"] == ids[1] and "mask" not in second

    everything = datalist_from_datastore(studies, require_diagnosis=False)
    assert [d["label"] for d in everything] == [1, 0, -1]  # the invalid stored value is still skipped
    # the same through a datastore object
    assert [(d["id"], d["label"]) for d in datalist_from_datastore(store)] == [(d["id"], d["label"]) for d in items]


def test_not_a_studies_folder(tmp_path):
    with pytest.raises(DatalistError, match="datastore_v2.json"):
        datalist_from_datastore(tmp_path)
    (tmp_path / "datastore_v2.json").write_text("{broken")
    with pytest.raises(DatalistError, match="cannot read"):
        datalist_from_datastore(tmp_path)


# --------------------------------------------------------------------------------------- splits
@pytest.fixture(scope="module")
def ddti_items() -> list[dict]:
    return datalist_from_csv(DDTI / "labels.csv")


def _groups(items) -> set:
    return {d["group"] for d in items}


def _key(d) -> str:
    return d["image"]


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
@pytest.mark.parametrize("n_folds", [3, 5])
def test_grouped_kfold_never_splits_a_case(ddti_items, seed, n_folds):
    folds = grouped_kfold(ddti_items, n_folds=n_folds, seed=seed)
    assert len(folds) == n_folds
    tested = Counter()
    for train, test in folds:
        assert _groups(train).isdisjoint(_groups(test)), "a case is on both sides"
        assert len(train) + len(test) == len(ddti_items)
        assert sorted(map(_key, train + test)) == sorted(map(_key, ddti_items))
        # stratified: both classes on both sides of every fold
        assert set(class_counts(test)) != {0} and min(class_counts(test)) > 0
        assert min(class_counts(train)) > 0
        tested.update(map(_key, test))
    assert set(tested.values()) == {1} and len(tested) == len(ddti_items)  # every image tested exactly once
    # the benign minority is spread evenly: fold counts differ by at most one case's frames
    benign_cases_per_fold = [len({d["group"] for d in test if d["label"] == 0}) for _, test in folds]
    assert max(benign_cases_per_fold) - min(benign_cases_per_fold) <= 1


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_grouped_split_never_splits_a_case(ddti_items, seed):
    train, val = grouped_split(ddti_items, 0.2, seed)
    assert _groups(train).isdisjoint(_groups(val))
    assert len(train) + len(val) == len(ddti_items)
    assert min(class_counts(val)) > 0 and min(class_counts(train)) > 0
    assert 0.15 <= len(_groups(val)) / len(_groups(ddti_items)) <= 0.25


def test_grouped_split_depends_on_the_seed_only(ddti_items):
    a = grouped_split(ddti_items, 0.2, 5)[1]
    b = grouped_split(list(ddti_items), 0.2, 5)[1]
    c = grouped_split(ddti_items, 0.2, 6)[1]
    assert _groups(a) == _groups(b)
    assert _groups(a) != _groups(c)


def test_split_arguments_are_checked(ddti_items):
    with pytest.raises(ValueError):
        grouped_kfold(ddti_items, n_folds=1)
    with pytest.raises(ValueError):
        grouped_split(ddti_items, 1.0)
    with pytest.raises(DatalistError, match="groups"):
        grouped_kfold(ddti_items[:3], n_folds=5)


# -------------------------------------------------------------------------------- fixed split
def _fake(groups: list[str], label_of=lambda g: int(g[-1]) % 2) -> list[dict]:
    return [{"image": f"/x/{g}_{k}.png", "label": label_of(g), "group": g, "centre": ""} for g in groups for k in range(2)]


def test_fixed_group_split_keeps_earlier_groups_on_their_side(tmp_path):
    path = tmp_path / "model" / "split.json"
    first = _fake([f"g{i}" for i in range(20)])
    train1, val1 = FixedGroupSplit(path, 0.25, seed=3).split(first)
    assert path.is_file()
    assert _groups(train1).isdisjoint(_groups(val1)) and val1 and train1
    saved = json.loads(path.read_text())["groups"]
    assert {g for g, side in saved.items() if side == "val"} == _groups(val1)

    # more confirmed cases arrive; a new instance (e.g. after a restart) reads the file
    more = first + _fake([f"n{i}" for i in range(40)])
    train2, val2 = FixedGroupSplit(path, 0.25, seed=3).split(more)
    assert _groups(val1) <= _groups(val2) and _groups(train1) <= _groups(train2)
    assert _groups(train2).isdisjoint(_groups(val2))
    assert _groups(train2) | _groups(val2) == _groups(more)
    new_val = _groups(val2) - _groups(val1)
    assert 0 < len(new_val) < 40  # new groups are spread over both sides
    # and calling again changes nothing
    train3, val3 = FixedGroupSplit(path, 0.25, seed=3).split(list(reversed(more)))
    assert _groups(val3) == _groups(val2)
    # even when the set is shuffled and a different seed or fraction is asked for, known groups stay put
    _, val4 = FixedGroupSplit(path, 0.5, seed=99).split(more)
    assert _groups(val4) == _groups(val2)


def test_fixed_group_split_on_few_groups_and_damaged_file(tmp_path):
    path = tmp_path / "split.json"
    train, val = FixedGroupSplit(path, 0.2).split(_fake(["a1", "b2"]))
    assert _groups(train) | _groups(val) == {"a1", "b2"}
    path.write_text("not json")
    with pytest.raises(DatalistError, match="damaged"):
        FixedGroupSplit(path).split(_fake(["a1"]))


# ------------------------------------------------------------------------------- cross-centre
@pytest.fixture(scope="module")
def busbra_items() -> list[dict]:
    return datalist_from_csv(BUSBRA / "labels.csv")


def test_busbra_devices_are_the_centres(busbra_items):
    with open(BUSBRA / "labels.csv", newline="") as fp:
        devices = Counter(r["device"] for r in csv.DictReader(fp))
    assert Counter(d["centre"] for d in busbra_items) == devices
    assert len(devices) >= 2


def test_cross_centre_split_on_busbra_devices(busbra_items):
    centres = Counter(d["centre"] for d in busbra_items)
    big = centres.most_common(1)[0][0]
    train, test = cross_centre_split(busbra_items, [big])
    assert {d["centre"] for d in train} == {big}
    assert {d["centre"] for d in test} == set(centres) - {big}
    assert len(train) + len(test) == len(busbra_items)
    assert _groups(train).isdisjoint(_groups(test))

    others = [c for c in centres if c != big]
    train, test = cross_centre_split(busbra_items, [big], [others[0]])
    assert {d["centre"] for d in test} == {others[0]}
    assert len(test) == centres[others[0]]


def test_cross_centre_split_errors(busbra_items):
    centres = sorted({d["centre"] for d in busbra_items})
    with pytest.raises(DatalistError, match="unknown centres"):
        cross_centre_split(busbra_items, ["Philips @ nowhere"])
    with pytest.raises(DatalistError, match="both sides"):
        cross_centre_split(busbra_items, centres)
    # a patient imaged at two sites cannot be on both sides
    items = [{"image": "a", "label": 0, "group": "p1", "centre": "A"}, {"image": "b", "label": 1, "group": "p1", "centre": "B"},
             {"image": "c", "label": 1, "group": "p2", "centre": "B"}]
    with pytest.raises(DatalistError, match="both a train and a test centre"):
        cross_centre_split(items, ["A"])

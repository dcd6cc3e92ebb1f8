"""``thyroid-nodule import-studies``: a labelled collection becomes confirmed cases of a studies
folder that MONAI Label's datastore (and so the server) reads."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import PIL.Image

from thyroid_plugin.data import datalist_from_datastore
from thyroid_plugin.io import load_image
from thyroid_plugin.monailabel_adapter import ConfirmedCasesDatastore, import_collection
from tests.support.paths import REPO, ddti_subset, write_csv

CLI = str(REPO / ".venv" / "bin" / "thyroid-nodule")


def run(*args):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_import_a_csv_as_confirmed_cases(tmp_path):
    rows = ddti_subset(3, 3)
    csv_path = write_csv(rows, tmp_path / "labels.csv")
    result = run("import-studies", csv_path, "--studies", tmp_path / "studies")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["imported"] == 6
    store = ConfirmedCasesDatastore(str(tmp_path / "studies"))
    assert sorted(store.get_labeled_images()) == sorted(store.list_images())
    by_case = {store.get_image_info(i)["case"]: store.get_image_info(i)["diagnosis"] for i in store.list_images()}
    assert by_case == {r["case"]: r["label"] for r in rows}
    # each expert mask came along as the case's final label, on its image's grid: the server's retraining cuts around it
    assert json.loads(result.stdout)["masks"] == 6
    items = datalist_from_datastore(tmp_path / "studies")
    by_source = {r["file"]: r["mask"] for r in rows}
    for d in items:
        source = store.get_image_info(d["id"])["source"]
        assert np.array_equal(load_image(d["mask"]).array, load_image(by_source[source]).array)
    # importing again adds nothing and loses nothing
    again = run("import-studies", csv_path, "--studies", tmp_path / "studies")
    assert again.returncode == 0 and json.loads(again.stdout)["imported"] == 0
    assert len(ConfirmedCasesDatastore(str(tmp_path / "studies")).list_images()) == 6


def test_import_a_class_folder_layout_unconfirmed(tmp_path):
    rows = ddti_subset(2, 2)
    for r in rows:
        dest = tmp_path / "collection" / r["label"]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r["file"], dest / f"case{r['case']}.png")
    result = run("import-studies", tmp_path / "collection", "--studies", tmp_path / "studies", "--unlabelled")
    assert result.returncode == 0, result.stderr
    store = ConfirmedCasesDatastore(str(tmp_path / "studies"))
    assert len(store.list_images()) == 4 and store.get_labeled_images() == []
    assert json.loads(result.stdout)["masks"] == 0


def test_a_mask_off_its_images_grid_is_left_out_and_the_image_is_imported(tmp_path, caplog):
    rows = ddti_subset(1, 1)
    wrong = tmp_path / "small_mask.png"
    PIL.Image.fromarray(np.zeros((40, 40), np.uint8)).save(wrong)
    items = [{"image": rows[0]["file"], "label": 0, "group": "a", "mask": str(wrong)},
             {"image": rows[1]["file"], "label": 1, "group": "b", "mask": rows[1]["mask"]}]
    imported = import_collection(items, tmp_path / "studies")
    ids = imported.ids
    assert len(ids) == 2 and imported.masks == [ids[1]] and "its mask was not imported" in caplog.text
    masked = {d["id"]: d.get("mask") for d in datalist_from_datastore(tmp_path / "studies")}
    assert masked[ids[0]] is None and masked[ids[1]] is not None


def test_a_bad_collection_is_refused_with_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nnot_there.png,benign\n")
    result = run("import-studies", bad, "--studies", tmp_path / "studies")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "not_there.png" in result.stderr

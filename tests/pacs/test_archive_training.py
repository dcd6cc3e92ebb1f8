"""Retraining on an archive-backed server trains on the diagnoses confirmed in the archive."""

from __future__ import annotations

import json

import pytest
import requests
from pydicom.uid import generate_uid

from tests.app.test_app_training import wait_for_train
from tests.pacs.conftest import archive_server, store
from tests.support.orthanc import OrthancServer
from tests.support.paths import ddti_subset
from tests.support.us_dicom import Study, gray_frame, us_dataset

pytestmark = pytest.mark.slow

TIMEOUT = 60


def test_retrain_uses_the_archive_confirmed_cases(tmp_path, small_model, app_model_dir):
    rows = ddti_subset(3, 3, offset=6)
    datasets = []
    for n, row in enumerate(rows):  # one patient, study and frame per DDTI case
        study = Study(f"TR-{n:04d}", f"Case^{row['case']}")
        datasets.append((us_dataset(study, generate_uid(), [gray_frame(row["file"])], 1), row["label"]))
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        store(orthanc, [ds for ds, _ in datasets])
        server = archive_server(tmp_path / "app", orthanc, app_model_dir, tmp_path / "cache")
        with server:
            for ds, label in datasets[:-1]:  # the last frame stays unconfirmed
                r = requests.put(f"{server.url}/datastore/image/info", params={"image": ds.SOPInstanceUID},
                                 data={"info": json.dumps({"diagnosis": label})}, timeout=TIMEOUT)
                assert r.status_code == 200, r.text
            # a server restarted with an empty cache still has them
            server.stop()
            server.conf["archive_cache"] = str(tmp_path / "empty-cache")
            server.start()
            r = requests.post(f"{server.url}/train/classify_nodule",
                              json={"max_epochs": 1, "publish": "always", "val_split": 0.4}, timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            result = wait_for_train(server.url)
            assert result["status"] == "DONE", result.get("details")
            stats = requests.get(f"{server.url}/info/", timeout=TIMEOUT).json()["train_stats"]["classify_nodule"]
            assert stats["status"] == "done" and stats["published"] is True
            assert stats["train_size"] + stats["val_size"] == 5

"""Fixtures of the Slicer-module tests: the module's Lib on the path, MRML scenes, and one real
MONAI Label server (the thyroid_nodule app, a small real model, real DDTI frames) shared by the
server tests of this folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

from tests.support.paths import ddti_subset
from tests.support.server import MonaiLabelServer

from .helpers import MODULE_DIR, new_scene

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

#: the studies of the shared server: confirmed cases (enough of both classes to train) and
#: unconfirmed ones (for "Next case")
CONFIRMED = ddti_subset(4, 4)
UNCONFIRMED = ddti_subset(2, 2, offset=4)


@pytest.fixture
def scene():
    """A fresh MRML scene with Slicer's colour tables and three slice views."""
    s = new_scene()
    yield s
    s.Clear(1)


def start_server(root: Path, model: Path, localiser: Optional[Path] = None) -> MonaiLabelServer:
    """A real MONAI Label server in ``root`` running the app on ``model``, with 8 confirmed and 4
    unconfirmed DDTI frames in its studies folder; ``localiser``: a nodule localiser in its model
    folder, as shipped (none by default: frames without a box are classified whole)."""
    from thyroid_plugin.monailabel_adapter import import_collection

    model_dir = root / "model"
    model_dir.mkdir()
    shutil.copyfile(model, model_dir / "pretrained_classify_nodule.pt")
    if localiser is not None:
        shutil.copyfile(localiser, model_dir / "pretrained_nodule_localiser.pt")
    studies = root / "studies"

    def datalist(rows):
        return [{"image": r["file"], "label": 0 if r["label"] == "benign" else 1, "group": r["case"]} for r in rows]

    import_collection(datalist(CONFIRMED), studies)
    import_collection(datalist(UNCONFIRMED), studies, with_diagnosis=False)
    srv = MonaiLabelServer(studies, model_dir, log_path=root / "server.log")
    srv.start()
    return srv


@pytest.fixture(scope="session")
def server(tmp_path_factory, small_model) -> MonaiLabelServer:
    """The server shared by the tests that do not change its model (training has its own)."""
    srv = start_server(tmp_path_factory.mktemp("slicer_server"), small_model)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def localiser_server(tmp_path_factory, small_model) -> MonaiLabelServer:
    """A server with the shipped nodule localiser beside its model."""
    from tests.support.paths import APP_DIR

    srv = start_server(tmp_path_factory.mktemp("slicer_localiser_server"), small_model,
                       APP_DIR / "model" / "pretrained_nodule_localiser.pt")
    yield srv
    srv.stop()


@pytest.fixture
def logic(scene, server):
    """The module's logic over a fresh scene, connected to the shared server."""
    from ThyroidNoduleLib import NoduleLogic

    lg = NoduleLogic(scene)
    lg.connect(server.url)
    return lg


def unconfirmed_ids() -> set:
    return {Path(r["file"]).stem for r in UNCONFIRMED}

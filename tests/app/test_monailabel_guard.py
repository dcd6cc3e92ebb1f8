"""The one guard of the MONAI Label internals the datastore and the app's routes rely on: another
MONAI Label version, or a renamed internal, stops them at start with one line naming it."""

from __future__ import annotations

import pytest

import monailabel
from thyroid_plugin.monailabel_adapter import ConfirmedCasesDatastore, MonaiLabelVersionError
from thyroid_plugin.monailabel_adapter.compat import DATASTORE_INTERNALS, ROUTE_INTERNALS, WRITTEN_FOR, require
from tests.reliability.helpers import app_lib


def test_the_installed_monailabel_is_the_one_the_adapters_were_written_for():
    assert monailabel.__version__ == WRITTEN_FOR
    require("the datastore", DATASTORE_INTERNALS)
    require("the routes", ROUTE_INTERNALS)


def test_another_version_is_refused_with_one_line_naming_both(monkeypatch):
    monkeypatch.setattr(monailabel, "__version__", "0.9.0")
    with pytest.raises(MonaiLabelVersionError) as e:
        require("the routes", ROUTE_INTERNALS)
    message = str(e.value)
    assert "\n" not in message and "0.9.0" in message and WRITTEN_FOR in message and "the routes" in message


@pytest.mark.parametrize("internals, named", [
    ({"monailabel.datastore.local:LocalDatastore": ("_init_from_datastore_file", "_renamed_in_a_release")},
     "monailabel.datastore.local.LocalDatastore._renamed_in_a_release"),
    ({"monailabel.endpoints.no_such_module": ("run",)}, "monailabel.endpoints.no_such_module"),
    ({"monailabel.datastore.local:NoSuchDatastore": ("x",)}, "monailabel.datastore.local.NoSuchDatastore"),
])
def test_a_missing_internal_is_named(internals, named):
    with pytest.raises(MonaiLabelVersionError) as e:
        require("the datastore", internals)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_the_datastore_does_not_open_on_another_version(monkeypatch, tmp_path):
    monkeypatch.setattr(monailabel, "__version__", "1.0.0")
    with pytest.raises(MonaiLabelVersionError, match="studies datastore"):
        ConfirmedCasesDatastore(str(tmp_path / "studies"))
    assert not (tmp_path / "studies").exists()  # refused before anything was written


def test_the_routes_are_not_installed_on_another_version(monkeypatch):
    from fastapi import FastAPI

    app_lib()
    from lib import routes

    monkeypatch.setattr(monailabel, "__version__", "0.8.6")
    app = FastAPI()
    with pytest.raises(MonaiLabelVersionError, match="request handling"):
        routes.install(app, known_models=lambda: {"classify_nodule"}, check_image=lambda image_id: None)
    assert not getattr(app.state, "thyroid_nodule_routes", False)


@pytest.mark.slow
def test_the_server_stops_at_start_with_one_line_on_another_version(tmp_path):
    """A real ``monailabel start_server`` whose MONAI Label reports another version (set by a
    ``sitecustomize`` before the app loads) exits with 2 and one error line, no traceback."""
    import os

    from tests.support.server import MonaiLabelServer

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import monailabel\nmonailabel.__version__ = '0.9.0'\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    server = MonaiLabelServer(tmp_path / "studies", tmp_path / "model", env={"PYTHONPATH": path},
                              log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start(timeout=180)
    log = (tmp_path / "server.log").read_text()
    errors = [line for line in log.splitlines() if "[ERROR]" in line]
    assert "Traceback" not in log
    assert len(errors) == 1 and "MONAI Label 0.9.0 is installed" in errors[0] and WRITTEN_FOR in errors[0], log

"""Fixtures of the reliability tests: one shared real server for the tests that do not break it
(hostile input, fuzzing, load, the retrain under load), and the app's ``lib`` on the path."""

from __future__ import annotations

import pytest

from tests.support.server import MonaiLabelServer

from .helpers import app_lib, make_model_dir, make_studies, rows

app_lib()

#: the shared server's settings: an upload cap of 24 MiB (a model file fits) and a short inference queue, so that
#: the limits are reached quickly in tests
SHARED_CONF = {"max_upload_mb": 24, "infer_queue": 4}


@pytest.fixture(scope="package")
def shared_server(tmp_path_factory, small_model):
    """A real server on the small model: 8 confirmed DDTI cases (4 benign, 4 malignant, enough
    to retrain) and 4 unconfirmed ones."""
    root = tmp_path_factory.mktemp("shared_server")
    studies = make_studies(root, rows(4, 4, offset=8), rows(2, 2, offset=12))
    srv = MonaiLabelServer(studies, make_model_dir(root, small_model), conf=SHARED_CONF, log_path=root / "server.log")
    srv.start()
    srv.root = root
    yield srv
    srv.stop()

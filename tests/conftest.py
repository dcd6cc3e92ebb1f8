"""Fixtures shared by all test suites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.paths import require_data


@pytest.fixture(scope="session", autouse=True)
def _shared_data():
    require_data()


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A model file of the default network, trained for one epoch on real DDTI images at 64x64."""
    from tests.support.models import train_small_model

    return train_small_model(tmp_path_factory.mktemp("small_model"))


@pytest.fixture(scope="session")
def other_small_model(tmp_path_factory) -> Path:
    """A second, different model file (another seed, two epochs)."""
    from tests.support.models import train_small_model

    return train_small_model(tmp_path_factory.mktemp("other_small_model"), epochs=2, seed=1)


@pytest.fixture
def model_dir(tmp_path, small_model) -> Path:
    """An app model folder whose shipped ("pretrained") model is :func:`small_model`."""
    d = tmp_path / "model"
    d.mkdir()
    shutil.copyfile(small_model, d / "pretrained_classify_nodule.pt")
    return d

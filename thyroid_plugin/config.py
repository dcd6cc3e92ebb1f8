"""The bundle configs in ``configs/`` (MONAI bundle format), read by the CLI, the MONAI Label app
and ``python -m monai.bundle run`` alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from monai.bundle import ConfigParser

__all__ = ["config_dir", "config_path", "load_config"]


def config_dir() -> Path:
    """``$THYROID_NODULE_CONFIGS`` if set, else the repository's ``configs/`` folder."""
    env = os.environ.get("THYROID_NODULE_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def config_path(name: str) -> Path:
    """``train``/``inference``/``metadata`` -> the file in :func:`config_dir`; a path stays a path."""
    p = Path(name)
    if p.suffix in (".json", ".yaml", ".yml"):
        return p
    return config_dir() / f"{name}.json"


def load_config(
    name_or_path: Union[str, os.PathLike] = "train", overrides: Optional[Mapping[str, Any]] = None
) -> ConfigParser:
    """A :class:`monai.bundle.ConfigParser` of a config with ``overrides`` applied.

    Args:
        name_or_path: ``"train"``, ``"inference"`` or a config file.
        overrides: ``{"training#epochs": 3, "dataset": "x.csv", ...}`` (MONAI ``#`` ids);
            ``None`` values are skipped.

    Raises:
        FileNotFoundError: the config file does not exist.
    """
    path = config_path(os.fspath(name_or_path))
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    parser = ConfigParser()
    parser.read_config(str(path))
    meta = config_dir() / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    for key, value in (overrides or {}).items():
        if value is not None:
            parser[key] = value
    return parser

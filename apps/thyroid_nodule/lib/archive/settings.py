"""The archive datastore built from the app's ``--conf`` settings.

``--conf`` keys (all optional):

- ``archive_cache``: local cache folder (default ``~/.cache/thyroid_nodule/archive/<hash of the URL>``);
- ``archive_cache_mb``: its size bound in MiB (default 1024);
- ``archive_timeout``: seconds to wait for the archive's answer (default 20; connections 3);
- ``archive_refresh_s``: list the archive again when the last listing is older (default 30).
- ``archive_result_queue``: single classification results waiting to be written to the archive,
  at most (default 64; see :mod:`.results`).

Credentials: the environment (see :mod:`.client`), never ``--conf`` or the URL in a log.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Dict

import thyroid_plugin

from .client import redact
from .datastore import ArchiveDatastore
from .results import DEFAULT_MAX_WAITING

logger = logging.getLogger(__name__)


def _number(conf: Dict[str, str], key: str, default: float) -> float:
    try:
        value = float(conf.get(key, default))
    except (TypeError, ValueError):
        raise ValueError(f"--conf {key} must be a number, got {conf.get(key)!r}") from None
    if value <= 0:
        raise ValueError(f"--conf {key} must be positive, got {value:g}")
    return value


def archive_datastore(url: str, conf: Dict[str, str]) -> ArchiveDatastore:
    url = url.strip().rstrip("/")
    key = hashlib.sha256(redact(url).encode()).hexdigest()[:12]
    default_cache = os.path.join(os.path.expanduser("~"), ".cache", "thyroid_nodule", "archive", key)
    cache = conf.get("archive_cache") or default_cache
    store = ArchiveDatastore(url, cache_dir=cache, cache_mb=int(_number(conf, "archive_cache_mb", 1024)),
                             timeout=_number(conf, "archive_timeout", 20.0),
                             refresh_s=_number(conf, "archive_refresh_s", 30.0),
                             result_queue=int(_number(conf, "archive_result_queue", DEFAULT_MAX_WAITING)),
                             software_version=thyroid_plugin.__version__)
    logger.info("archive: %s (cache %s, at most %d MiB)", store.client.url, cache, store.cache.max_bytes >> 20)
    return store

"""Atomic file writes: readers, and a restart after a crash, see the old file or the whole new one.

The writers put the bytes in a hidden temporary file next to the destination
(``.<name>.<random>.partial``, see :func:`is_partial_file`), flush it to disk and rename it
over the destination; a failure (a full disk) removes the temporary file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from .image import PathLike

__all__ = ["PARTIAL_SUFFIX", "atomic_copy_file", "atomic_write_bytes", "atomic_write_json", "is_partial_file",
           "json_safe", "process_umask"]


#: suffix of the temporary files the atomic writers below create next to their destination
#: (``.<name>.<random>.partial``): hidden, and matching no image pattern, so a crash that leaves
#: one behind never makes it look like a finished file (see :func:`is_partial_file`).
PARTIAL_SUFFIX = ".partial"


def is_partial_file(name: str) -> bool:
    """Whether a file name is a temporary file of the atomic writers (current or older naming)."""
    base = os.path.basename(name)
    return base.startswith(".") and (base.endswith(PARTIAL_SUFFIX) or base.startswith(".tmp-"))


def _atomic_write(path: PathLike, write, before_replace=None) -> None:
    """Write a file next to ``path`` with ``write(fp)``, flush it to disk, then rename it over
    ``path``: readers (and a restart after a crash) see the old file or the whole new one.
    ``before_replace()``, if given, runs once the new file is complete; if it raises, ``path``
    is left as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:96]}.", suffix=PARTIAL_SUFFIX, dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def process_umask() -> int:
    """The process's file mode creation mask, read without changing it.

    Linux reports it in ``/proc/self/status`` (``Umask:``, read each time: cheap, and current).
    Without ``/proc`` the only way is to set it and set it back, which for that instant changes
    it for every thread, so that is done once and remembered."""
    global _UMASK_WITHOUT_PROC
    mask = _umask_from_proc()
    if mask is not None:
        return mask
    if _UMASK_WITHOUT_PROC is None:
        _UMASK_WITHOUT_PROC = os.umask(0o022)
        os.umask(_UMASK_WITHOUT_PROC)
    return _UMASK_WITHOUT_PROC


_UMASK_WITHOUT_PROC: Optional[int] = None


def _umask_from_proc() -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fp:
            for line in fp:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The bytes go to a temporary ``.<name>.<random>.partial`` file in the same folder first
    (removed if writing fails, e.g. when the disk is full), are flushed to disk, and the file is
    then renamed over ``path``."""
    _atomic_write(path, lambda fp: fp.write(data))


def atomic_copy_file(src: PathLike, dst: PathLike, before_replace=None) -> None:
    """Copy ``src`` to ``dst`` atomically (like :func:`atomic_write_bytes`, streaming).

    Args:
        before_replace: called when the copy is complete and flushed, just before it replaces
            ``dst`` (e.g. to record it somewhere first); if it raises, ``dst`` is left as it was
            and the copy is removed.
    """

    def write(fp) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fp, 1 << 20)

    _atomic_write(dst, write, before_replace)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def atomic_write_json(path: PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically; NaN and infinity become ``null``."""
    atomic_write_bytes(path, json.dumps(json_safe(payload), indent=2).encode())

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

__all__ = ["PARTIAL_SUFFIX", "StagedFile", "atomic_copy_file", "atomic_write_bytes", "atomic_write_json", "is_partial_file",
           "json_safe", "process_umask", "stage_copy", "sync_directory", "transient_file"]


#: suffix of the temporary files the atomic writers below create next to their destination
#: (``.<name>.<random>.partial``): hidden, and matching no image pattern, so a crash that leaves
#: one behind never makes it look like a finished file (see :func:`is_partial_file`).
PARTIAL_SUFFIX = ".partial"


def is_partial_file(name: str) -> bool:
    """Whether a file name is a temporary file of the atomic writers (current or older naming)."""
    base = os.path.basename(name)
    return base.startswith(".") and (base.endswith(PARTIAL_SUFFIX) or base.startswith(".tmp-"))


class StagedFile:
    """A new version of ``path``, complete and flushed to disk under a hidden temporary name
    next to it (``.<name>.<random>.partial``), waiting to replace ``path``.

    :meth:`commit` renames it over ``path`` (readers, and a restart after a crash, see the old
    file or the whole new one); :meth:`discard` removes it. Staging several files before
    committing any lets a caller record them all in one write (see the datastore's
    ``save_labels``). If ``write(fp)`` fails (a full disk) nothing is left behind.
    """

    def __init__(self, path: PathLike, write) -> None:
        self.path = os.fspath(path)
        self.directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)[:96]}.", suffix=PARTIAL_SUFFIX,
                                        dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fp:
                os.fchmod(fp.fileno(), 0o666 & ~process_umask())  # mkstemp makes 0600; give the usual permissions
                write(fp)
                fp.flush()
                os.fsync(fp.fileno())
        except BaseException:
            self.discard()
            raise

    def commit(self, sync: bool = True) -> None:
        """Rename the staged file over ``path``; with ``sync`` make the rename durable
        (callers committing many files into one folder sync it once, see :func:`sync_directory`)."""
        os.replace(self.tmp, self.path)
        if sync:
            sync_directory(self.directory)

    def discard(self) -> None:
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def stage_copy(src: PathLike, dst: PathLike) -> StagedFile:
    """A :class:`StagedFile` holding a copy of ``src``, waiting to replace ``dst``."""
    return StagedFile(dst, _copier(src))


def _copier(src: PathLike):
    def write(fp) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fp, 1 << 20)

    return write


def _atomic_write(path: PathLike, write, before_replace=None) -> None:
    """Write a file next to ``path`` with ``write(fp)``, flush it to disk, then rename it over
    ``path``: readers (and a restart after a crash) see the old file or the whole new one.
    ``before_replace()``, if given, runs once the new file is complete; if it raises, ``path``
    is left as it was."""
    staged = StagedFile(path, write)
    try:
        if before_replace is not None:
            before_replace()
        os.replace(staged.tmp, staged.path)
    except BaseException:
        staged.discard()
        raise
    sync_directory(staged.directory)


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


def sync_directory(directory: PathLike) -> None:
    """Make renames in ``directory`` durable (best effort: not every file system allows it)."""
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
    _atomic_write(dst, _copier(src), before_replace)


def transient_file(data: bytes, suffix: str, prefix: str) -> str:
    """A new temporary file holding ``data``, for a reader that copies it into place atomically
    and durably itself (the datastore) or streams it back and deletes it (MONAI Label's answer):
    not flushed to disk, not renamed. The caller deletes it; if writing fails nothing is left.

    Returns:
        its path (ending in ``suffix``).
    """
    fd, path = tempfile.mkstemp(suffix=suffix, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
    except BaseException:
        os.unlink(path)
        raise
    return path


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

"""Freed C heap memory handed back to the system after a request."""

from __future__ import annotations

import os
from typing import Optional


def then_release_memory(fn, *args):
    """``fn(*args)``, then the C heap's free pages handed back to the system when the request
    left much of them: a large frame's buffers are freed by then, but glibc keeps them mapped in
    its per-thread arenas, so the server's resident memory would stay at its peak."""
    try:
        return fn(*args)
    finally:
        release_memory()


# Trimming after every request would also hand back the activations that the next forward pass
# reuses (the predictor keeps them on purpose: ~10,000 page faults and ~25 ms a frame when they
# are faulted in again), so the heap is trimmed only when resident memory stands this far above
# where the last trim (or the first request) left it.
TRIM_ABOVE_BYTES = 192 << 20
_RSS_AFTER_TRIM: Optional[int] = None


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as fp:
            return int(fp.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Return freed C heap memory to the system (glibc ``malloc_trim``; a no-op elsewhere) when
    resident memory is :data:`TRIM_ABOVE_BYTES` above where the last trim left it."""
    global _MALLOC_TRIM, _RSS_AFTER_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if not _MALLOC_TRIM:
        return
    rss = _resident_bytes()
    if _RSS_AFTER_TRIM is not None and rss <= _RSS_AFTER_TRIM + TRIM_ABOVE_BYTES:
        return
    _MALLOC_TRIM(0)
    _RSS_AFTER_TRIM = _resident_bytes()


_MALLOC_TRIM = None

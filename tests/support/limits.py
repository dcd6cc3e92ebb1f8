"""Process limits that simulate storage faults."""

from __future__ import annotations

import resource
import signal
from typing import Callable


def file_size_limit(max_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` after which every write past ``max_bytes`` fails with EFBIG, as writes
    fail on a full disk (SIGXFSZ ignored so the write returns the error instead of killing)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply

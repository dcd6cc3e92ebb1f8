"""Single classification results written to the archive in the background.

A classification by archive id answers as soon as its result is computed; the result SR and its
saliency object are then written by one worker thread from a bounded queue, so the answer never
waits for the archive. What can go wrong is counted (``/info``, ``datastore.archive.results``)
and logged, never raised into a request:

- the queue is full (the archive is slower than the classifications): the result is ``dropped``;
- the archive is down or times out (503/504): the write is tried again after a pause (``retries``
  times, the pause doubling), then the result is ``failed``;
- the archive refuses or errs (502): the result is ``failed`` at once, with the message in
  ``last_error``.

A dropped or failed result is written by the next classification of the frame, or by a batch
(which skips frames whose result by the served model the archive holds). Each write is a STOW-RS
of complete objects (see :meth:`ArchiveDatastore.store_result`), so a result is in the archive
whole or not at all. When the server stops, the results still waiting are written for at most
``flush_seconds`` more; what is left then is logged as not written (``lost_at_exit``).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from .client import ArchiveError

logger = logging.getLogger(__name__)

#: results waiting to be written, at most (``--conf archive_result_queue``)
DEFAULT_MAX_WAITING = 64
#: archive answers worth another try: unreachable or too slow
TRANSIENT = (503, 504)


class ResultWriter:
    """A bounded queue of results and the one thread that writes them.

    Args:
        write: ``write(image_id, result, mask_bytes)`` stores one result (``True``) or finds this
            model's result for the frame already stored (``False``); raises on failure.
        max_waiting: queue bound; a result submitted to a full queue is dropped.
        retries: further tries of a write the archive did not take for a transient reason
            (:data:`TRANSIENT`), after ``retry_seconds``, then twice that, ...
        flush_seconds: at interpreter exit (the server stopping), how long the waiting results
            may still take to be written.
    """

    def __init__(self, write: Callable[[str, Dict[str, Any], bytes], bool], max_waiting: int = DEFAULT_MAX_WAITING,
                 retries: int = 2, retry_seconds: float = 2.0, flush_seconds: float = 15.0) -> None:
        self._write = write
        self.retries = max(0, int(retries))
        self.retry_seconds = float(retry_seconds)
        self.flush_seconds = float(flush_seconds)
        self._exiting = threading.Event()
        self.max_waiting = max(1, int(max_waiting))  # (a Queue of size 0 would be unbounded)
        self._queue: "queue.Queue[Tuple[Tuple[str, str], Dict[str, Any], bytes]]" = queue.Queue(maxsize=self.max_waiting)
        self._pending: set = set()  # (model, image id) queued or being written
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._counts = {"stored": 0, "already_stored": 0, "failed": 0, "dropped": 0, "retried": 0, "lost_at_exit": 0}
        self._last_error: Optional[str] = None

    def submit(self, image_id: str, result: Dict[str, Any], mask: bytes) -> bool:
        """Queue ``result`` (the REST answer's JSON, with ``model``) and ``mask`` (the returned
        mask file's bytes) of ``image_id``; ``False`` when it was not queued (the same model's
        result for the frame is queued already, or the queue is full)."""
        key = (str(result["model"]), image_id)
        with self._lock:
            if key in self._pending:
                return False
            try:
                self._queue.put_nowait((key, result, mask))
            except queue.Full:
                self._counts["dropped"] += 1
                self._last_error = (f"{self.max_waiting} results were waiting for the archive: the result of "
                                    f"{image_id} was not written")
                logger.warning("%s", self._last_error)
                return False
            self._pending.add(key)
            if self._thread is None:  # started with the first result: nothing runs at construction
                self._thread = threading.Thread(target=self._run, daemon=True, name="archive-results")
                self._thread.start()
                atexit.register(self._at_exit)
        return True

    def _run(self) -> None:
        while True:
            key, result, mask = self._queue.get()
            model, image_id = key
            outcome, error = self._write_with_retries(model, image_id, result, mask)
            if error is not None:
                logger.warning("the result of %s for %s was not written to the archive: %s", model, image_id, error)
            with self._lock:
                self._pending.discard(key)
                self._counts[outcome] += 1
                if error is not None:
                    self._last_error = error
            self._queue.task_done()

    def _write_with_retries(self, model: str, image_id: str, result: Dict[str, Any], mask: bytes):
        """``(outcome, error or None)`` of writing one result, transient failures tried again."""
        pause = self.retry_seconds
        for attempt in range(self.retries + 1):
            try:
                return ("stored" if self._write(image_id, result, mask) else "already_stored"), None
            except ArchiveError as e:
                if e.status_code not in TRANSIENT or attempt == self.retries or self._exiting.is_set():
                    return "failed", e.detail
                logger.info("the archive did not take the result of %s for %s (%s); trying again in %.0f s",
                            model, image_id, e.detail, pause)
                with self._lock:
                    self._counts["retried"] += 1
                self._exiting.wait(pause)
                pause *= 2
            except Exception as e:  # the worker must outlive any one result
                logger.exception("writing the result of %s for %s failed", model, image_id)
                return "failed", f"{type(e).__name__}: {e}"[:300]
        return "failed", "no attempt made"

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for every queued result to be written (or to fail);
        returns how many are still queued or being written."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._lock:
                left = len(self._pending)
            if left == 0 or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def _at_exit(self) -> None:
        left = self.flush(self.flush_seconds) if self._pending else 0
        self._exiting.set()
        if left:
            with self._lock:
                self._counts["lost_at_exit"] += left
            logger.warning("%d classification results were not written to the archive before the server stopped "
                           "(a batch over the archive writes them)", left)

    def status(self) -> Dict[str, Any]:
        """``waiting`` (queued, not yet taken by the worker), ``writing`` (queued or being
        written), the counts since the start, the bound and the last failure."""
        with self._lock:
            return {"waiting": self._queue.qsize(), "writing": len(self._pending), **self._counts,
                    "max_waiting": self.max_waiting, "last_error": self._last_error}

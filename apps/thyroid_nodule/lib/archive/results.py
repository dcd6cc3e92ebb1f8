"""Single classification results written to the archive in the background.

A classification by archive id answers as soon as its result is computed; the result SR and its
saliency object are then written by one worker thread from a bounded queue, so the answer never
waits for the archive. What can go wrong is counted (``/info``, ``datastore.archive.results``)
and logged, never raised into a request:

- the queue is full (the archive is slower than the classifications): the result is ``dropped``;
- the archive fails or refuses (down, timeout, error): the result is ``failed``, with the message
  in ``last_error``.

Neither is retried: the next classification of the frame, or a batch, writes it. Each write is a
STOW-RS of complete objects (see :meth:`ArchiveDatastore.store_result`); results still waiting
when the server stops are not written.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from .client import ArchiveError

logger = logging.getLogger(__name__)

#: results waiting to be written, at most (``--conf archive_result_queue``)
DEFAULT_MAX_WAITING = 64


class ResultWriter:
    """A bounded queue of results and the one thread that writes them.

    Args:
        write: ``write(image_id, result, mask_bytes)`` stores one result (``True``) or finds this
            model's result for the frame already stored (``False``); raises on failure.
        max_waiting: queue bound; a result submitted to a full queue is dropped.
    """

    def __init__(self, write: Callable[[str, Dict[str, Any], bytes], bool], max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        self._write = write
        self.max_waiting = max(1, int(max_waiting))  # (a Queue of size 0 would be unbounded)
        self._queue: "queue.Queue[Tuple[Tuple[str, str], Dict[str, Any], bytes]]" = queue.Queue(maxsize=self.max_waiting)
        self._pending: set = set()  # (model, image id) queued or being written
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._counts = {"stored": 0, "already_stored": 0, "failed": 0, "dropped": 0}
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
        return True

    def _run(self) -> None:
        while True:
            key, result, mask = self._queue.get()
            model, image_id = key
            error = None
            try:
                outcome = "stored" if self._write(image_id, result, mask) else "already_stored"
            except ArchiveError as e:
                outcome, error = "failed", e.detail
            except Exception as e:  # the worker must outlive any one result
                logger.exception("writing the result of %s for %s failed", model, image_id)
                outcome, error = "failed", f"{type(e).__name__}: {e}"[:300]
            if error is not None:
                logger.warning("the result of %s for %s was not written to the archive: %s", model, image_id, error)
            with self._lock:
                self._pending.discard(key)
                self._counts[outcome] += 1
                if error is not None:
                    self._last_error = error
            self._queue.task_done()

    def status(self) -> Dict[str, Any]:
        """``waiting`` (queued, not yet taken by the worker), ``writing`` (queued or being
        written), the counts since the start, the bound and the last failure."""
        with self._lock:
            return {"waiting": self._queue.qsize(), "writing": len(self._pending), **self._counts,
                    "max_waiting": self.max_waiting, "last_error": self._last_error}

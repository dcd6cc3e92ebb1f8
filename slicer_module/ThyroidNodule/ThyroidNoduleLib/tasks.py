"""Run network calls in worker threads and hand their results back to the main thread.

Qt widgets and MRML nodes must only be touched from the main (GUI) thread. :class:`BackgroundTasks`
runs a function in a thread pool; the main thread calls :meth:`BackgroundTasks.poll` (in Slicer
from a ``qt.QTimer``), which calls each finished task's ``on_done(result)`` or
``on_error(exception)`` *in the polling thread*. Nothing here imports Qt, so the same code runs
in tests.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

__all__ = ["BackgroundTasks"]

logger = logging.getLogger(__name__)


@dataclass
class _Task:
    name: str
    future: concurrent.futures.Future
    on_done: Optional[Callable[[Any], None]]
    on_error: Optional[Callable[[BaseException], None]]


class BackgroundTasks:
    """A small thread pool whose completions are delivered by polling.

    Args:
        max_workers: threads (2: a long request, e.g. classification, does not block a status
            poll).
    """

    def __init__(self, max_workers: int = 2) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ThyroidNodule")
        self._tasks: List[_Task] = []
        self._lock = threading.Lock()

    def submit(self, name: str, fn: Callable[[], Any], on_done: Optional[Callable[[Any], None]] = None,
               on_error: Optional[Callable[[BaseException], None]] = None) -> concurrent.futures.Future:
        """Run ``fn()`` in a worker thread; its outcome is delivered by a later :meth:`poll`.

        Args:
            name: names the task (see :meth:`busy`).
            fn: the work; must not touch Qt or the MRML scene.
            on_done: called with ``fn``'s return value, in the polling thread.
            on_error: called with the exception ``fn`` raised, in the polling thread.
        """
        future = self._executor.submit(fn)
        with self._lock:
            self._tasks.append(_Task(name, future, on_done, on_error))
        return future

    def busy(self, name: Optional[str] = None) -> bool:
        """Whether a task (named ``name``, or any) has not been delivered yet."""
        with self._lock:
            return any(name is None or t.name == name for t in self._tasks)

    def pending(self) -> Dict[str, int]:
        """Undelivered tasks per name."""
        counts: Dict[str, int] = {}
        with self._lock:
            for t in self._tasks:
                counts[t.name] = counts.get(t.name, 0) + 1
        return counts

    def poll(self) -> int:
        """Deliver every finished task's outcome in the calling thread; returns how many."""
        finished: List[_Task] = []
        running: List[_Task] = []
        with self._lock:
            for t in self._tasks:  # done() read once per task: one that finishes meanwhile is kept
                (finished if t.future.done() else running).append(t)
            self._tasks = running
        for task in finished:
            try:
                error = task.future.exception()
            except concurrent.futures.CancelledError as e:
                error = e
            try:
                if error is not None:
                    if task.on_error is not None:
                        task.on_error(error)
                    else:
                        logger.error("task %s failed: %s", task.name, error)
                elif task.on_done is not None:
                    task.on_done(task.future.result())
            except Exception:  # a failing callback must not stop the others from being delivered
                logger.exception("the completion handler of task %s failed", task.name)
        return len(finished)

    def shutdown(self) -> None:
        """Stop accepting tasks; running ones finish in the background, none is delivered."""
        with self._lock:
            self._tasks = []
        self._executor.shutdown(wait=False, cancel_futures=True)

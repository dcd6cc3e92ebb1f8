"""Worker threads for network calls: results and errors are delivered in the polling (main)
thread, never in the worker, and one failing handler does not lose the others."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from .helpers import wait_for


def test_results_and_errors_are_delivered_in_the_polling_thread():
    from ThyroidNoduleLib import BackgroundTasks, ServerTimeoutError

    tasks = BackgroundTasks()
    release = threading.Event()
    delivered = []
    main = threading.get_ident()

    def slow():
        release.wait(10)
        return threading.get_ident()

    def failing():
        raise ServerTimeoutError("The server did not answer within 1 s.", 1.0)

    tasks.submit("classify", slow, on_done=lambda worker: delivered.append(("done", worker, threading.get_ident())))
    tasks.submit("status", failing, on_error=lambda e: delivered.append(("error", type(e).__name__, threading.get_ident())))
    wait_for(lambda: tasks.poll() or delivered, timeout=10, interval=0.05, what="the failing task")
    assert delivered == [("error", "ServerTimeoutError", main)]
    assert tasks.busy("classify") and not tasks.busy("status")
    assert tasks.pending() == {"classify": 1}

    release.set()
    wait_for(lambda: tasks.poll() or len(delivered) == 2, timeout=10, interval=0.05, what="the slow task")
    kind, worker, caller = delivered[1]
    assert kind == "done" and worker != main and caller == main
    assert not tasks.busy()
    tasks.shutdown()


def test_a_failing_handler_does_not_stop_other_deliveries():
    from ThyroidNoduleLib import BackgroundTasks

    tasks = BackgroundTasks()
    delivered = []

    def broken_handler(_):
        raise RuntimeError("bug in a handler")

    tasks.submit("a", lambda: 1, on_done=broken_handler)
    tasks.submit("b", lambda: 2, on_done=delivered.append)
    deadline = time.monotonic() + 10
    while tasks.busy() and time.monotonic() < deadline:
        tasks.poll()
        time.sleep(0.02)
    assert delivered == [2] and not tasks.busy()
    tasks.shutdown()


def test_nothing_is_delivered_after_shutdown():
    from ThyroidNoduleLib import BackgroundTasks

    tasks = BackgroundTasks()
    delivered = []
    future = tasks.submit("x", lambda: 1, on_done=delivered.append)
    future.result(timeout=10)
    tasks.shutdown()
    assert tasks.poll() == 0 and delivered == []
    with pytest.raises(RuntimeError):
        tasks.submit("y", lambda: 2)


class _FinishesWhileObserved(concurrent.futures.Future):
    """A completed future that reports "not done" the first time it is asked: a task that
    finishes between two looks at it."""

    def __init__(self, result):
        super().__init__()
        self.set_result(result)
        self._looks = 0

    def done(self):
        self._looks += 1
        return self._looks > 1


def test_a_task_finishing_during_poll_is_delivered_exactly_once(monkeypatch):
    from ThyroidNoduleLib import BackgroundTasks

    tasks = BackgroundTasks()
    future = _FinishesWhileObserved("result")
    monkeypatch.setattr(tasks._executor, "submit", lambda fn: future)
    delivered = []
    tasks.submit("classify", lambda: None, on_done=delivered.append)

    assert tasks.poll() == 0 and tasks.busy("classify")  # not finished at the first look: kept
    assert tasks.poll() == 1 and delivered == ["result"]
    assert not tasks.busy() and tasks.poll() == 0 and delivered == ["result"]
    tasks.shutdown()

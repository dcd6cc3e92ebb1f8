"""The background writer of single classification results (``lib.archive.results``), with a
write function standing in for the archive's STOW-RS: what is retried, what is counted, and
what a stopping server still writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

from tests.pacs.conftest import wait_until

RESULT = {"model": "sha256:0123456789abcdef", "label": "benign"}


def writer(write, **kw):
    from lib.archive.results import ResultWriter

    return ResultWriter(write, **{"retry_seconds": 0.01, **kw})


def test_an_archive_that_is_down_is_tried_again_and_then_takes_the_result():
    from lib.archive.client import ArchiveError

    calls = []

    def write(image_id, result, mask):
        calls.append(image_id)
        if len(calls) < 3:
            raise ArchiveError(503 if len(calls) == 1 else 504, "the archive is unreachable")
        return True

    w = writer(write, retries=2)
    assert w.submit("1.2.3", dict(RESULT), b"mask")
    wait_until(lambda: w.status()["writing"] == 0, "the result written")
    status = w.status()
    assert calls == ["1.2.3"] * 3
    assert (status["stored"], status["retried"], status["failed"]) == (1, 2, 0)


def test_a_refusal_is_not_retried_and_a_lasting_outage_ends_as_failed():
    from lib.archive.client import ArchiveError

    refused, down = [], []

    def write(image_id, result, mask):
        (refused if image_id == "1.1" else down).append(image_id)
        raise ArchiveError(502 if image_id == "1.1" else 503, f"no for {image_id}")

    w = writer(write, retries=2)
    w.submit("1.1", dict(RESULT), b"m")
    w.submit("2.2", dict(RESULT), b"m")
    wait_until(lambda: w.status()["writing"] == 0, "both results given up")
    status = w.status()
    assert len(refused) == 1 and len(down) == 3
    assert status["failed"] == 2 and status["stored"] == 0 and status["last_error"] == "no for 2.2"


def test_flush_waits_for_the_queued_results():
    release = threading.Event()
    written = []

    def write(image_id, result, mask):
        release.wait(5)
        written.append(image_id)
        return True

    w = writer(write)
    for uid in ("1.1", "1.2", "1.3"):
        assert w.submit(uid, dict(RESULT), b"m")
    assert w.flush(0.2) == 3  # the archive is slow: nothing written yet, the flush gives up in time
    release.set()
    assert w.flush(10) == 0 and written == ["1.1", "1.2", "1.3"]


def test_a_stopping_process_writes_its_waiting_results_first(tmp_path):
    """The interpreter exits (as the server does on SIGTERM) with results queued: they are
    written before it ends, within ``flush_seconds``; one that cannot be is logged as lost."""
    from tests.support.paths import APP_DIR  # the app's lib on the child's sys.path

    out = tmp_path / "written.txt"
    script = textwrap.dedent(f"""
        import logging, sys, time
        sys.path.insert(0, {str(APP_DIR)!r})
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        from lib.archive.results import ResultWriter

        def write(image_id, result, mask):
            time.sleep(0.3 if image_id != "9.9" else 60)
            with open({str(out)!r}, "a") as fp:
                fp.write(image_id + "\\n")
            return True

        w = ResultWriter(write, flush_seconds=3)
        for uid in ("1.1", "1.2", "9.9"):
            w.submit(uid, {{"model": "m"}}, b"")
        print("exiting", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert out.read_text().split() == ["1.1", "1.2"]
    assert "1 classification results were not written to the archive" in run.stderr

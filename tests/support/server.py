"""A real ``monailabel start_server`` process with the app, on a free loopback port."""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import requests

from .paths import APP_DIR, PYTHON, REPO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MonaiLabelServer:
    """Start/stop/restart the server; ``url`` is its base address.

    Args:
        studies: the studies folder.
        model_dir: the app's model folder (``--conf model_dir``).
        conf: further ``--conf`` key/values. ``compile`` defaults to ``off`` here: every test
            server would otherwise spend a minute of both CPU cores compiling in the background
            (the shipped setting, ``background``, has its own test in ``tests/app/test_compile.py``).
        env: extra environment variables (e.g. MONAI Label auth settings).
        preexec_fn: run in the server process before it starts (e.g. resource limits).
    """

    def __init__(self, studies: Path, model_dir: Path, conf: Optional[dict] = None, env: Optional[dict] = None,
                 log_path: Optional[Path] = None, preexec_fn: Optional[Callable[[], None]] = None) -> None:
        self.studies = Path(studies)
        self.model_dir = Path(model_dir)
        self.conf = {"compile": "off", **dict(conf or {})}
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else self.studies.parent / f"server-{self.port}.log"
        self.preexec_fn = preexec_fn
        self.process: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        cmd = [str(PYTHON), "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(self.studies),
               "--host", "127.0.0.1", "--port", str(self.port), "--conf", "model_dir", str(self.model_dir)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        return cmd

    def start(self, timeout: float = 180.0) -> "MonaiLabelServer":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MONAI_LABEL_TRACKING_ENABLED": "false", **self.env}
        env.pop("MONAI_LABEL_APP_CONF", None)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), cwd=str(REPO), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=self.preexec_fn)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; log: {self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=2).status_code in (200, 401):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout}s; log: {self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)  # the server and its train/batch subprocesses
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        self.stop(sig=signal.SIGKILL)

    def restart(self) -> "MonaiLabelServer":
        self.stop()
        return self.start()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "MonaiLabelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for_batch(url: str, timeout: float = 600.0) -> dict:
    """Poll ``GET /batch/infer`` until the background batch task is ``DONE`` or ``ERROR`` (or
    ``timeout`` seconds pass); returns the last status answer."""
    deadline = time.time() + timeout
    while True:
        status = requests.get(f"{url}/batch/infer", timeout=60).json()
        if status["status"] in ("DONE", "ERROR") or time.time() > deadline:
            return status
        time.sleep(1)


def parse_multipart(response: requests.Response) -> tuple[dict, bytes]:
    """(params JSON, image bytes) of an ``output=all`` answer."""
    raw = b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    params, image = None, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "params":
            params = json.loads(part.get_content())
        elif name == "image":
            image = part.get_payload(decode=True)
    return params, image

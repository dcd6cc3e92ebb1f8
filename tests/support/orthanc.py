"""A real Orthanc with its DICOMweb plugin, started on free loopback ports for a test.

Orthanc and the plugin come from Debian's packages (``orthanc``, ``orthanc-dicomweb``), which
``scripts/setup_pacs.sh`` installs. One JSON configuration per instance: temporary storage and
index folders, free HTTP and DICOM ports, ``RemoteAccessAllowed: false`` (loopback only), the
DICOMweb plugin enabled. Stopped by its process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import requests

from .server import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def orthanc_available() -> Optional[str]:
    """``None`` when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    if not os.access(ORTHANC, os.X_OK):
        return f"Orthanc is not installed ({ORTHANC}); run scripts/setup_pacs.sh"
    if not os.path.isfile(DICOMWEB_PLUGIN):
        return f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}); run scripts/setup_pacs.sh"
    return None


class OrthancServer:
    """Start/stop an Orthanc; ``dicomweb`` is its DICOMweb root (``http://127.0.0.1:PORT/dicom-web``).

    Args:
        root: a folder for its storage, index, configuration and log.
        users: ``{name: password}``: HTTP basic authentication on (off when empty).
    """

    def __init__(self, root: Path, users: Optional[dict] = None) -> None:
        self.root = Path(root)
        self.users = dict(users or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.root / "orthanc.log"

    def config(self) -> dict:
        return {
            "Name": f"TEST{self.http_port}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "THYROIDTEST",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "HttpTimeout": 30,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
            "StableAge": 1,
        }

    def start(self, timeout: float = 30.0) -> "OrthancServer":
        missing = orthanc_available()
        if missing:
            raise RuntimeError(missing)
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([ORTHANC, str(config_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        auth = next(iter(self.users.items()), None)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.tail()}")
            try:
                if requests.get(f"{self.url}/system", auth=auth, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout}s: {self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        self.process = None
        self._log.close()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted by the kernel, never answered."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

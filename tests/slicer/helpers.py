"""Helpers of the Slicer-module tests: Slicer-like image loading, fake HTTP servers, polling."""

from __future__ import annotations

import http.server
import json
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import vtk

from tests.support.paths import REPO

MODULE_DIR = REPO / "slicer_module" / "ThyroidNodule"
LIB_DIR = MODULE_DIR / "ThyroidNoduleLib"
EXAMPLE = REPO / "slicer_module" / "examples" / "classify_with_slicer_core.py"

#: Slicer's geometry of a PNG/JPEG frame: 1 mm pixels at the origin, LPS axes (RAS diag(-1, -1, 1))
RASTER_IJK_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def new_scene():
    """An MRML scene like the application's: default colour tables and three slice views."""
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLColorLogic().SetMRMLScene(scene)
    for name in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetName(f"SliceComposite{name}")
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    return scene


def matrix(node) -> np.ndarray:
    """A volume's IJKToRAS as a (4, 4) array."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def set_matrix(node, a: np.ndarray) -> None:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    node.SetIJKToRASMatrix(m)


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str):
    """A scalar ((K, J, I) array) or vector ((K, J, I, C) array) volume node, as slicer.util does."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if array.ndim == 4 else "vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    set_matrix(node, ijk_to_ras)
    return node


def load_like_slicer(scene, path: Path, name: Optional[str] = None):
    """Load a PNG/JPEG as 3D Slicer does (gray -> scalar, colour -> vector volume, one slice,
    1 mm pixels at the origin, LPS axes), reading the pixels with Pillow."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB") if im.mode not in ("L", "LA") else im.convert("L"))
    return add_volume(scene, array[None], RASTER_IJK_TO_RAS, name or Path(path).stem)


def save_with_slicer(scene, node, path: Path, compress: bool = True) -> Path:
    """Write ``node`` with Slicer's own writer (vtkMRMLVolumeArchetypeStorageNode)."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    assert storage.WriteData(node), f"Slicer could not write {path}"
    scene.RemoveNode(storage)
    return Path(path)


def read_with_slicer(scene, path: Path, vector: bool = False, name: str = "read"):
    """Read a volume file with Slicer's own reader."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    scene.RemoveNode(storage)
    return node


def colour_frame(gray: np.ndarray) -> np.ndarray:
    """A genuinely colour (H, W, 3) ultrasound-like frame from a gray one: a sepia tint plus a
    coloured caliper cross and text-like marks, as ultrasound screenshots have."""
    g = gray.astype(np.float32)
    rgb = np.stack([g * 1.0, g * 0.85, g * 0.65], axis=-1)
    h, w = gray.shape
    rgb[h // 2, w // 4: 3 * w // 4] = (255, 255, 0)
    rgb[h // 4: 3 * h // 4, w // 2] = (255, 255, 0)
    rgb[4:10, 4:40] = (0, 200, 255)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 2.0, what: str = "condition"):
    """Call ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last value {value!r})")
        time.sleep(interval)


# ------------------------------------------------------------------------------ fake servers
Route = Callable[[http.server.BaseHTTPRequestHandler, bytes], Tuple[int, Dict[str, str], bytes]]


class FakeServer:
    """A stdlib HTTP server on a free loopback port answering from ``routes``.

    ``routes`` maps ``"METHOD /path"`` (path without query) to a function
    ``(handler, body) -> (status, headers, body)``; unknown routes get a FastAPI-style 404.
    Requests are recorded in ``requests`` as ``(method, path with query, headers, body)``.
    """

    def __init__(self, routes: Dict[str, Route]) -> None:
        self.routes = routes
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                route = outer.routes.get(f"{self.command} {self.path.split('?')[0]}")
                if route is None:
                    status, headers, payload = json_answer(404, {"detail": "Not Found"})
                else:
                    status, headers, payload = route(self, body)
                if status == 0:
                    return  # the route wrote (or withheld) the answer itself
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def json_answer(status: int, payload) -> Tuple[int, Dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


class RawServer:
    """A TCP server that answers every connection with fixed bytes (``None``: close at once)."""

    def __init__(self, answer: Optional[bytes]) -> None:
        answer_bytes = answer

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(5)
                try:
                    self.request.recv(65536)
                except OSError:
                    return
                if answer_bytes is not None:
                    self.request.sendall(answer_bytes)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "RawServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """The address of a loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"

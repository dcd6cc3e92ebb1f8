"""Request handling around MONAI Label 0.8.5's endpoints, installed when the app starts.

MONAI Label's ``POST /infer/{model}`` is an ``async`` endpoint that runs the whole inference
inside the server's event loop, so while one image is classified no other request (not even
``/info``) is answered; and any error in a request becomes a bare ``500``. This module:

- runs every datastore, batch, train, active-learning, model and log endpoint in a worker
  thread, and
- replaces ``POST /infer/{model}`` with the same endpoint run in a worker thread, behind a
  concurrency limit (``infer_concurrency``, default 1 on CPU) and a bounded queue
  (``infer_queue``): when the queue is full the answer is ``503`` with ``Retry-After`` at once;
- checks ``params`` / ``info`` JSON (an object; no NaN/Infinity; not absurdly nested) and
  rejects malformed ones with ``422``; an inference's ``params`` keep ``roi`` and ``frame`` only
  (MONAI Label merges ``params`` into the request, so ``{"image": "/any/file"}`` would make it
  read a file of the server, and ``{"save_label": true}`` write to the datastore): such keys get
  ``422``;
- replaces every uploaded file's name by a neutral one that keeps only a known image suffix, so
  no client-chosen name (``../``, absolute paths, NUL bytes, 300-character suffixes) reaches a
  file system call;
- maps the library's errors (bad image, bad box, bad id, missing model, full or read-only
  storage, ...) to ``4xx``/``503``/``507`` with a message, on every guarded route;
- caps the request body (``max_upload_mb``, default 64) before it is read: ``413``; and bounds
  how long a client may take: headers (``header_timeout_s``, 10 s; the connection is closed), a
  stalled body (``body_idle_timeout_s``, 30 s) and a whole body (``body_timeout_s``, 600 s): ``408``;
- removes the temporary files of a failed request (MONAI Label deletes them only after a
  successful answer), hands freed memory back after each request, checks training options before
  a run starts, and answers GET requests without server paths or tracebacks;
- ``PUT /model/{model}`` (install a model file) and ``DELETE /model/{model}``: admin only (MONAI
  Label lets annotators do both), the uploaded file checked to be a model of the served network
  before it is published atomically; the shipped model is never deleted;
- turns off what this app does not serve (sessions, ``output=dicom_seg``, whole-slide inference,
  the OHIF viewer, the DICOMweb proxy, scoring, ``/reload``): ``404``/``422`` with a message
  instead of a crash or a useless background process; a ``{model}`` in a path, or a ``model`` in
  a request body, must be one the app serves;
- a storage error anywhere (also while an upload is spooled to disk) answers ``507``/``503``, a
  body over the cap ``413``, even where FastAPI would say "There was an error parsing the body";
- with MONAI Label's authentication on: checks tokens itself (MONAI Label 0.8.5 calls PyJWT 2
  without the ``algorithms`` argument, which refuses every token) through FastAPI's
  ``dependency_overrides`` of MONAI Label's ``get_current_user``, with the same claims and roles,
  asymmetric signatures only and ``exp`` required; and ``POST /auth/token`` answers a wrong
  password with ``401`` and an unreachable login service with ``503`` (not ``500``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shutil
import tempfile
from collections import deque
from typing import Any, Callable, Dict, Optional

from fastapi import Depends, File, Form, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from fastapi.exception_handlers import http_exception_handler
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordRequestForm
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse

from monailabel.config import settings
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User

from thyroid_plugin.errors import InvalidModelError, client_text
from thyroid_plugin.io import IMAGE_SUFFIXES, json_safe

from .http import http_errors, storage_error

logger = logging.getLogger(__name__)

_GUARDED_PREFIXES = ("/infer", "/datastore", "/batch", "/train", "/activelearning", "/scoring", "/model", "/logs",
                     "/session")

#: routes of MONAI Label this app does not serve: (path prefix, what to say)
_NOT_SERVED = (
    ("/infer/wsi", "whole-slide inference is not part of this app; use POST /infer/classify_nodule"),
    ("/ohif", "the OHIF viewer is not part of this app; use the 3D Slicer module"),
    ("/proxy", "this app keeps its images in a local studies folder; there is no DICOMweb server to proxy"),
    ("/reload", "reloading the app in a running server is not supported; restart the server"),
    ("/scoring", "this app has no scoring methods"),
)

#: suffixes an uploaded file may keep (longest first); anything else is dropped, and the content
#: decides the format
_UPLOAD_SUFFIXES = IMAGE_SUFFIXES + (".pt",)
_UPLOAD_STEM = re.compile(r"^[A-Za-z0-9_(][A-Za-z0-9._()+\- ]{0,127}$")


def safe_upload_name(name: Optional[str]) -> str:
    """A neutral name for an uploaded file: the base name's stem if it is a plain id (MONAI
    Label derives an image id from it when ``?image=`` is not given), else ``upload``, plus the
    file's suffix if it is a known one. Never a path, a NUL byte or an unbounded suffix."""
    base = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    lower = base.lower()
    suffix = next((s for s in _UPLOAD_SUFFIXES if lower.endswith(s) and len(base) > len(s)), "")
    stem = base[: len(base) - len(suffix)] if suffix else base.split(".", 1)[0]
    if not _UPLOAD_STEM.match(stem) or ".." in stem or stem != stem.strip():
        stem = "upload"
    return stem + suffix


def _sanitize_uploads(values) -> None:
    for value in values:
        if isinstance(value, StarletteUploadFile):  # what the form parser makes (FastAPI's UploadFile is a subclass)
            value.filename = safe_upload_name(value.filename)
        elif isinstance(value, (list, tuple)):
            _sanitize_uploads(value)


def _no_constant(name: str):
    def refuse(token: str):
        raise ValueError(f"{token} is not a valid JSON number")

    return refuse


def _check_json_object(name: str, text: Optional[str]) -> dict:
    if text in (None, ""):
        return {}
    try:
        value = json.loads(text, parse_constant=_no_constant(name))
    except RecursionError:
        raise HTTPException(status_code=422, detail=f"'{name}' is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise HTTPException(status_code=422, detail=f"'{name}' is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"'{name}' must be a JSON object, got {type(value).__name__}")
    return value


#: the ``params`` of ``POST /infer/classify_nodule`` (see the README); other keys are dropped
INFER_PARAMS = ("roi", "frame")
#: keys MONAI Label would take from ``params`` as request fields: the image to read (any path on
#: the server), the model, whether to save the result as a datastore label, the device, ...
_RESERVED_INFER_PARAMS = {"image", "image_path", "model", "session", "session_id", "label", "save_label", "label_tag",
                          "device", "logging", "skip_writer", "timeout", "description", "file", "result_extension",
                          "result_dtype", "result_compress"}


def infer_params(text: Optional[str]) -> str:
    """The ``params`` an inference may carry, as JSON: only ``roi`` and ``frame``.

    Raises:
        HTTPException: 422 for bad JSON or a key that would redirect the request (``image``:
            an uploaded image cannot be swapped for a file on the server, ``save_label``: a
            classification cannot write to the datastore, ...).
    """
    value = _check_json_object("params", text)
    reserved = sorted(set(value) & _RESERVED_INFER_PARAMS)
    if reserved:
        raise HTTPException(status_code=422, detail=f"'params' may not set {', '.join(reserved)}: give the image as "
                                                    f"'file' or ?image=ID; classify_nodule takes {list(INFER_PARAMS)}")
    return json.dumps({k: value[k] for k in INFER_PARAMS if k in value})


#: the digests MONAI Label's ``check_sum`` knows (any other name was a 500)
_CHECKSUM_ALGORITHMS = ("SHA256", "SHA512", "MD5")


def _check_checksum(value: Optional[str]) -> None:
    if value and ":" in value and value.split(":", 1)[0] not in _CHECKSUM_ALGORITHMS:
        raise HTTPException(status_code=422, detail=f"unknown checksum algorithm {value.split(':', 1)[0][:20]!r}; "
                                                    f"use one of {list(_CHECKSUM_ALGORITHMS)}")


def remove_spooled_uploads(background_tasks: Optional[BackgroundTasks]) -> None:
    """Delete now the temporary files MONAI Label's endpoints would delete after the answer
    (uploads spooled to the temp folder, the saliency file): background tasks only run after a
    successful answer, so a request that fails would leave them behind for good."""
    from monailabel.utils.others.generic import remove_file

    if background_tasks is None:
        return
    for task in list(background_tasks.tasks):
        if task.func is remove_file:
            background_tasks.tasks.remove(task)
            for path in task.args:
                try:
                    os.unlink(path)
                except (FileNotFoundError, TypeError):
                    pass
                except OSError as e:
                    logger.warning("cannot remove the temporary file %s: %s", path, e)


def guarded(endpoint, known_models: Optional[Callable[[], set]] = None, check_body: Optional[Callable[[dict], None]] = None,
            client_root: Optional[str] = None):
    """Wrap an async MONAI Label endpoint: JSON form fields checked, upload names neutralised,
    a ``{model}`` in the path checked (``known_models``), the request checked by ``check_body``
    (given the endpoint's arguments), library errors mapped, the endpoint's body (synchronous
    work: file copies, datastore writes, a synchronous batch, active-learning predictions) run in
    a worker thread, so the event loop keeps answering, with freed memory handed back after it,
    and temporary files removed when it fails. With ``client_root`` (GET routes), the answer is
    made :func:`client_safe`."""

    @functools.wraps(endpoint)
    async def wrapper(*args, **kwargs):
        model = kwargs.get("model")
        if known_models is not None and isinstance(model, str):
            if model not in known_models():
                raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(known_models())}")
            body = kwargs.get("params")
            if isinstance(body, dict) and body.get("model", model) != model:  # the body would override the path
                raise HTTPException(status_code=422, detail=f"the request body names model {str(body['model'])[:60]!r}, "
                                                            f"the path {model!r}")
        for name in ("params", "info"):
            if isinstance(kwargs.get(name), str):
                _check_json_object(name, kwargs[name])
        _check_checksum(kwargs.get("check_sum"))
        _sanitize_uploads(kwargs.values())
        with http_errors():
            if check_body is not None:
                check_body(kwargs)
            try:
                result = await run_in_threadpool(_then_release_memory, lambda: asyncio.run(endpoint(*args, **kwargs)))
            except BaseException:
                remove_spooled_uploads(kwargs.get("background_tasks"))
                raise
        return client_safe(result, client_root) if client_root is not None else result

    return wrapper


_TRACEBACK_LINE = re.compile(r'^\s*(Traceback \(most recent call last\)|File ".*", line \d+)')


def client_safe(value: Any, root: str) -> Any:
    """An answer without server paths or tracebacks (they stay in the log): an absolute path
    under ``root`` becomes relative to it, any other its last component; traceback lines in a
    list of lines (a task's ``details``) are left out, the exception's own line kept."""
    if isinstance(value, str):
        if os.path.isabs(value) and "\n" not in value:
            relative = os.path.relpath(value, root)
            return relative if not relative.startswith("..") else os.path.basename(value)
        return client_text(value)
    if isinstance(value, dict):
        return {k: client_safe(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple, deque)):
        out, in_frame = [], False
        for item in value:
            if isinstance(item, str):
                if _TRACEBACK_LINE.match(item):
                    in_frame = True
                    continue
                if in_frame and item.startswith("    "):  # a frame's source line and its ^^^ markers
                    continue
                in_frame = False
            out.append(client_safe(item, root))
        return out
    return value


class InferLimiter:
    """At most ``concurrency`` inferences at once and ``queue`` waiting; more get a 503."""

    def __init__(self, concurrency: int = 1, queue: int = 16) -> None:
        self.concurrency = max(1, int(concurrency))
        self.queue = max(0, int(queue))
        self._semaphore: Optional[asyncio.Semaphore] = None
        self._waiting = 0

    async def run(self, fn, *args):
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        if self._semaphore.locked() and self._waiting >= self.queue:
            raise HTTPException(status_code=503, detail="the server is busy classifying other images; retry in a moment",
                                headers={"Retry-After": "1"})
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        try:
            return await run_in_threadpool(_then_release_memory, fn, *args)
        finally:
            self._semaphore.release()


def _then_release_memory(fn, *args):
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


def make_infer_endpoint(limiter: InferLimiter, known_models, check_image):
    async def api_run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Optional[ResultType] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        params = infer_params(params)
        if model not in known_models():
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(known_models())}")
        if session_id:
            raise HTTPException(status_code=422, detail="sessions are not available on this server: upload the image as "
                                                        "'file' or name a datastore image with ?image=ID")
        if output == ResultType.dicom_seg:
            raise HTTPException(status_code=422, detail="output=dicom_seg is not available: the mask comes in the "
                                                        "input's format (output=image or all)")
        if file is not None and file.size == 0:
            raise HTTPException(status_code=400, detail="the uploaded file is empty")
        if file is None and not image:
            raise HTTPException(status_code=422, detail="give an image: upload it as 'file' or name a datastore image with ?image=ID")
        if file is not None:
            file.filename = safe_upload_name(file.filename)
        with http_errors():
            if image and file is None:
                check_image(image)  # a datastore id, never a path on the server
            # classify_nodule takes no label: an uploaded one is ignored, never written anywhere
            try:
                result = await limiter.run(
                    infer_endpoint.run_inference, background_tasks, model, image, "", params, file, None, output
                )
            except BaseException:
                remove_spooled_uploads(background_tasks)
                raise
        if isinstance(result, dict):  # output=json: rendered here, so that no value can fail after the clean-up
            return JSONResponse(json_safe(result))
        return result

    return api_run_inference


class BodySizeLimit:
    """ASGI wrapper: refuse request bodies over ``max_bytes`` with 413 before reading them, and
    bodies that stall with 408: no part for ``idle_timeout_s`` seconds, or not complete after
    ``total_timeout_s`` (a ``Content-Length`` larger than what is sent would otherwise hold the
    connection, and a worker waiting on it, for as long as the client likes)."""

    def __init__(self, app, max_bytes: int, idle_timeout_s: float = 30.0, total_timeout_s: float = 600.0) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.idle_timeout_s = float(idle_timeout_s)
        self.total_timeout_s = float(total_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                return await self._reject(scope, receive, send)
        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout_s
        complete = False

        async def limited_receive():
            nonlocal received, complete
            if complete:  # the body is in: what comes next is a disconnect, whenever it comes
                return await receive()
            wait = min(self.idle_timeout_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
            except asyncio.TimeoutError:
                raise HTTPException(status_code=408, detail=self._slow_message()) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except HTTPException as e:
            if e.status_code not in (408, 413):
                raise
            return await self._reject(scope, receive, send, e.status_code)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.max_bytes // (1 << 20)} MiB"

    def _slow_message(self) -> str:
        return (f"the request body did not arrive in time (nothing for {self.idle_timeout_s:g} s, or not complete "
                f"after {self.total_timeout_s:g} s)")

    async def _reject(self, scope, receive, send, status: int = 413):
        detail = self._message() if status == 413 else self._slow_message()
        response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)


class HeaderTimeout:
    """Close connections whose request line and headers are not complete ``seconds`` after the
    connection opened or the previous answer went out (uvicorn has no such limit: a client that
    sends half a header keeps the connection, and a file descriptor, for as long as it likes).

    Wraps three methods of uvicorn's h11 protocol class (the one it uses without ``httptools``;
    checked with uvicorn 0.2x-0.3x); :meth:`install` changes nothing where they are missing."""

    installed: Optional["HeaderTimeout"] = None

    def __init__(self, protocol_class, seconds: float) -> None:
        self.seconds = float(seconds)
        self.protocol_class = protocol_class
        self.originals = {m: getattr(protocol_class, m) for m in ("connection_made", "data_received", "connection_lost")}

    @classmethod
    def install(cls, seconds: float) -> bool:
        try:
            from uvicorn.protocols.http.h11_impl import H11Protocol
        except ImportError:
            return False
        if cls.installed is not None:
            cls.installed.seconds = float(seconds)
            return True
        if not all(hasattr(H11Protocol, m) for m in ("connection_made", "data_received", "connection_lost")):
            return False
        hook = cls.installed = cls(H11Protocol, seconds)
        H11Protocol.connection_made = lambda proto, transport: hook.connection_made(proto, transport)
        H11Protocol.data_received = lambda proto, data: hook.data_received(proto, data)
        H11Protocol.connection_lost = lambda proto, exc: hook.connection_lost(proto, exc)
        return True

    @staticmethod
    def _waiting(proto) -> bool:
        return proto.cycle is None or proto.cycle.response_complete

    def _arm(self, proto) -> None:
        if getattr(proto, "_header_timer", None) is None:
            proto._header_timer = proto.loop.call_later(self.seconds, self._expire, proto)

    @staticmethod
    def _disarm(proto) -> None:
        timer = getattr(proto, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            proto._header_timer = None

    def _expire(self, proto) -> None:
        proto._header_timer = None
        if self._waiting(proto) and not proto.transport.is_closing():
            logger.info("closed a connection from %s: no complete request headers within %g s", proto.client,
                        self.seconds)
            proto.transport.close()

    def connection_made(self, proto, transport) -> None:
        self.originals["connection_made"](proto, transport)
        self._arm(proto)

    def data_received(self, proto, data: bytes) -> None:
        self.originals["data_received"](proto, data)
        if self._waiting(proto):
            self._arm(proto)  # part of the next request's headers: they have the same time to arrive
        else:
            self._disarm(proto)

    def connection_lost(self, proto, exc) -> None:
        self._disarm(proto)
        self.originals["connection_lost"](proto, exc)


async def _storage_error_response(request, exc: OSError) -> JSONResponse:
    e = storage_error(exc)
    return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)


async def _http_error_response(request, exc: StarletteHTTPException):
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return await _storage_error_response(request, cause)
    if isinstance(cause, StarletteHTTPException):  # e.g. the body limit hit while FastAPI parsed a form
        return await http_exception_handler(request, cause)
    return await http_exception_handler(request, exc)


def _train_check(path: str, check_options: Optional[Callable[[dict], None]]):
    """The body check of ``POST /train/{model}`` (``params`` are one model's options) and of the
    deprecated ``POST /train/`` (``params`` map each model to its options)."""
    if check_options is None or not path.startswith("/train"):
        return None

    def check(kwargs: dict) -> None:
        params = kwargs.get("params") or {}
        if path == "/train/{model}":
            check_options(params)
        else:
            for options in params.values():
                check_options(options)

    return check


def _route_lists(router, seen=None):
    """Every (router, routes list) reachable from ``router`` (FastAPI >= 0.120 keeps included
    routers as references instead of copying their routes)."""
    seen = seen if seen is not None else set()
    if id(router) in seen:
        return
    seen.add(id(router))
    yield router, router.routes
    for route in router.routes:
        child = getattr(route, "original_router", None)
        if child is not None:
            yield from _route_lists(child, seen)


def not_served(message: str):
    async def api_not_served():
        raise HTTPException(status_code=404, detail=message)

    return api_not_served


def make_model_endpoints(known_models, install_model: Callable[[str, str], Dict[str, Any]],
                         remove_model: Callable[[str], Dict[str, Any]]):
    """``PUT``/``DELETE /model/{model}`` for admins: install a checked model file atomically, or
    set the trained model aside (the shipped one stays)."""
    admin = settings.MONAI_LABEL_AUTH_ROLE_ADMIN

    def check_model(model: str) -> None:
        if model not in known_models():
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(known_models())}")

    async def api_update_model(model: str, file: UploadFile = File(...), user: User = Depends(RBAC(admin))):
        check_model(model)

        def work() -> Dict[str, Any]:
            with tempfile.TemporaryDirectory(prefix="model-upload-") as tmp:
                path = os.path.join(tmp, "uploaded model file")
                with open(path, "wb") as out:
                    shutil.copyfileobj(file.file, out, 1 << 20)
                return install_model(model, path)

        with http_errors():
            try:
                result = await run_in_threadpool(work)
            except InvalidModelError as e:
                raise HTTPException(status_code=422, detail=f"not a usable model file: {e}") from None
        logger.info("model %s installed by %s: %s", model, user.username, result.get("model"))
        return result

    async def api_delete_model(model: str, user: User = Depends(RBAC(admin))):
        check_model(model)
        with http_errors():
            result = await run_in_threadpool(remove_model, model)
        logger.info("model %s removed by %s", model, user.username)
        return result

    return api_update_model, api_delete_model


def make_dataset_endpoint():
    """``GET /datastore/dataset``: MONAI Label's zip of the confirmed cases with their ``final``
    labels, without its crash on an empty list and without leaving the zip in /tmp."""
    from monailabel.interfaces.utils.app import app_instance

    async def api_download_dataset(background_tasks: BackgroundTasks, limit_cases: Optional[int] = None,
                                   user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
        def build() -> str:
            store = app_instance().datastore()
            if not store.datalist():
                raise HTTPException(status_code=404, detail="no image has a 'final' label yet: there is nothing to download")
            return store.get_dataset_archive(limit_cases)

        with http_errors():
            path = await run_in_threadpool(build)
        background_tasks.add_task(os.unlink, path)
        return FileResponse(path, media_type="application/zip", filename="dataset.zip")

    return api_download_dataset


# ------------------------------------------------------------------------------------ auth
_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


def _login_service_down(e: BaseException) -> HTTPException:
    logger.error("login service %s unreachable: %s", settings.MONAI_LABEL_AUTH_REALM_URI, e)
    return HTTPException(status_code=503, detail="the login service cannot be reached to check the credentials; try "
                                                 "again later or ask the administrator", headers={"Retry-After": "10"})


def user_from_token(token: str, key: str) -> User:
    """The user a token names, with MONAI Label's claims (``MONAI_LABEL_AUTH_TOKEN_*``).

    Raises:
        jwt.InvalidTokenError: bad signature, symmetric or no algorithm, expired, no ``exp``.
    """
    import jwt

    payload = jwt.decode(token, key, algorithms=_TOKEN_ALGORITHMS, options={"verify_aud": False, "require": ["exp"]})
    roles: Any = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    roles = [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []

    def text(claim: str) -> Optional[str]:
        value = payload.get(claim)
        return str(value) if value is not None else None

    username = text(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or text("sub") or ""
    return User(username=username, email=text(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
                name=text(settings.MONAI_LABEL_AUTH_TOKEN_NAME), roles=roles)


def install_auth(app) -> None:
    """Token checks and the token endpoint (see the module docstring); only with auth on."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return
    import jwt
    import requests
    from monailabel.endpoints.user import auth

    async def current_user(token: str = Depends(auth.oauth2_scheme)) -> User:
        try:
            key = await run_in_threadpool(auth.get_public_key, settings.MONAI_LABEL_AUTH_REALM_URI)
        except (requests.RequestException, ValueError, KeyError, TypeError) as e:
            raise _login_service_down(e) from None
        try:
            return user_from_token(token, key)
        except jwt.InvalidTokenError as e:
            logger.info("refused a token: %s", e)
            raise HTTPException(status_code=401, detail=f"invalid or expired token ({str(e)[:100]}); log in again",
                                headers={"WWW-Authenticate": "Bearer"}) from None

    app.dependency_overrides[auth.get_current_user] = current_user

    async def access_token(form_data: OAuth2PasswordRequestForm = Depends()):
        def ask():
            return requests.post(auth.token_uri(), timeout=settings.MONAI_LABEL_AUTH_TIMEOUT, data={
                "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": form_data.username,
                "password": form_data.password, "grant_type": "password"})

        try:
            r = await run_in_threadpool(ask)
        except (requests.RequestException, ValueError, KeyError, TypeError) as e:
            raise _login_service_down(e) from None
        if r.status_code in (400, 401, 403):
            raise HTTPException(status_code=401, detail="wrong user name or password", headers={"WWW-Authenticate": "Bearer"})
        try:
            payload = r.json() if r.status_code == 200 else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("access_token"), str):
            raise _login_service_down(f"token endpoint answered {r.status_code}")
        return {"access_token": payload["access_token"], "token_type": payload.get("token_type") or "bearer"}

    return access_token


#: seconds a client has for its request headers, for each part of a body, and for a whole body
DEFAULT_TIMEOUTS = {"header_timeout_s": 10.0, "body_idle_timeout_s": 30.0, "body_timeout_s": 600.0}


def install(app, known_models, check_image, infer_concurrency: int = 1, infer_queue: int = 16, max_upload_mb: int = 64,
            install_model: Optional[Callable[[str, str], Dict[str, Any]]] = None,
            remove_model: Optional[Callable[[str], Dict[str, Any]]] = None,
            check_train_options: Optional[Callable[[dict], None]] = None, studies: str = "/",
            timeouts: Optional[Dict[str, float]] = None) -> None:
    """Install the routes above into MONAI Label's FastAPI ``app`` (idempotent).

    Args:
        check_train_options: raises for bad options of one training request (before a run starts).
        studies: the studies folder (answers name files relative to it).
        timeouts: overrides of :data:`DEFAULT_TIMEOUTS`.
    """
    if getattr(app.state, "thyroid_nodule_routes", False):
        return
    timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
    HeaderTimeout.install(timeouts["header_timeout_s"])
    limiter = InferLimiter(infer_concurrency, infer_queue)
    token_endpoint = install_auth(app)
    if install_model is not None and remove_model is not None:
        update_model, delete_model = make_model_endpoints(known_models, install_model, remove_model)
    else:
        update_model = delete_model = not_served("installing or removing model files over REST is turned off")
    replaced = 0
    for router, routes in list(_route_lists(app.router)):
        changed = False
        for i, route in enumerate(list(routes)):
            if not isinstance(route, APIRoute):
                continue
            methods = route.methods or set()
            not_served_message = next((m for prefix, m in _NOT_SERVED if route.path.startswith(prefix)), None)
            if not_served_message:
                endpoint = not_served(not_served_message)
            elif route.path == "/auth/token" and token_endpoint is not None:
                endpoint = token_endpoint
            elif not route.path.startswith(_GUARDED_PREFIXES):
                continue
            elif route.path == "/infer/{model}" and "POST" in methods:
                endpoint = make_infer_endpoint(limiter, known_models, check_image)
            elif route.path == "/model/{model}" and "PUT" in methods:
                endpoint = update_model
            elif route.path == "/model/{model}" and "DELETE" in methods:
                endpoint = delete_model
            elif route.path == "/datastore/dataset":
                endpoint = make_dataset_endpoint()
            else:
                check_body = _train_check(route.path, check_train_options) if "POST" in methods else None
                endpoint = guarded(route.endpoint, known_models if "{model}" in route.path else None, check_body,
                                   client_root=studies if "GET" in methods else None)
            routes[i] = APIRoute(
                route.path,
                endpoint,
                methods=list(methods),
                summary=route.summary,
                tags=route.tags,
                responses=route.responses,
                include_in_schema=route.include_in_schema,
                deprecated=route.deprecated,
                name=route.name,
            )
            changed = True
            replaced += 1
        if changed and hasattr(router, "_mark_routes_changed"):
            router._mark_routes_changed()  # FastAPI caches the routes of included routers
    # a storage error anywhere else (e.g. spooling an upload to a full disk, which FastAPI reports
    # as "There was an error parsing the body") is a 507/503 too
    app.add_exception_handler(OSError, _storage_error_response)
    app.add_exception_handler(StarletteHTTPException, _http_error_response)
    body_limits = {"max_bytes": max_upload_mb * (1 << 20), "idle_timeout_s": timeouts["body_idle_timeout_s"],
                   "total_timeout_s": timeouts["body_timeout_s"]}
    if app.middleware_stack is not None:  # built already (the lifespan runs first): build it again
        app.middleware_stack = BodySizeLimit(app.build_middleware_stack(), **body_limits)
    else:
        app.add_middleware(BodySizeLimit, **body_limits)
    app.state.thyroid_nodule_routes = True
    logger.info("thyroid_nodule: %d routes guarded (infer concurrency %d, queue %d, upload limit %d MiB, auth %s, "
                "timeouts: headers %g s, body %g s idle / %g s total)", replaced, infer_concurrency, infer_queue,
                max_upload_mb, "on" if settings.MONAI_LABEL_AUTH_ENABLE else "off", timeouts["header_timeout_s"],
                timeouts["body_idle_timeout_s"], timeouts["body_timeout_s"])

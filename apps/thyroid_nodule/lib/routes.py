"""Request handling around MONAI Label 0.8.5's endpoints, installed when the app starts.

MONAI Label's ``POST /infer/{model}`` is an ``async`` endpoint that runs the whole inference
inside the server's event loop, so while one image is classified no other request (not even
``/info``) is answered; and any error in a request becomes a bare ``500``. This module:

- runs every datastore, batch, train and active-learning endpoint in a worker thread, and
- replaces ``POST /infer/{model}`` with the same endpoint run in a worker thread, behind a
  concurrency limit (``infer_concurrency``, default 1 on CPU) and a bounded queue
  (``infer_queue``): when the queue is full the answer is ``503`` with ``Retry-After`` at once;
- checks ``params`` / ``info`` JSON and rejects malformed ones with ``422``;
- maps the library's errors (bad image, bad box, bad id, missing model, ...) to ``4xx``/``503``
  with a message, on every datastore, infer, batch, train and active-learning route;
- caps the request body (``max_upload_mb``, default 64) before it is read: ``413``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Optional

from fastapi import Depends, File, Form, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from monailabel.config import settings
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User

from .http import http_errors

logger = logging.getLogger(__name__)

_GUARDED_PREFIXES = ("/infer", "/datastore", "/batch", "/train", "/activelearning", "/scoring")


def _check_json_object(name: str, text: Optional[str]) -> None:
    if text in (None, ""):
        return
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as e:
        raise HTTPException(status_code=422, detail=f"'{name}' is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"'{name}' must be a JSON object, got {type(value).__name__}")


def guarded(endpoint):
    """Wrap an async MONAI Label endpoint: JSON form fields checked, library errors mapped, and
    the endpoint's body (synchronous work: file copies, datastore writes, a synchronous batch,
    active-learning predictions) run in a worker thread, so the event loop keeps answering."""

    @functools.wraps(endpoint)
    async def wrapper(*args, **kwargs):
        for name in ("params", "info"):
            if isinstance(kwargs.get(name), str):
                _check_json_object(name, kwargs[name])
        with http_errors():
            return await run_in_threadpool(lambda: asyncio.run(endpoint(*args, **kwargs)))

    return wrapper


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
            return await run_in_threadpool(fn, *args)
        finally:
            self._semaphore.release()


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
        _check_json_object("params", params)
        if model not in known_models():
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(known_models())}")
        if file is not None and file.size == 0:
            raise HTTPException(status_code=400, detail="the uploaded file is empty")
        if file is None and not image and not session_id:
            raise HTTPException(status_code=422, detail="give an image: upload it as 'file' or name a datastore image with ?image=ID")
        with http_errors():
            if image and file is None:
                check_image(image)  # a datastore id, never a path on the server
            return await limiter.run(
                infer_endpoint.run_inference, background_tasks, model, image, session_id, params, file, label, output
            )

    return api_run_inference


class BodySizeLimit:
    """ASGI wrapper: refuse request bodies over ``max_bytes`` with 413 before reading them."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

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

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail="request body too large")
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except HTTPException as e:
            if e.status_code != 413:
                raise
            return await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body larger than the limit of {self.max_bytes // (1 << 20)} MiB"}, status_code=413)
        await response(scope, receive, send)


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


def install(app, known_models, check_image, infer_concurrency: int = 1, infer_queue: int = 16, max_upload_mb: int = 64) -> None:
    """Install the routes above into MONAI Label's FastAPI ``app`` (idempotent)."""
    if getattr(app.state, "thyroid_nodule_routes", False):
        return
    limiter = InferLimiter(infer_concurrency, infer_queue)
    replaced = 0
    for router, routes in list(_route_lists(app.router)):
        changed = False
        for i, route in enumerate(list(routes)):
            if not isinstance(route, APIRoute) or not route.path.startswith(_GUARDED_PREFIXES):
                continue
            if route.path == "/infer/{model}" and "POST" in route.methods:
                endpoint = make_infer_endpoint(limiter, known_models, check_image)
            else:
                endpoint = guarded(route.endpoint)
            routes[i] = APIRoute(
                route.path,
                endpoint,
                methods=list(route.methods),
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
    if app.middleware_stack is not None:
        app.middleware_stack = BodySizeLimit(app.middleware_stack, max_upload_mb * (1 << 20))
    else:
        app.add_middleware(BodySizeLimit, max_bytes=max_upload_mb * (1 << 20))
    app.state.thyroid_nodule_routes = True
    logger.info("thyroid_nodule: %d routes guarded (infer concurrency %d, queue %d, upload limit %d MiB)",
                replaced, infer_concurrency, infer_queue, max_upload_mb)

"""Request handling around MONAI Label's endpoints, installed when the app starts (:func:`install`).

MONAI Label runs its endpoints inside the server's event loop and turns any error into a bare
``500``. This package replaces, in MONAI Label's route table, each endpoint whose behaviour the
app changes, by concern:

- :mod:`.worker`: datastore, batch, train, active-learning, model and log endpoints run in a
  worker thread, their input checked, the library's errors mapped to ``4xx``/``503``/``507``
  (:mod:`lib.http`), training options checked before a run starts, GET answers without server
  paths or tracebacks, temporary files of failed requests removed;
- :mod:`.infer`: ``POST /infer/{model}`` in a worker thread behind a concurrency limit and a
  bounded queue (``503`` + ``Retry-After`` when full);
- :mod:`.checks`: upload names, ``params``/``info`` JSON, the ``params`` an inference may carry;
- :mod:`.limits`: request body size (``413``) and slow clients (``408``, closed connections);
- :mod:`.auth`: token checks and ``POST /auth/token`` when MONAI Label's authentication is on;
- :mod:`.endpoints`: model file install/removal (admin only), the dataset download, and what
  the app does not serve (``404`` with a message);
- :mod:`.memory`: freed C heap memory handed back after each request.

The MONAI Label internals it relies on are checked once, at :func:`install`, by
:func:`thyroid_plugin.monailabel_adapter.compat.require` (the one version guard).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from monailabel.config import settings

from thyroid_plugin.monailabel_adapter.compat import ROUTE_INTERNALS, require

from ..http import http_error_response, storage_error_response
from .auth import install_auth
from .checks import client_safe, infer_params, json_object_field, safe_upload_name
from .endpoints import NOT_SERVED, make_dataset_endpoint, make_model_endpoints, not_served
from .infer import InferLimiter, make_infer_endpoint
from .limits import DEFAULT_TIMEOUTS, HeaderTimeout, install_body_limit
from .worker import guarded, train_check

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUTS", "client_safe", "infer_params", "install", "json_object_field", "safe_upload_name"]

#: route prefixes whose endpoints run guarded (:func:`.worker.guarded`) when not replaced otherwise
_GUARDED_PREFIXES = ("/infer", "/datastore", "/batch", "/train", "/activelearning", "/scoring", "/model", "/logs",
                     "/session")


class _Replacements:
    """Which endpoint replaces MONAI Label's on a route (``None``: MONAI Label's stays)."""

    def __init__(self, known_models, check_image, limiter: InferLimiter, token_endpoint, update_model, delete_model,
                 check_train_options, studies: str) -> None:
        self.known_models = known_models
        self.check_image = check_image
        self.limiter = limiter
        self.token_endpoint = token_endpoint
        self.update_model, self.delete_model = update_model, delete_model
        self.check_train_options = check_train_options
        self.studies = studies

    def endpoint_for(self, route: APIRoute):
        path, methods = route.path, route.methods or set()
        message = next((m for prefix, m in NOT_SERVED if path.startswith(prefix)), None)
        if message:
            return not_served(message)
        if path == "/auth/token":
            return self.token_endpoint  # None with authentication off
        if not path.startswith(_GUARDED_PREFIXES):
            return None
        if path == "/infer/{model}" and "POST" in methods:
            return make_infer_endpoint(self.limiter, self.known_models, self.check_image)
        if path == "/model/{model}" and "PUT" in methods:
            return self.update_model
        if path == "/model/{model}" and "DELETE" in methods:
            return self.delete_model
        if path == "/datastore/dataset":
            return make_dataset_endpoint()
        check_body = train_check(path, self.check_train_options) if "POST" in methods else None
        return guarded(route.endpoint, self.known_models if "{model}" in path else None, check_body,
                       client_root=self.studies if "GET" in methods else None)


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


def _replace_routes(app, endpoint_for: Callable[[APIRoute], Any]) -> int:
    """Swap the endpoint of every route ``endpoint_for`` names one for (same path, methods, name
    and OpenAPI data); returns how many were swapped."""
    replaced = 0
    for router, routes in list(_route_lists(app.router)):
        changed = False
        for i, route in enumerate(list(routes)):
            endpoint = endpoint_for(route) if isinstance(route, APIRoute) else None
            if endpoint is None:
                continue
            routes[i] = APIRoute(route.path, endpoint, methods=list(route.methods or ()), summary=route.summary,
                                 tags=route.tags, responses=route.responses, include_in_schema=route.include_in_schema,
                                 deprecated=route.deprecated, name=route.name)
            changed = True
            replaced += 1
        if changed and hasattr(router, "_mark_routes_changed"):
            router._mark_routes_changed()  # FastAPI (>= 0.120) caches the routes of included routers
    return replaced


def install(app, known_models, check_image, infer_concurrency: int = 1, infer_queue: int = 16, max_upload_mb: int = 64,
            install_model: Optional[Callable[[str, str], Dict[str, Any]]] = None,
            remove_model: Optional[Callable[[str], Dict[str, Any]]] = None,
            check_train_options: Optional[Callable[[dict], None]] = None, studies: str = "/",
            timeouts: Optional[Dict[str, float]] = None) -> None:
    """Install the request handling of this package into MONAI Label's FastAPI ``app`` (idempotent).

    Args:
        known_models: returns the names of the served models.
        check_image: raises for an image id that is not in the datastore.
        install_model, remove_model: back ``PUT``/``DELETE /model/{model}`` (both, or neither:
            then those routes answer 404).
        check_train_options: raises for bad options of one training request (before a run starts).
        studies: the studies folder (answers name files relative to it).
        timeouts: overrides of :data:`DEFAULT_TIMEOUTS`.

    Raises:
        MonaiLabelVersionError: the installed MONAI Label is not the one this was written for.
    """
    if getattr(app.state, "thyroid_nodule_routes", False):
        return
    require("the app's request handling (apps/thyroid_nodule/lib/routes)", ROUTE_INTERNALS)
    timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
    HeaderTimeout.install(timeouts["header_timeout_s"])
    if install_model is not None and remove_model is not None:
        update_model, delete_model = make_model_endpoints(known_models, install_model, remove_model)
    else:
        update_model = delete_model = not_served("installing or removing model files over REST is turned off")
    replacements = _Replacements(known_models, check_image, InferLimiter(infer_concurrency, infer_queue),
                                 install_auth(app), update_model, delete_model, check_train_options, studies)
    replaced = _replace_routes(app, replacements.endpoint_for)
    app.add_exception_handler(OSError, storage_error_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    install_body_limit(app, max_upload_mb * (1 << 20), timeouts["body_idle_timeout_s"], timeouts["body_timeout_s"])
    app.state.thyroid_nodule_routes = True
    logger.info("thyroid_nodule: %d routes guarded (infer concurrency %d, queue %d, upload limit %d MiB, auth %s, "
                "timeouts: headers %g s, body %g s idle / %g s total)", replaced, infer_concurrency, infer_queue,
                max_upload_mb, "on" if settings.MONAI_LABEL_AUTH_ENABLE else "off", timeouts["header_timeout_s"],
                timeouts["body_idle_timeout_s"], timeouts["body_timeout_s"])

"""MONAI Label's endpoints run in a worker thread, with their input checked and their errors mapped.

MONAI Label's datastore, batch, train, active-learning, model and log endpoints are ``async``
functions that do synchronous work (file copies, datastore writes, a synchronous batch,
active-learning predictions) inside the server's event loop, so while one runs no other request
(not even ``/info``) is answered. :func:`guarded` wraps such an endpoint without changing its
signature: the checks of :mod:`.checks`, the library's errors mapped to 4xx/503/507
(:func:`lib.http.http_errors`), the body run to completion in a worker thread with its own event
loop, freed memory handed back after it, and the temporary files of a failed request removed
(:func:`uploads_removed_on_failure`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from contextlib import contextmanager
from typing import Callable, Optional

from fastapi import HTTPException
from fastapi.background import BackgroundTasks
from starlette.concurrency import run_in_threadpool

from ..http import http_errors
from .checks import check_checksum, check_model, client_safe, json_object_field, sanitize_uploads
from .memory import then_release_memory

logger = logging.getLogger(__name__)


@contextmanager
def uploads_removed_on_failure(background_tasks: Optional[BackgroundTasks]):
    """On an exception, delete now the temporary files MONAI Label's endpoints would delete after
    the answer (uploads spooled to the temp folder, the saliency file): background tasks only run
    after a successful answer, so a request that fails would leave them behind for good."""
    try:
        yield
    except BaseException:
        _remove_spooled_uploads(background_tasks)
        raise


def _remove_spooled_uploads(background_tasks: Optional[BackgroundTasks]) -> None:
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


def _check_request(kwargs: dict, known_models: Optional[Callable[[], set]]) -> None:
    """The checks every guarded endpoint gets (see :func:`guarded`)."""
    model = kwargs.get("model")
    if known_models is not None and isinstance(model, str):
        check_model(model, known_models())
        body = kwargs.get("params")
        if isinstance(body, dict) and body.get("model", model) != model:  # the body would override the path
            raise HTTPException(status_code=422, detail=f"the request body names model {str(body['model'])[:60]!r}, "
                                                        f"the path {model!r}")
    for name in ("params", "info"):
        if isinstance(kwargs.get(name), str):
            json_object_field(name, kwargs[name])
    check_checksum(kwargs.get("check_sum"))
    sanitize_uploads(kwargs.values())


def guarded(endpoint, known_models: Optional[Callable[[], set]] = None, check_body: Optional[Callable[[dict], None]] = None,
            client_root: Optional[str] = None):
    """Wrap an async MONAI Label endpoint: JSON form fields checked, upload names neutralised,
    a ``{model}`` in the path checked (``known_models``), the request checked by ``check_body``
    (given the endpoint's arguments), library errors mapped, the endpoint run in a worker thread
    (``asyncio.run``: its body is synchronous work behind an ``async def``, so it needs a loop of
    its own there), and temporary files removed when it fails. With ``client_root`` (GET
    routes), the answer is made :func:`~.checks.client_safe`."""

    @functools.wraps(endpoint)
    async def wrapper(*args, **kwargs):
        _check_request(kwargs, known_models)
        with http_errors():
            if check_body is not None:
                check_body(kwargs)
            with uploads_removed_on_failure(kwargs.get("background_tasks")):
                result = await run_in_threadpool(then_release_memory, lambda: asyncio.run(endpoint(*args, **kwargs)))
        return client_safe(result, client_root) if client_root is not None else result

    return wrapper


def train_check(path: str, check_options: Optional[Callable[[dict], None]]):
    """The body check of ``POST /train/{model}`` (``params`` are one model's options) and of the
    deprecated ``POST /train/`` (``params`` map each model to its options); ``None`` elsewhere."""
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

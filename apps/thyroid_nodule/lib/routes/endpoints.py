"""Endpoints this app answers differently from MONAI Label.

- what the app does not serve (sessions, whole-slide inference, the OHIF viewer, the DICOMweb
  proxy, scoring, ``/reload``): ``404`` with a message instead of a crash or a useless
  background process (:data:`NOT_SERVED`);
- ``PUT /model/{model}`` (install a model file) and ``DELETE /model/{model}``: admin only (MONAI
  Label lets annotators do both), the uploaded file checked to be a model of the served network
  before it is published atomically; the shipped model is never deleted;
- ``GET /datastore/dataset``: no crash on an empty datastore, no zip left in the temp folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

from fastapi import Depends, File, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse

from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from thyroid_plugin.errors import InvalidModelError

from ..http import http_errors
from .checks import check_model

logger = logging.getLogger(__name__)

#: routes of MONAI Label this app does not serve: (path prefix, what to say)
NOT_SERVED = (
    ("/infer/wsi", "whole-slide inference is not part of this app; use POST /infer/classify_nodule"),
    ("/ohif", "the OHIF viewer is not part of this app; use the 3D Slicer module"),
    ("/proxy", "this app keeps its images in a local studies folder; there is no DICOMweb server to proxy"),
    ("/reload", "reloading the app in a running server is not supported; restart the server"),
    ("/scoring", "this app has no scoring methods"),
)


def not_served(message: str):
    """An endpoint that answers 404 with ``message``."""
    async def api_not_served():
        raise HTTPException(status_code=404, detail=message)

    return api_not_served


def make_model_endpoints(known_models, install_model: Callable[[str, str], Dict[str, Any]],
                         remove_model: Callable[[str], Dict[str, Any]]):
    """``PUT``/``DELETE /model/{model}`` for admins: install a checked model file atomically, or
    set the trained model aside (the shipped one stays)."""
    admin = settings.MONAI_LABEL_AUTH_ROLE_ADMIN

    async def api_update_model(model: str, file: UploadFile = File(...), user: User = Depends(RBAC(admin))):
        check_model(model, known_models())

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
        check_model(model, known_models())
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

"""``POST /infer/{model}``: the same endpoint as MONAI Label's, run in a worker thread behind a
concurrency limit (``infer_concurrency``, default 1 on CPU) and a bounded queue (``infer_queue``):
when the queue is full the answer is ``503`` with ``Retry-After`` at once (MONAI Label's own
endpoint runs the whole inference inside the server's event loop)."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import Depends, File, Form, HTTPException, UploadFile
from fastapi.background import BackgroundTasks
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from monailabel.config import settings
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User

from thyroid_plugin.io import json_safe

from ..http import http_errors
from .checks import check_model, infer_params, safe_upload_name
from .memory import then_release_memory
from .worker import uploads_removed_on_failure


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
            return await run_in_threadpool(then_release_memory, fn, *args)
        finally:
            self._semaphore.release()


def make_infer_endpoint(limiter: InferLimiter, known_models, check_image):
    """``POST /infer/{model}``: MONAI Label's ``run_inference`` behind ``limiter`` in a worker
    thread, with ``params`` kept to :data:`~.checks.INFER_PARAMS`, an image id checked by
    ``check_image`` (never a path), no sessions, no ``dicom_seg``, no label upload; a JSON answer
    rendered here (:func:`thyroid_plugin.io.json_safe`)."""
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
        check_model(model, known_models())
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
            with uploads_removed_on_failure(background_tasks):
                result = await limiter.run(
                    infer_endpoint.run_inference, background_tasks, model, image, "", params, file, None, output
                )
        if isinstance(result, dict):  # output=json: rendered here, so that no value can fail after the clean-up
            return JSONResponse(json_safe(result))
        return result

    return api_run_inference

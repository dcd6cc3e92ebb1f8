"""MONAI Label app "Thyroid Nodule": serves ``classify_nodule`` (thyroid_plugin's saliency-guided
dual-attention classifier), retrains it on confirmed cases and runs batch inference.

Start it with ``monailabel start_server --app apps/thyroid_nodule --studies STUDIES`` (see the
repository README for every ``--conf`` option). Nothing is downloaded: no model zoo, no SAM2.
``STUDIES`` is a folder, or the DICOMweb root of an archive (``http(s)://...``: the datastore of
``lib/archive``, see the README's "Running against a PACS").

MONAI Label's sessions (``/session/``: uploads kept under ``~/.cache/monailabel/sessions``, with
archive extraction and client-chosen session ids used as paths) are turned off whatever
``MONAI_LABEL_SESSIONS`` says: this app classifies single frames and does not need them. A
studies folder that cannot be used stops the server at once with a one-line error (exit code 2).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Dict

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.random import Random

import thyroid_plugin
from thyroid_plugin.constants import CLASS_NAMES, TASK_NAME
from thyroid_plugin.monailabel_adapter import ConfirmedCasesDatastore, MonaiLabelVersionError
from thyroid_plugin.studies import StudiesFolderError, check_id, remove_partial_files

from lib.archive import is_archive_url
from lib.archive.settings import archive_datastore
from lib.batch import PersistingBatchInfer
from lib.configs.classify_nodule import ClassifyNoduleConfig

logger = logging.getLogger(__name__)


class ThyroidNoduleApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.model_dir = conf.get("model_dir", os.path.join(app_dir, "model"))
        self.task_config = ClassifyNoduleConfig()
        self.task_config.init(TASK_NAME, self.model_dir, conf, None)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Thyroid Nodule",
            description="Benign/malignant thyroid nodule classification in 2D ultrasound with a self-supervised saliency mask",
            version=thyroid_plugin.__version__,
            labels=list(CLASS_NAMES),
        )
        self._install_routes()

    def init_datastore(self):
        if is_archive_url(self.studies):  # a DICOMweb archive (PACS): lib/archive
            try:
                return archive_datastore(self.studies, self.conf)
            except ValueError as e:
                _fatal(f"cannot start: {e}")
        logger.info("studies folder: %s", self.studies)
        try:
            return ConfirmedCasesDatastore(
                self.studies,
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
        except (StudiesFolderError, MonaiLabelVersionError) as e:
            _fatal(f"cannot start: {e}")

    def _load_sessions(self, load: bool = False):
        return None  # sessions off (see the module docstring)

    def init_infers(self):
        self.task_config.infer().result_store = self._datastore  # lib/archive writes single results back
        return {TASK_NAME: self.task_config.infer()}

    def init_trainers(self):
        return {TASK_NAME: self.task_config.trainer()}

    def init_strategies(self):
        strategies = dict(self.task_config.strategy())
        strategies["random"] = Random()
        return strategies

    def init_scoring_methods(self):
        return {}

    def init_batch_infer(self):
        inference = self.task_config.inference
        return PersistingBatchInfer(self.task_config.infer(), int(inference["max_pixels"]), int(inference["batch_size"]))

    def train(self, request):
        """MONAI Label runs ``POST /train/...?run_sync=true`` in the server process itself; here
        training always runs in its own process, as for a background run, and the request waits
        for it. A training step under autocast with gradients beside the served model's threads
        is the lock-order inversion that hung the server (the GIL against autocast's process-wide
        weight-cast cache), and it would share the model thread's cores and memory."""
        if not _in_server_process() or request.get("model", TASK_NAME) not in self._trainers:
            return super().train(request)
        from fastapi import HTTPException
        from monailabel.utils.async_tasks.utils import run_background_task

        task = run_background_task(dict(request), "train")
        while task["status"] in ("SUBMITTED", "RUNNING"):
            time.sleep(0.5)
        stats = self._trainers[request.get("model", TASK_NAME)].stats()
        if task["status"] != "DONE":
            # the data or the options were wrong (4xx), or the run itself failed (500)
            client_error = stats.get("error_type") in ("DatalistError", "InvalidRequestError")
            raise HTTPException(status_code=422 if client_error else 500,
                                detail=f"training {task['status'].lower()}: "
                                       f"{stats.get('error') or 'see GET /train/ and the server log'}"[:300])
        return stats

    def on_init_complete(self):
        super().on_init_complete()
        # load the served model now (not at the first request) so that its background
        # compilation, when configured, starts with the server
        try:
            self.task_config.infer().predictor()
        except Exception as e:  # a missing or damaged model is reported per request (503/500)
            logger.warning("model not loaded at start-up: %s", getattr(e, "detail", e))

    def info(self):
        info = super().info()
        info["classes"] = list(CLASS_NAMES)
        return info

    def _check_image(self, image_id: str) -> None:
        """A datastore image id must be valid and known (404 otherwise)."""
        from fastapi import HTTPException

        check_id(image_id)
        if not self._datastore.get_image_uri(image_id):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")

    def _install_routes(self) -> None:
        # Only in the server process (train and batch subprocesses have no HTTP side).
        if not _in_server_process():
            return
        from lib import routes
        from lib.trainers.classify_nodule import check_train_options

        server = sys.modules["monailabel.app"]
        # what an interrupted model publication left (nothing else writes there at start)
        remove_partial_files([self.model_dir])
        timeouts = {k: float(self.conf[k]) for k in routes.DEFAULT_TIMEOUTS if k in self.conf}
        try:
            routes.install(
                server.app,
                known_models=lambda: set(self._infers),
                check_image=self._check_image,
                infer_concurrency=int(self.conf.get("infer_concurrency", 1)),
                infer_queue=int(self.conf.get("infer_queue", 16)),
                max_upload_mb=int(self.conf.get("max_upload_mb", 64)),
                install_model=lambda model, path: self.task_config.install_model(path),
                remove_model=self._remove_model,
                check_train_options=check_train_options,
                studies=self.studies,
                timeouts=timeouts,
            )
        except MonaiLabelVersionError as e:
            _fatal(f"cannot start: {e}")

    def _remove_model(self, model: str) -> Dict[str, str]:
        from fastapi import HTTPException

        if not os.path.isfile(self.task_config.trained_path):
            raise HTTPException(status_code=404, detail="there is no trained or installed model to remove; the shipped "
                                                        "model is served and stays")
        return self.task_config.remove_model()


def _in_server_process() -> bool:
    """Whether this is the HTTP server's process (not a train or batch subprocess)."""
    server = sys.modules.get("monailabel.app")
    return server is not None and hasattr(server, "app")


def _fatal(message: str) -> None:
    """Stop the server with one line instead of a start-up traceback (the ASGI server would
    print the whole stack of the lifespan handler)."""
    logger.error(message)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    sys.stderr.flush()
    os._exit(2)

"""ThyroidNoduleLib: the logic of the 3D Slicer module "Thyroid Nodule".

Plain Python over MRML nodes (``slicer`` MRML classes), VTK, numpy and the standard library, so
it runs inside 3D Slicer and headless with ``slicer-core``. It talks to the MONAI Label server
running the ``thyroid_nodule`` app over REST only; it never imports torch, MONAI or the
``thyroid_plugin`` library.

- :mod:`.client`: REST client (urllib), MONAI Label's multipart/JSON answers, token auth;
- :mod:`.logic`: classify, confirm, next case, train, classify all, over a scene;
- :mod:`.nrrd`, :mod:`.geometry`, :mod:`.volumes`: frames as NRRD with Slicer's geometry;
- :mod:`.display`, :mod:`.results`: saliency nodes and the results table;
- :mod:`.tasks`: worker threads whose results are delivered on the main thread;
- :mod:`.errors`: one user-facing message per failure.
"""

from .client import InferResponse, MonaiLabelClient, Timeouts, normalize_url
from .errors import (
    AuthenticationError,
    BadResponseError,
    ConnectionFailedError,
    GeometryMismatchError,
    InputError,
    ServerError,
    ServerTimeoutError,
    ThyroidNoduleError,
)
from .logic import (
    ATTR_IMAGE_ID,
    ATTR_SERVER,
    CLASS_NAMES,
    TASK_NAME,
    BatchProgress,
    Classification,
    ConnectionReport,
    NextCase,
    NoduleLogic,
    TrainingProgress,
    batch_progress_from,
    training_progress_from,
)
from .tasks import BackgroundTasks

__version__ = "1.0.0"

__all__ = [
    "ATTR_IMAGE_ID",
    "ATTR_SERVER",
    "AuthenticationError",
    "BackgroundTasks",
    "BadResponseError",
    "BatchProgress",
    "CLASS_NAMES",
    "Classification",
    "ConnectionFailedError",
    "ConnectionReport",
    "GeometryMismatchError",
    "InferResponse",
    "InputError",
    "MonaiLabelClient",
    "NextCase",
    "NoduleLogic",
    "ServerError",
    "ServerTimeoutError",
    "TASK_NAME",
    "ThyroidNoduleError",
    "Timeouts",
    "TrainingProgress",
    "batch_progress_from",
    "normalize_url",
    "training_progress_from",
]

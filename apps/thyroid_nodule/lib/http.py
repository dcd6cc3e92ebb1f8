"""Map the library's errors to HTTP answers a client can act on.

MONAI Label turns any other exception raised in a request into a bare ``500 Internal Server
Error``; raising ``HTTPException`` from the app's code gives the client a status and a message.

Storage failures are answered with what they mean for the client, and nothing half-written stays
behind (the datastore writes every file atomically): a full disk or file size limit (``ENOSPC``,
``EDQUOT``, ``EFBIG``) is ``507 Insufficient Storage``; a studies or model folder that cannot be
written (``EROFS``, ``EACCES``, ``EPERM``) or any other I/O error is ``503``.
"""

from __future__ import annotations

import errno
import logging
from contextlib import contextmanager

from fastapi import HTTPException
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException

from thyroid_plugin.errors import (
    DatalistError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidModelError,
    InvalidROIError,
    ModelNotFoundError,
    client_text,
)
from thyroid_plugin.studies import InvalidRequestError, StudiesFolderError

logger = logging.getLogger(__name__)

#: the storage is full (or a file size limit is reached)
STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: the storage cannot be written
STORAGE_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_error(e: OSError) -> HTTPException:
    """The answer to an ``OSError`` met while reading or writing the server's files."""
    reason = e.strerror or type(e).__name__
    if e.errno in STORAGE_FULL:
        logger.error("storage full: %s", e)
        return HTTPException(status_code=507, detail=f"the server's storage is full ({reason}); nothing was saved. "
                                                     "Ask the administrator to free disk space, then try again")
    if e.errno in STORAGE_READ_ONLY:
        logger.error("storage not writable: %s", e)
        return HTTPException(status_code=503, detail=f"the server cannot write to its storage ({reason}); nothing was "
                                                     "saved. Ask the administrator to check the studies folder",
                             headers={"Retry-After": "60"})
    logger.error("storage error: %s", e)
    return HTTPException(status_code=503, detail=f"the server could not read or write a file ({reason}); try again later",
                         headers={"Retry-After": "10"})


@contextmanager
def http_errors():
    """Re-raise library errors as ``HTTPException`` (400, 404, 413, 422, 503 or 507)."""
    try:
        yield
    except HTTPException:
        raise
    except ImageTooLargeError as e:
        raise HTTPException(status_code=413, detail=client_text(e)) from None
    except InvalidImageError as e:
        raise HTTPException(status_code=400, detail=f"invalid image: {client_text(e)}") from None
    except (InvalidROIError, InvalidRequestError, DatalistError) as e:  # DatalistError: e.g. too few cases to train
        raise HTTPException(status_code=422, detail=client_text(e)) from None
    except (ImageNotFoundException, LabelNotFoundException) as e:
        raise HTTPException(status_code=404, detail=str(e.msg if hasattr(e, "msg") else e)) from None
    except MONAILabelException as e:  # e.g. an unknown model, strategy or scoring method
        msg = client_text(str(getattr(e, "msg", e)).splitlines()[0][:300]) if str(getattr(e, "msg", e)) else type(e).__name__
        raise HTTPException(status_code=404 if "not Initialized" in msg else 422, detail=msg) from None
    except ModelNotFoundError:
        raise HTTPException(status_code=503, detail="no model is installed yet: train one (POST /train/classify_nodule) or install a model file") from None
    except InvalidModelError as e:
        raise HTTPException(status_code=503, detail=f"the installed model cannot be used: {client_text(e)}") from None
    except StudiesFolderError as e:
        raise HTTPException(status_code=503, detail=client_text(e)) from None
    except OSError as e:
        raise storage_error(e) from None


async def storage_error_response(request, exc: OSError) -> JSONResponse:
    """Exception handler: an ``OSError`` anywhere in a request (also while FastAPI spools an
    upload to disk) is a 507/503 (:func:`storage_error`)."""
    e = storage_error(exc)
    return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)


async def http_error_response(request, exc: StarletteHTTPException):
    """Exception handler: an ``HTTPException`` raised because of a storage error or another
    ``HTTPException`` (e.g. the body limit hit while FastAPI parsed a form, which it reports as
    "There was an error parsing the body") answers with its cause."""
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return await storage_error_response(request, cause)
    if isinstance(cause, StarletteHTTPException):
        return await http_exception_handler(request, cause)
    return await http_exception_handler(request, exc)

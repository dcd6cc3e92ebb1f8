"""Map the library's errors to HTTP answers a client can act on.

MONAI Label turns any other exception raised in a request into a bare ``500 Internal Server
Error``; raising ``HTTPException`` from the app's code gives the client a status and a message.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

from fastapi import HTTPException
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from thyroid_plugin.errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidModelError,
    InvalidROIError,
    ModelNotFoundError,
)
from thyroid_plugin.studies import InvalidRequestError


@contextmanager
def http_errors():
    """Re-raise library errors as ``HTTPException`` (400, 404, 413, 422 or 503)."""
    try:
        yield
    except HTTPException:
        raise
    except ImageTooLargeError as e:
        raise HTTPException(status_code=413, detail=str(e)) from None
    except InvalidImageError as e:
        raise HTTPException(status_code=400, detail=f"invalid image: {e}") from None
    except (InvalidROIError, InvalidRequestError) as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    except (ImageNotFoundException, LabelNotFoundException) as e:
        raise HTTPException(status_code=404, detail=str(e.msg if hasattr(e, "msg") else e)) from None
    except ModelNotFoundError:
        raise HTTPException(status_code=503, detail="no model is installed yet: train one (POST /train/classify_nodule) or install a model file") from None
    except InvalidModelError as e:
        raise HTTPException(status_code=503, detail=f"the installed model cannot be used: {e}") from None


def with_http_errors(method):
    """Decorator form of :func:`http_errors`."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with http_errors():
            return method(*args, **kwargs)

    return wrapper

"""Checks of what a client sends, and of what it gets back.

- uploaded file names replaced by neutral ones that keep only a known image suffix, so no
  client-chosen name (``../``, absolute paths, NUL bytes, 300-character suffixes) reaches a file
  system call (:func:`safe_upload_name`);
- ``params`` / ``info`` form fields: a JSON object, no NaN/Infinity, not absurdly nested, else
  ``422`` (:func:`json_object_field`); an inference's ``params`` keep ``roi`` and ``frame`` only
  (:func:`infer_params`: MONAI Label merges ``params`` into the request, so ``{"image": "/any/file"}``
  would make it read a file of the server, and ``{"save_label": true}`` write to the datastore);
- answers without server paths or tracebacks (:func:`client_safe`).
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from typing import Any, Iterable, Optional

from fastapi import HTTPException
from starlette.datastructures import UploadFile as StarletteUploadFile

from thyroid_plugin.errors import client_text
from thyroid_plugin.io import IMAGE_SUFFIXES

#: suffixes an uploaded file may keep (longest first); anything else is dropped, and the content
#: decides the format
_UPLOAD_SUFFIXES = tuple(sorted(IMAGE_SUFFIXES + (".pt",), key=len, reverse=True))
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


def sanitize_uploads(values: Iterable[Any]) -> None:
    """Give every uploaded file among ``values`` (and in lists among them) a :func:`safe_upload_name`."""
    for value in values:
        if isinstance(value, StarletteUploadFile):  # what the form parser makes (FastAPI's UploadFile is a subclass)
            value.filename = safe_upload_name(value.filename)
        elif isinstance(value, (list, tuple)):
            sanitize_uploads(value)


def _refuse_constant(token: str):
    raise ValueError(f"{token} is not a valid JSON number")


def json_object_field(name: str, text: Optional[str]) -> dict:
    """The JSON object a form field ``name`` holds (``{}`` when empty).

    Raises:
        HTTPException: 422 for invalid JSON, NaN/Infinity, nesting too deep or not an object.
    """
    if text in (None, ""):
        return {}
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise HTTPException(status_code=422, detail=f"'{name}' is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise HTTPException(status_code=422, detail=f"'{name}' is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise HTTPException(status_code=422, detail=f"'{name}' must be a JSON object, got {type(value).__name__}")
    return value


#: the ``params`` of ``POST /infer/classify_nodule`` (see the README); other keys are dropped
INFER_PARAMS = ("roi", "frame", "mask_format")
#: keys MONAI Label would take from ``params`` as request fields: the image to read (any path on
#: the server), the model, whether to save the result as a datastore label, the device, ...
_RESERVED_INFER_PARAMS = {"image", "image_path", "model", "session", "session_id", "label", "save_label", "label_tag",
                          "device", "logging", "skip_writer", "timeout", "description", "file", "result_extension",
                          "result_dtype", "result_compress"}


def infer_params(text: Optional[str]) -> str:
    """The ``params`` an inference may carry, as JSON: only ``roi``, ``frame`` and ``mask_format``.

    Raises:
        HTTPException: 422 for bad JSON or a key that would redirect the request (``image``:
            an uploaded image cannot be swapped for a file on the server, ``save_label``: a
            classification cannot write to the datastore, ...).
    """
    value = json_object_field("params", text)
    reserved = sorted(set(value) & _RESERVED_INFER_PARAMS)
    if reserved:
        raise HTTPException(status_code=422, detail=f"'params' may not set {', '.join(reserved)}: give the image as "
                                                    f"'file' or ?image=ID; classify_nodule takes {list(INFER_PARAMS)}")
    return json.dumps({k: value[k] for k in INFER_PARAMS if k in value})


#: the digests MONAI Label's ``check_sum`` knows (any other name was a 500)
_CHECKSUM_ALGORITHMS = ("SHA256", "SHA512", "MD5")


def check_checksum(value: Optional[str]) -> None:
    """A ``check_sum`` of ``ALGORITHM:digest`` must name a digest MONAI Label knows (else 422)."""
    if value and ":" in value and value.split(":", 1)[0] not in _CHECKSUM_ALGORITHMS:
        raise HTTPException(status_code=422, detail=f"unknown checksum algorithm {value.split(':', 1)[0][:20]!r}; "
                                                    f"use one of {list(_CHECKSUM_ALGORITHMS)}")


def check_model(model: str, known: set) -> None:
    """A ``{model}`` in a path must be one the app serves (else 404)."""
    if model not in known:
        raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(known)}")


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

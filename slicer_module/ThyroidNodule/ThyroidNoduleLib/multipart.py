"""``multipart/form-data`` encoding (requests) and decoding (MONAI Label's infer answers).

Standard library only: decoding and header parameters use the ``email`` package (part of 3D
Slicer's bundled Python); encoding is the few lines of a form body. MONAI Label answers ``POST /infer/{model}?output=all`` with a
``multipart/form-data`` body holding a ``params`` part (the result JSON) and an ``image`` part
(the mask file), but with a JSON body alone when there is no mask; :func:`parse_multipart`
handles the first, the client handles the second.
"""

from __future__ import annotations

import email.errors
import email.message
import email.parser
import email.policy
import email.utils
import secrets
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["Part", "encode_multipart", "header_params", "parse_multipart", "MultipartError"]


class MultipartError(ValueError):
    """The body is not valid ``multipart/form-data``."""


@dataclass
class Part:
    """One part of a multipart body.

    Attributes:
        name: the form field name (``Content-Disposition`` ``name``).
        data: the raw bytes of the part.
        filename: the ``filename`` parameter, if any.
        content_type: the part's ``Content-Type`` ("" when absent).
    """

    name: str
    data: bytes
    filename: Optional[str] = None
    content_type: str = ""


#: a form field: text, or ``(filename, bytes, content type)`` for a file
FieldValue = Union[str, Tuple[str, bytes, str]]


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


def encode_multipart(fields: Mapping[str, FieldValue]) -> Tuple[bytes, str]:
    """Encode form fields as ``multipart/form-data``.

    Args:
        fields: name -> text value, or name -> ``(filename, data, content_type)`` for a file.

    Returns:
        ``(body, content_type)`` where ``content_type`` carries the boundary.
    """
    boundary = "----ThyroidNodule" + secrets.token_hex(16)
    chunks: List[bytes] = []
    for name, value in fields.items():
        chunks.append(f"--{boundary}\r\n".encode("ascii"))
        if isinstance(value, tuple):
            filename, data, ctype = value
            chunks.append(f'Content-Disposition: form-data; name="{_quote(name)}"; filename="{_quote(filename)}"\r\n'.encode("utf-8"))
            chunks.append(f"Content-Type: {ctype or 'application/octet-stream'}\r\n\r\n".encode("ascii"))
            chunks.append(bytes(data))
        else:
            chunks.append(f'Content-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'.encode("utf-8"))
            chunks.append(str(value).encode("utf-8"))
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def header_params(value: str) -> Tuple[str, Dict[str, str]]:
    """Split a header like ``form-data; name="a"; filename="b.nrrd"`` into its main value
    (lower-cased) and parameters (names lower-cased, quotes, backslash escapes and RFC 2231
    encodings undone), with the standard library's ``email`` header parsing."""
    message = email.message.Message()
    message["x"] = value or ""
    items = message.get_params(header="x") or [("", "")]
    params = {key.strip().lower(): email.utils.collapse_rfc2231_value(val) for key, val in items[1:] if key}
    return items[0][0].strip().lower(), params


#: MIME defects after which a body's parts cannot be trusted (cut off or not multipart at all)
_FATAL_DEFECTS = (
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.CloseBoundaryNotFoundDefect,
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.MultipartInvariantViolationDefect,
)
#: longest boundary accepted (RFC 2046 allows 70 characters)
MAX_BOUNDARY = 200
#: most parts accepted (MONAI Label sends two)
MAX_PARTS = 16


def parse_multipart(body: bytes, content_type: str) -> Dict[str, Part]:
    """Parse a ``multipart/form-data`` (or ``multipart/mixed``) body with the standard
    library's ``email`` parser.

    Args:
        body: the whole response body.
        content_type: the response's ``Content-Type`` header (with the boundary).

    Returns:
        parts by field name (a later part with the same name replaces an earlier one).

    Raises:
        MultipartError: not multipart, no (or an overlong) boundary, a body without its
        boundary or cut off before its closing one, more than :data:`MAX_PARTS` parts, or a
        part without a field name.
    """
    main, params = header_params(content_type or "")
    if not main.startswith("multipart/"):
        raise MultipartError(f"not a multipart body ({content_type!r})")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise MultipartError("the multipart body has no boundary")
    # the parser reads a whole MIME entity: the HTTP header (one line) above the body
    head = "Content-Type: " + " ".join(content_type.splitlines()) + "\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head.encode("latin-1", "replace") + body)
    for defect in message.defects:
        if isinstance(defect, email.errors.StartBoundaryNotFoundDefect):
            raise MultipartError("the multipart body does not contain its boundary")
        if isinstance(defect, _FATAL_DEFECTS):
            raise MultipartError("the multipart body has no closing boundary")
    payload = message.get_payload()
    if not isinstance(payload, list):
        raise MultipartError("the multipart body has no parts")
    if len(payload) > MAX_PARTS:
        raise MultipartError(f"the multipart body has more than {MAX_PARTS} parts")
    parts: Dict[str, Part] = {}
    for part in payload:
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise MultipartError("a multipart part has no field name")
        data = part.get_payload(decode=True)
        parts[name] = Part(name=name, data=data if isinstance(data, bytes) else b"", filename=part.get_filename(),
                           content_type=part.get("content-type", "") or "")
    return parts

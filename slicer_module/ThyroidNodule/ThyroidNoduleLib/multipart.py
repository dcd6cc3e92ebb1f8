"""``multipart/form-data`` encoding (requests) and decoding (MONAI Label's infer answers).

Standard library only. MONAI Label answers ``POST /infer/{model}?output=all`` with a
``multipart/form-data`` body holding a ``params`` part (the result JSON) and an ``image`` part
(the mask file), but with a JSON body alone when there is no mask; :func:`parse_multipart`
handles the first, the client handles the second.
"""

from __future__ import annotations

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
    """Split a header like ``form-data; name="a"; filename="b.nrrd"`` into its main value and
    parameters (names lower-cased, quotes and backslash escapes removed)."""
    items: List[str] = []
    current, quoted, escaped = [], False, False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    main = items[0].strip().lower()
    params: Dict[str, str] = {}
    for item in items[1:]:
        if "=" not in item:
            continue
        key, _, val = item.partition("=")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        params[key.strip().lower()] = val
    return main, params


def parse_multipart(body: bytes, content_type: str) -> Dict[str, Part]:
    """Parse a ``multipart/form-data`` (or ``multipart/mixed``) body.

    Args:
        body: the whole response body.
        content_type: the response's ``Content-Type`` header (with the boundary).

    Returns:
        parts by field name (a later part with the same name replaces an earlier one).

    Raises:
        MultipartError: no boundary, no closing delimiter, or a part without headers.
    """
    main, params = header_params(content_type or "")
    if not main.startswith("multipart/"):
        raise MultipartError(f"not a multipart body ({content_type!r})")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise MultipartError("the multipart body has no boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    # The first delimiter may start the body; the others follow a CRLF (or a bare LF).
    if body.startswith(delimiter):
        pos = 0
    else:
        pos = body.find(b"\n" + delimiter)
        if pos < 0:
            raise MultipartError("the multipart body does not contain its boundary")
        pos += 1
    parts: Dict[str, Part] = {}
    closed = False
    while True:
        pos += len(delimiter)
        if body[pos:pos + 2] == b"--":
            closed = True
            break
        line_end = body.find(b"\n", pos)
        if line_end < 0:
            break
        pos = line_end + 1
        header_end = body.find(b"\r\n\r\n", pos)
        sep = 4
        lf_end = body.find(b"\n\n", pos)
        if header_end < 0 or (0 <= lf_end < header_end):
            header_end, sep = lf_end, 2
        if header_end < 0:
            raise MultipartError("a multipart part has no header end")
        headers: Dict[str, str] = {}
        for raw in body[pos:header_end].split(b"\n"):
            raw = raw.rstrip(b"\r")
            if not raw:
                continue
            key, _, val = raw.decode("utf-8", "replace").partition(":")
            headers[key.strip().lower()] = val.strip()
        data_start = header_end + sep
        nxt = body.find(b"\n" + delimiter, data_start)
        if nxt < 0:
            raise MultipartError("the multipart body ends before its closing boundary")
        data_end = nxt - 1 if nxt > data_start and body[nxt - 1:nxt] == b"\r" else nxt
        disposition, dparams = header_params(headers.get("content-disposition", ""))
        name = dparams.get("name")
        if name is None:
            raise MultipartError("a multipart part has no field name")
        parts[name] = Part(name=name, data=body[data_start:max(data_start, data_end)], filename=dparams.get("filename"),
                           content_type=headers.get("content-type", ""))
        pos = nxt + 1
    if not closed:
        raise MultipartError("the multipart body has no closing boundary")
    return parts

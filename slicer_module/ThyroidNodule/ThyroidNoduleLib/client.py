"""REST client of the MONAI Label server running the ``thyroid_nodule`` app (standard library only).

Every method either returns the server's answer or raises a
:class:`~ThyroidNoduleLib.errors.ThyroidNoduleError` whose message says, in one or two sentences,
what went wrong and what to do: the server is down (connection refused, unknown host), did not
answer in time, answered with an HTTP error (the server's ``detail`` is quoted), or answered with
something that is not a MONAI Label response.

Inference answers come as ``multipart/form-data`` (result JSON + mask file) or as JSON alone (no
mask, e.g. ``output=json``); both are handled (:class:`InferResponse` ``mask`` is ``None`` in the
second case).

Authentication (MONAI Label's token auth): with a user name and password the client asks
``GET /auth/`` whether auth is on, then ``POST /auth/token`` (form ``username``, ``password``) and
sends ``Authorization: Bearer <token>`` afterwards; a ``401`` later on logs in again once.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import (
    AuthenticationError,
    BadResponseError,
    ConnectionFailedError,
    ServerError,
    ServerTimeoutError,
    ThyroidNoduleError,
    first_line,
    http_error_message,
    server_said,
)
from .multipart import MultipartError, encode_multipart, header_params, parse_multipart

__all__ = ["InferResponse", "MonaiLabelClient", "Timeouts", "normalize_url"]

USER_AGENT = "ThyroidNodule-3DSlicer/1.0"
_CHUNK = 1 << 16


@dataclass
class Timeouts:
    """Time limits in seconds, per kind of request (each covers connecting, sending and reading
    the whole answer).

    Attributes:
        quick: info, auth, status and other small requests.
        infer: one classification (upload, inference, answer).
        transfer: image uploads/downloads and label saves.
        batch_sync: a synchronous batch inference over the datastore.
    """

    quick: float = 15.0
    infer: float = 180.0
    transfer: float = 120.0
    batch_sync: float = 1800.0


@dataclass
class InferResponse:
    """The answer of ``POST /infer/{model}``.

    Attributes:
        result: the result JSON (``label``, ``probabilities``, ``image``, ...).
        mask: the saliency mask file's bytes, or ``None`` when the server sent JSON only.
        mask_filename: the mask part's file name ("" when none).
        image_id: the datastore image the server classified (an archive frame's UID) when no
            file was sent; ``None`` for an upload.
    """

    result: Dict[str, Any]
    mask: Optional[bytes] = None
    mask_filename: str = ""
    image_id: Optional[str] = None


@dataclass
class _Response:
    status: int
    headers: Dict[str, str]
    body: bytes = b""
    url: str = ""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def normalize_url(url: str) -> str:
    """Clean a server address typed by a user: trims blanks and trailing ``/``, adds ``http://``
    when no scheme is given.

    Raises:
        ThyroidNoduleError: empty, not http(s), or without a host.
    """
    text = (url or "").strip()
    if not text:
        raise ThyroidNoduleError("Enter the MONAI Label server address, e.g. http://127.0.0.1:8000")
    if "://" not in text:
        text = "http://" + text
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme.lower() not in ("http", "https"):
        raise ThyroidNoduleError(f"The server address must start with http:// or https:// (got {url.strip()!r}).")
    if not parsed.hostname:
        raise ThyroidNoduleError(f"The server address {url.strip()!r} has no host name.")
    try:
        parsed.port
    except ValueError:
        raise ThyroidNoduleError(f"The server address {url.strip()!r} has an invalid port.") from None
    return urllib.parse.urlunsplit((parsed.scheme.lower(), parsed.netloc, parsed.path.rstrip("/"), "", ""))


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _server_detail(body: bytes) -> str:
    """The ``detail`` of a FastAPI error body (a string, or the first validation message)."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        text = body.decode("utf-8", "replace").strip()
        return "" if text.lstrip().startswith("<") else first_line(text, 200)
    if isinstance(payload, dict):
        detail = payload.get("detail", payload.get("message", ""))
        if isinstance(detail, list) and detail:
            item = detail[0]
            if isinstance(item, dict):
                loc = ".".join(str(v) for v in item.get("loc", [])[1:])
                return first_line(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            return first_line(str(item))
        return first_line(str(detail)) if detail else ""
    return first_line(str(payload), 200)


class MonaiLabelClient:
    """Client of one MONAI Label server.

    Args:
        base_url: the server address (see :func:`normalize_url`).
        timeouts: time limits.
        username, password: credentials for MONAI Label's token authentication (optional).
        token: an access token obtained earlier (optional).
    """

    def __init__(self, base_url: str, timeouts: Optional[Timeouts] = None, username: str = "", password: str = "",
                 token: Optional[str] = None) -> None:
        self.base_url = normalize_url(base_url)
        self.timeouts = timeouts or Timeouts()
        self.username = username or ""
        self.password = password or ""
        self.token = token
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, action: str, timeout: float, query: Optional[Mapping[str, Any]] = None,
                 body: Optional[bytes] = None, content_type: Optional[str] = None, accept: str = "application/json",
                 retry_auth: bool = True) -> _Response:
        """Send one request; return the answer (status < 400) or raise a ThyroidNoduleError."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"User-Agent": USER_AGENT, "Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        deadline = time.monotonic() + timeout
        try:
            with self._opener.open(request, timeout=timeout) as response:
                data = self._read(response, deadline, timeout, action)
                return _Response(response.status, {k.lower(): v for k, v in response.headers.items()}, data, url)
        except urllib.error.HTTPError as e:
            try:
                data = e.read(1 << 20) or b""
            except (OSError, http.client.HTTPException):
                data = b""
            status = int(e.code)
            detail = _server_detail(data)
            if status == 401 and retry_auth and self.username:
                self.login()
                return self._request(method, path, action, timeout, query, body, content_type, accept, retry_auth=False)
            message = http_error_message(status, detail, action, self.base_url)
            cls = AuthenticationError if status in (401, 403) else ServerError
            raise cls(message, status=status, server_detail=detail, detail=f"{method} {url} -> {status}") from None
        except urllib.error.URLError as e:
            raise self._network_error(e.reason, action, timeout, url) from None
        except (socket.timeout, TimeoutError) as e:
            raise self._network_error(e, action, timeout, url) from None
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            raise self._network_error(e, action, timeout, url) from None

    def _read(self, response, deadline: float, timeout: float, action: str) -> bytes:
        chunks = []
        read = getattr(response, "read1", response.read)  # read1: whatever has arrived, so the deadline is checked often
        while True:
            if time.monotonic() > deadline:
                raise socket.timeout(f"answer not complete after {timeout} s")
            chunk = read(_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _network_error(self, reason: Any, action: str, timeout: float, url: str) -> ThyroidNoduleError:
        where = self.base_url
        detail = f"{url}: {type(reason).__name__}: {reason}"
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason).lower():
            return ServerTimeoutError(
                f"The server at {where} did not answer within {timeout:g} s while {action}. It may be busy (for example "
                "training) or the network is slow; try again, or raise the time limit under Advanced.", timeout, detail)
        if isinstance(reason, ConnectionRefusedError):
            return ConnectionFailedError(
                f"Cannot reach the MONAI Label server at {where}: nothing is listening there (connection refused). Start "
                "the server, or check the address and port.", detail)
        if isinstance(reason, socket.gaierror):
            host = urllib.parse.urlsplit(where).hostname
            return ConnectionFailedError(f"The server name '{host}' cannot be found. Check the address.", detail)
        if isinstance(reason, ssl.SSLError):
            return ConnectionFailedError(f"The secure (https) connection to {where} failed: {first_line(str(reason))}. "
                                         "Check the address and the server's certificate.", detail)
        if isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return ConnectionFailedError(
                f"The server at {where} closed the connection without answering while {action}. It may have stopped or "
                "crashed; check that it is running.", detail)
        if isinstance(reason, (http.client.BadStatusLine, http.client.IncompleteRead, http.client.LineTooLong)):
            return BadResponseError(
                f"The server at {where} sent an answer that is not valid HTTP while {action}. Is this the address of a "
                "MONAI Label server?", detail)
        return ConnectionFailedError(f"Cannot reach the MONAI Label server at {where} ({first_line(str(reason))}). "
                                     "Check the address and the network.", detail)

    def _json(self, response: _Response, action: str) -> Any:
        """The answer's JSON, or BadResponseError when it is not JSON."""
        try:
            return json.loads(response.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            kind = header_params(response.content_type)[0] or "no content type"
            raise BadResponseError(
                f"The server at {self.base_url} answered with something that is not a MONAI Label response ({kind}) "
                f"while {action}. Is this the address of a MONAI Label server?",
                detail=f"{response.url}: {response.body[:200]!r}") from None

    def _json_object(self, response: _Response, action: str) -> Dict[str, Any]:
        payload = self._json(response, action)
        if not isinstance(payload, dict):
            raise BadResponseError(f"The server at {self.base_url} sent an unexpected answer while {action} "
                                   f"(a {type(payload).__name__} instead of an object).", detail=repr(payload)[:200])
        return payload

    def _get_json(self, path: str, action: str, query: Optional[Mapping[str, Any]] = None,
                  timeout: Optional[float] = None) -> Any:
        return self._json(self._request("GET", path, action, timeout or self.timeouts.quick, query), action)

    def _send_form(self, method: str, path: str, action: str, fields: Mapping[str, Any], timeout: float,
                   query: Optional[Mapping[str, Any]] = None) -> _Response:
        body, ctype = encode_multipart(fields)
        return self._request(method, path, action, timeout, query, body, ctype)

    def _send_json(self, method: str, path: str, action: str, payload: Any, timeout: float,
                   query: Optional[Mapping[str, Any]] = None) -> _Response:
        body = json.dumps(payload).encode("utf-8")
        return self._request(method, path, action, timeout, query, body, "application/json")

    # ----------------------------------------------------------------------------------- auth
    def auth_enabled(self) -> bool:
        """Whether the server requires a login (``GET /auth/``; absent on servers without auth)."""
        action = "checking whether the server needs a login"
        try:
            info = self._json(self._request("GET", "/auth/", action, self.timeouts.quick, retry_auth=False), action)
        except ServerError as e:
            if e.status == 404:
                return False
            raise
        return bool(isinstance(info, dict) and info.get("enabled"))

    def login(self, username: Optional[str] = None, password: Optional[str] = None) -> Optional[str]:
        """Log in with MONAI Label's token authentication when the server has it on.

        Returns:
            the access token, or ``None`` when the server does not use authentication.

        Raises:
            AuthenticationError: wrong user name or password, or no token in the answer.
        """
        if username is not None:
            self.username = username
        if password is not None:
            self.password = password
        self.token = None
        if not self.auth_enabled():
            return None
        if not self.username:
            raise AuthenticationError(f"The server at {self.base_url} requires a login: enter your user name and password.",
                                      status=401)
        body = urllib.parse.urlencode({"username": self.username, "password": self.password, "grant_type": "password"}).encode()
        action = "logging in"
        try:
            response = self._request("POST", "/auth/token", action, self.timeouts.quick, body=body,
                                     content_type="application/x-www-form-urlencoded", retry_auth=False)
        except ServerError as e:
            if e.status in (400, 401, 403, 422) or e.status >= 500:
                also = " (or the server's login service is not working)" if e.status >= 500 else ""
                raise AuthenticationError(f"Login to {self.base_url} failed: check the user name and password{also}."
                                          + server_said(e.server_detail),
                                          status=e.status, server_detail=e.server_detail) from None
            raise
        payload = self._json_object(response, action)
        token = payload.get("access_token")
        if not token or not isinstance(token, str):
            raise AuthenticationError(f"Login to {self.base_url} failed: the server returned no access token.", status=401)
        self.token = token
        return token

    # ------------------------------------------------------------------------------- endpoints
    def info(self) -> Dict[str, Any]:
        """``GET /info/``: the app, its models, datastore counts and training statistics."""
        response = self._request("GET", "/info/", "asking the server what it serves", self.timeouts.quick)
        return self._json_object(response, "asking the server what it serves")

    def infer(self, model: str, file_name: Optional[str] = None, data: Optional[bytes] = None,
              params: Optional[Mapping[str, Any]] = None, output: str = "all", image_id: Optional[str] = None,
              timeout: Optional[float] = None) -> InferResponse:
        """``POST /infer/{model}``: classify an uploaded frame (``data``) or a datastore image.

        Args:
            model: the task name (``classify_nodule``).
            file_name: the upload's file name; its extension tells the server the format.
            data: the file's bytes; ``None`` to use ``image_id``.
            params: request parameters (``{"roi": [x0, y0, x1, y1]}``).
            output: ``all`` (JSON and mask), ``json`` or ``image``.
            image_id: a datastore image id (used when ``data`` is ``None``).

        Returns:
            the result JSON and, when the server sent one, the mask file.
        """
        action = "classifying the image"
        fields: Dict[str, Any] = {"params": json.dumps(dict(params or {}))}
        if data is not None:
            fields["file"] = (file_name or "frame.nrrd", data, "application/octet-stream")
        query = {"output": output}
        if image_id and data is None:
            query["image"] = image_id
        response = self._send_form("POST", f"/infer/{urllib.parse.quote(model)}", action, fields,
                                   timeout or self.timeouts.infer, query)
        parsed = self._parse_infer(response, action)
        parsed.image_id = query.get("image")
        return parsed

    def _parse_infer(self, response: _Response, action: str) -> InferResponse:
        main = header_params(response.content_type)[0]
        if main.startswith("multipart/"):
            try:
                parts = parse_multipart(response.body, response.content_type)
            except MultipartError as e:
                raise BadResponseError(f"The server's answer was cut off or damaged while {action}; try again.",
                                       detail=str(e)) from None
            if "params" not in parts:
                raise BadResponseError(f"The server answered without a result while {action}.",
                                       detail=f"parts: {sorted(parts)}")
            result = self._json_object(_Response(200, {"content-type": "application/json"}, parts["params"].data,
                                                 response.url), action)
            image = parts.get("image") or parts.get("file")
            return InferResponse(result, image.data if image is not None and image.data else None,
                                 (image.filename or "") if image is not None else "")
        if main in ("application/json", "") or main.endswith("+json"):
            return InferResponse(self._json_object(response, action))
        if main in ("application/octet-stream",) or main.startswith("image/"):
            raise BadResponseError(f"The server sent the mask without the result while {action}.",
                                   detail=f"content type {response.content_type}")
        return InferResponse(self._json_object(response, action))

    def add_image(self, image_id: str, file_name: str, data: bytes, params: Optional[Mapping[str, Any]] = None) -> str:
        """``PUT /datastore/image?image=ID``: add a frame to the server's datastore; returns its id."""
        action = "sending the image to the server"
        response = self._send_form("PUT", "/datastore/image", action,
                                   {"params": json.dumps(dict(params or {})),
                                    "file": (file_name, data, "application/octet-stream")},
                                   self.timeouts.transfer, {"image": image_id})
        payload = self._json_object(response, action)
        return str(payload.get("image") or image_id)

    def save_label(self, image_id: str, file_name: str, data: bytes, params: Optional[Mapping[str, Any]] = None,
                   tag: str = "final") -> Dict[str, Any]:
        """``PUT /datastore/label?image=ID&tag=TAG``: store a mask (and, with ``params.diagnosis``
        and tag ``final``, the confirmed diagnosis)."""
        action = "saving the diagnosis and mask on the server"
        response = self._send_form("PUT", "/datastore/label", action,
                                   {"params": json.dumps(dict(params or {})),
                                    "label": (file_name, data, "application/octet-stream")},
                                   self.timeouts.transfer, {"image": image_id, "tag": tag})
        return self._json_object(response, action)

    def update_image_info(self, image_id: str, info: Mapping[str, Any]) -> Any:
        """``PUT /datastore/image/info?image=ID`` with form field ``info`` (JSON)."""
        action = "saving the diagnosis on the server"
        response = self._send_form("PUT", "/datastore/image/info", action, {"info": json.dumps(dict(info))},
                                   self.timeouts.quick, {"image": image_id})
        return self._json(response, action) if response.body else None

    def image_info(self, image_id: str) -> Dict[str, Any]:
        """``GET /datastore/image/info?image=ID``."""
        response = self._request("GET", "/datastore/image/info", "reading the image's record on the server",
                                 self.timeouts.quick, {"image": image_id})
        return self._json_object(response, "reading the image's record on the server")

    def datastore(self, output: str = "all") -> Dict[str, Any]:
        """``GET /datastore/?output=...``: every image with its info and labels."""
        response = self._request("GET", "/datastore/", "reading the server's image list", self.timeouts.transfer,
                                 {"output": output})
        return self._json_object(response, "reading the server's image list")

    def download_image(self, image_id: str) -> Tuple[str, bytes]:
        """``GET /datastore/image?image=ID``: ``(file name, bytes)`` of a datastore image."""
        response = self._request("GET", "/datastore/image", "downloading the image", self.timeouts.transfer,
                                 {"image": image_id}, accept="*/*")
        if not response.body:
            raise BadResponseError(f"The server sent an empty file for image '{image_id}'.")
        if header_params(response.content_type)[0] in ("application/json", "text/html"):
            raise BadResponseError(f"The server sent {header_params(response.content_type)[0]} instead of image "
                                   f"'{image_id}'.", detail=response.body[:200].decode("utf-8", "replace"))
        _, disposition = header_params(response.headers.get("content-disposition", ""))
        return disposition.get("filename", "") or image_id, response.body

    def download_label(self, image_id: str, tag: str = "final") -> Tuple[str, bytes]:
        """``GET /datastore/label?label=ID&tag=TAG``: ``(file name, bytes)`` of a stored mask."""
        response = self._request("GET", "/datastore/label", "downloading the stored mask", self.timeouts.transfer,
                                 {"label": image_id, "tag": tag}, accept="*/*")
        if not response.body or header_params(response.content_type)[0] in ("application/json", "text/html"):
            raise BadResponseError(f"The server sent no mask file for image '{image_id}' ({tag}).",
                                   detail=response.body[:200].decode("utf-8", "replace"))
        _, disposition = header_params(response.headers.get("content-disposition", ""))
        return disposition.get("filename", "") or f"{image_id}-{tag}", response.body

    def next_sample(self, strategy: str = "uncertain", params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """``POST /activelearning/{strategy}``: the next image to review (``{}`` when none is left)."""
        action = "asking the server for the next case"
        response = self._send_json("POST", f"/activelearning/{urllib.parse.quote(strategy)}", action, dict(params or {}),
                                   self.timeouts.infer)
        if not response.body.strip() or response.body.strip() == b"null":
            return {}
        return self._json_object(response, action)

    def train_start(self, model: str, params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """``POST /train/{model}`` with the training options as JSON body."""
        action = "starting training"
        response = self._send_json("POST", f"/train/{urllib.parse.quote(model)}", action, dict(params or {}),
                                   self.timeouts.quick)
        return self._json_object(response, action)

    def train_status(self) -> Optional[Dict[str, Any]]:
        """``GET /train/``: the last training task (``status``, ``details``), ``None`` if none ran."""
        return self._task_status("/train/", "reading the training progress")

    def train_stop(self) -> Any:
        """``DELETE /train/``: stop the running training."""
        response = self._request("DELETE", "/train/", "stopping training", self.timeouts.quick)
        return self._json(response, "stopping training") if response.body else None

    def batch_infer(self, model: str, images: str = "all", params: Optional[Mapping[str, Any]] = None,
                    run_sync: bool = False) -> Dict[str, Any]:
        """``POST /batch/infer/{model}?images=...&run_sync=...``: classify the datastore's images.

        Returns:
            with ``run_sync``: ``{"total", "failed", "label_tag", "results": {id: result}}``;
            otherwise the submitted task (``id``, ``status``).
        """
        action = "classifying the server's images"
        response = self._send_json("POST", f"/batch/infer/{urllib.parse.quote(model)}", action, dict(params or {}),
                                   self.timeouts.batch_sync if run_sync else self.timeouts.quick,
                                   {"images": images, "run_sync": "true" if run_sync else "false"})
        return self._json_object(response, action)

    def batch_status(self) -> Optional[Dict[str, Any]]:
        """``GET /batch/infer``: the last batch task, ``None`` if none ran."""
        return self._task_status("/batch/infer", "reading the batch progress")

    def _task_status(self, path: str, action: str) -> Optional[Dict[str, Any]]:
        try:
            response = self._request("GET", path, action, self.timeouts.quick)
        except ServerError as e:
            if e.status == 404 and "no " in e.server_detail.lower():
                return None  # MONAI Label: "No Train Tasks Found"
            raise
        return self._json_object(response, action)

"""Errors of the Thyroid Nodule module, each with one message a clinician can act on.

Every failure the module can meet (server down, timeout, an HTTP error status, a response that is
not what MONAI Label sends, an image or ROI that cannot be classified, a mask that is not on the
image's grid) is raised as a :class:`ThyroidNoduleError` whose ``str()`` is that message. The
technical detail (status code, the server's ``detail``, the exception text) is kept in
attributes for logs, never shown alone.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "AuthenticationError",
    "BadResponseError",
    "ConnectionFailedError",
    "GeometryMismatchError",
    "InputError",
    "ServerError",
    "ServerTimeoutError",
    "ThyroidNoduleError",
    "first_line",
    "http_error_message",
    "server_said",
]


class ThyroidNoduleError(Exception):
    """Base error: ``str(error)`` is the message shown to the user.

    Attributes:
        message: the user-facing sentence(s).
        detail: technical detail for the log (may be empty).
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class InputError(ThyroidNoduleError):
    """The input in Slicer cannot be sent (no volume, several slices, ROI outside the frame...)."""


class ConnectionFailedError(ThyroidNoduleError):
    """The server could not be reached at all (refused, unknown host, network down, TLS)."""


class ServerTimeoutError(ThyroidNoduleError):
    """The server accepted the connection but did not answer in time.

    Attributes:
        timeout_s: the limit that was exceeded, in seconds.
    """

    def __init__(self, message: str, timeout_s: float, detail: str = "") -> None:
        super().__init__(message, detail)
        self.timeout_s = timeout_s


class ServerError(ThyroidNoduleError):
    """The server answered with an HTTP error status (4xx/5xx).

    Attributes:
        status: the HTTP status code.
        server_detail: the server's ``{"detail": ...}`` text, if it sent one.
    """

    def __init__(self, message: str, status: int, server_detail: str = "", detail: str = "") -> None:
        super().__init__(message, detail)
        self.status = status
        self.server_detail = server_detail


class AuthenticationError(ServerError):
    """The server requires a login (401) or refuses this user (403), or the login failed."""


class BadResponseError(ThyroidNoduleError):
    """The server answered 200 but not with what a MONAI Label server sends (HTML, garbage...)."""


class GeometryMismatchError(ThyroidNoduleError):
    """The saliency mask returned is not on exactly the image's grid."""


def http_error_message(status: int, server_detail: str, action: str, base_url: str) -> str:
    """The user-facing sentence for an HTTP error status.

    Args:
        status: HTTP status code (>= 400).
        server_detail: the server's ``detail`` text ("" when none).
        action: what the user asked for, e.g. ``"classifying the image"``.
        base_url: the server address, for the message.

    Returns:
        one or two sentences; the server's own explanation is included when it gave one.
    """
    why = server_said(server_detail)
    if status == 401:
        return (f"The server at {base_url} requires a login while {action}. Enter your user name and password "
                f"under Server and press Test connection.{why}")
    if status == 403:
        return f"Your account is not allowed to do this on the server at {base_url} ({action}).{why}"
    if status == 404:
        return f"The server at {base_url} could not find what was asked for while {action}.{why}"
    if status == 413:
        return f"The image is too large for the server while {action}.{why}"
    if status in (400, 409, 415, 422):
        return f"The server refused the request while {action}.{why}"
    if status == 429:
        return f"The server is busy with another task of this kind while {action}; wait until it finishes or stop it.{why}"
    if status == 503:
        return f"The server cannot do this right now ({action}).{why} Try again in a moment."
    if 400 <= status < 500:
        return f"The server refused the request (HTTP {status}) while {action}.{why}"
    return (f"The server at {base_url} failed (HTTP {status}) while {action}.{why} "
            "If this repeats, the server's log says why.")


def server_said(server_detail: str) -> str:
    """``" The server said: <detail>."`` (first line, ending with a full stop), or "" when the
    server gave no detail."""
    detail = first_line(server_detail)
    if detail and not detail.endswith((".", "!", "?")):
        detail += "."
    return f" The server said: {detail}" if detail else ""


def first_line(text: Optional[str], limit: int = 300) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters."""
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line[:limit]
    return ""

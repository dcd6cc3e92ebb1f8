"""DICOMweb traffic with the archive, bounded in time, with failures a client can act on.

Every request has a connect timeout and a read timeout (``archive_timeout``; MONAI Label's own
``MONAI_LABEL_DICOMWEB_READ_TIMEOUT`` is not used: dicomweb-client ignores it) and is not retried
(a retry with back-off would multiply the wait). Failures become :class:`ArchiveError`, an
``HTTPException`` the app's routes pass on unchanged:

- the archive cannot be reached (connection refused, DNS): ``503`` with ``Retry-After``;
- it does not answer within the timeout: ``504``;
- it answers with an error or something that is not DICOMweb: ``502`` (``401``/``403`` from the
  archive say that the server's archive credentials are wrong, also ``502``).

Credentials come from the environment, never from the command line or a log:
``THYROID_ARCHIVE_TOKEN`` (a bearer token), or ``THYROID_ARCHIVE_USER`` and
``THYROID_ARCHIVE_PASSWORD`` (HTTP basic; MONAI Label's ``MONAI_LABEL_DATASTORE_USERNAME`` /
``..._PASSWORD`` are read when those are not set).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import requests
from fastapi import HTTPException

logger = logging.getLogger(__name__)

#: seconds to open a connection / to wait for the archive's answer (``--conf archive_timeout``)
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 20.0


class ArchiveError(HTTPException):
    """The archive failed a request: ``status_code`` 502, 503 or 504 and a one-line ``detail``."""

    def __init__(self, status_code: int, detail: str) -> None:
        headers = {"Retry-After": "10"} if status_code in (503, 504) else None
        super().__init__(status_code=status_code, detail=detail, headers=headers)


class ArchiveNotFound(ArchiveError):
    """The archive does not hold the object asked for (404)."""

    def __init__(self, detail: str) -> None:
        super().__init__(404, detail)


def is_archive_url(studies: str) -> bool:
    return isinstance(studies, str) and studies.lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """The URL without any user name or password in it (for logs and messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class _TimeoutSession(requests.Session):
    """A session whose every request has a timeout (dicomweb-client passes none)."""

    def __init__(self, timeout: tuple) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(self, method, url, **kwargs):  # noqa: D401 (requests' signature)
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, **kwargs)


def _credentials(url: str):
    """(basic auth tuple or None, headers) from the environment, else from the URL."""
    token = os.environ.get("THYROID_ARCHIVE_TOKEN")
    if token:
        return None, {"Authorization": f"Bearer {token}"}
    user = os.environ.get("THYROID_ARCHIVE_USER") or os.environ.get("MONAI_LABEL_DATASTORE_USERNAME")
    password = os.environ.get("THYROID_ARCHIVE_PASSWORD") or os.environ.get("MONAI_LABEL_DATASTORE_PASSWORD")
    if user:
        return (user, password or ""), {}
    parts = urlsplit(url)
    if parts.username:
        return (parts.username, parts.password or ""), {}
    return None, {}


def _first_part(content_type: str, body: bytes) -> bytes:
    """The first body part of a ``multipart/related`` answer (or the body itself). Split by hand:
    the parts are whole DICOM files (up to hundreds of MB for a cine clip), which the ``email``
    parser would copy several times."""
    if not content_type.lower().startswith("multipart/"):
        return body
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params.get("boundary", "").strip().strip('"')
    if not boundary:
        raise ValueError("multipart answer without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start)
    if start < 0 or head_end < 0:
        raise ValueError("malformed multipart answer")
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if end < 0:
        raise ValueError("truncated multipart answer")
    return body[head_end + 4:end]


class ArchiveClient:
    """The archive's DICOMweb services (QIDO-RS, WADO-RS, STOW-RS) through ``dicomweb-client``.

    Args:
        url: the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
        connect_timeout, read_timeout: seconds (see the module docstring).
    """

    def __init__(self, url: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = redact(url).rstrip("/")
        auth, headers = _credentials(url)
        session = _TimeoutSession((float(connect_timeout), float(read_timeout)))
        session.auth = auth
        self.timeout = (float(connect_timeout), float(read_timeout))
        self._client = DICOMwebClient(self.url, session=session, headers=headers)
        self._client.set_http_retry_params(retry=False)

    # ------------------------------------------------------------------------- the services
    def search_series(self, filters: Optional[Dict[str, Any]] = None, fields: Sequence[str] = ()) -> list:
        return self._call("search for series", self._client.search_for_series, search_filters=dict(filters or {}),
                          fields=list(fields) or None, get_remaining=True)

    def search_instances(self, study: Optional[str] = None, series: Optional[str] = None,
                         filters: Optional[Dict[str, Any]] = None, fields: Sequence[str] = ()) -> list:
        return self._call("search for instances", self._client.search_for_instances, study_instance_uid=study,
                          series_instance_uid=series, search_filters=dict(filters or {}), fields=list(fields) or None,
                          get_remaining=True)

    def retrieve_instance(self, study: str, series: str, sop: str) -> bytes:
        """The instance's bytes as stored (its own transfer syntax, e.g. JPEG baseline as the
        scanner sent it). dicomweb-client's ``retrieve_instance`` is not used: it refuses a part
        without the 128-byte preamble, which is how Orthanc returns what was stored by STOW."""
        url = f"{self.url}/studies/{study}/series/{series}/instances/{sop}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'

        def get() -> bytes:
            response = self._client._session.get(url, headers={"Accept": accept})
            response.raise_for_status()
            return _first_part(response.headers.get("Content-Type", ""), response.content)

        return self._call(f"retrieve instance {sop}", get)

    def store(self, datasets: Sequence) -> None:
        """Store instances (STOW-RS); raises :class:`ArchiveError` unless every one was accepted."""
        response = self._call("store", self._client.store_instances, list(datasets))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise ArchiveError(502, f"the archive {self.url} refused {len(failed)} of {len(datasets)} objects "
                                    f"(failure reason {', '.join(reasons)})")

    # ----------------------------------------------------------------------------- failures
    def _call(self, what: str, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except requests.Timeout:
            raise ArchiveError(504, f"the archive {self.url} did not answer within {self.timeout[1]:g} s ({what}); "
                                    "try again later") from None
        except requests.ConnectionError as e:
            cause = "timed out" if "timed out" in str(e).lower() else "refused or unreachable"
            status = 504 if cause == "timed out" else 503
            raise ArchiveError(status, f"the archive {self.url} cannot be reached ({what}: connection {cause}); "
                                       "try again later or ask the administrator") from None
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if code == 404:
                raise ArchiveNotFound(f"the archive {self.url} has no such object ({what})") from None
            if code in (401, 403):
                raise ArchiveError(502, f"the archive {self.url} refused the server's credentials ({what}: {code}); "
                                        "ask the administrator to check THYROID_ARCHIVE_USER/PASSWORD or TOKEN") from None
            raise ArchiveError(502, f"the archive {self.url} answered {code} ({what})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # not DICOMweb (bad JSON, bad multipart)
            logger.warning("unexpected answer from the archive (%s): %s", what, e)
            raise ArchiveError(502, f"the archive {self.url} sent an answer that is not valid DICOMweb ({what})") from None

"""Limits on what a client may send, and how slowly.

- :class:`BodySizeLimit`: the request body capped (``max_upload_mb``, default 64) before it is
  read: ``413``; a stalled body (``body_idle_timeout_s``, 30 s) or one not complete in time
  (``body_timeout_s``, 600 s): ``408``;
- :class:`HeaderTimeout`: request headers not complete in ``header_timeout_s`` (10 s): the
  connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from fastapi import HTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

#: seconds a client has for its request headers, for each part of a body, and for a whole body
DEFAULT_TIMEOUTS = {"header_timeout_s": 10.0, "body_idle_timeout_s": 30.0, "body_timeout_s": 600.0}


class BodySizeLimit:
    """ASGI wrapper: refuse request bodies over ``max_bytes`` with 413 before reading them, and
    bodies that stall with 408: no part for ``idle_timeout_s`` seconds, or not complete after
    ``total_timeout_s`` (a ``Content-Length`` larger than what is sent would otherwise hold the
    connection, and a worker waiting on it, for as long as the client likes)."""

    def __init__(self, app, max_bytes: int, idle_timeout_s: float = 30.0, total_timeout_s: float = 600.0) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.idle_timeout_s = float(idle_timeout_s)
        self.total_timeout_s = float(total_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                return await self._reject(scope, receive, send)
        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout_s
        complete = False

        async def limited_receive():
            nonlocal received, complete
            if complete:  # the body is in: what comes next is a disconnect, whenever it comes
                return await receive()
            wait = min(self.idle_timeout_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
            except asyncio.TimeoutError:
                raise HTTPException(status_code=408, detail=self._slow_message()) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except HTTPException as e:
            if e.status_code not in (408, 413):
                raise
            return await self._reject(scope, receive, send, e.status_code)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.max_bytes // (1 << 20)} MiB"

    def _slow_message(self) -> str:
        return (f"the request body did not arrive in time (nothing for {self.idle_timeout_s:g} s, or not complete "
                f"after {self.total_timeout_s:g} s)")

    async def _reject(self, scope, receive, send, status: int = 413):
        detail = self._message() if status == 413 else self._slow_message()
        response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)


class HeaderTimeout:
    """Close connections whose request line and headers are not complete ``seconds`` after the
    connection opened or the previous answer went out (uvicorn has no such limit: a client that
    sends half a header keeps the connection, and a file descriptor, for as long as it likes).

    Wraps three methods of uvicorn's h11 protocol class (the one it uses without ``httptools``;
    checked with uvicorn 0.2x-0.3x); :meth:`install` changes nothing where they are missing."""

    installed: Optional["HeaderTimeout"] = None

    def __init__(self, protocol_class, seconds: float) -> None:
        self.seconds = float(seconds)
        self.protocol_class = protocol_class
        self.originals = {m: getattr(protocol_class, m) for m in ("connection_made", "data_received", "connection_lost")}

    @classmethod
    def install(cls, seconds: float) -> bool:
        try:
            from uvicorn.protocols.http.h11_impl import H11Protocol
        except ImportError:
            return False
        if cls.installed is not None:
            cls.installed.seconds = float(seconds)
            return True
        if not all(hasattr(H11Protocol, m) for m in ("connection_made", "data_received", "connection_lost")):
            return False
        hook = cls.installed = cls(H11Protocol, seconds)
        H11Protocol.connection_made = lambda proto, transport: hook.connection_made(proto, transport)
        H11Protocol.data_received = lambda proto, data: hook.data_received(proto, data)
        H11Protocol.connection_lost = lambda proto, exc: hook.connection_lost(proto, exc)
        return True

    @staticmethod
    def _waiting(proto) -> bool:
        return proto.cycle is None or proto.cycle.response_complete

    def _arm(self, proto) -> None:
        if getattr(proto, "_header_timer", None) is None:
            proto._header_timer = proto.loop.call_later(self.seconds, self._expire, proto)

    @staticmethod
    def _disarm(proto) -> None:
        timer = getattr(proto, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            proto._header_timer = None

    def _expire(self, proto) -> None:
        proto._header_timer = None
        if self._waiting(proto) and not proto.transport.is_closing():
            logger.info("closed a connection from %s: no complete request headers within %g s", proto.client,
                        self.seconds)
            proto.transport.close()

    def connection_made(self, proto, transport) -> None:
        self.originals["connection_made"](proto, transport)
        self._arm(proto)

    def data_received(self, proto, data: bytes) -> None:
        self.originals["data_received"](proto, data)
        if self._waiting(proto):
            self._arm(proto)  # part of the next request's headers: they have the same time to arrive
        else:
            self._disarm(proto)

    def connection_lost(self, proto, exc) -> None:
        self._disarm(proto)
        self.originals["connection_lost"](proto, exc)


def install_body_limit(app, max_bytes: int, idle_timeout_s: float, total_timeout_s: float) -> None:
    """Put :class:`BodySizeLimit` around ``app`` (FastAPI's ``add_middleware`` cannot add one once
    the stack is built, which MONAI Label's lifespan has done before the app is created)."""
    limits = {"max_bytes": max_bytes, "idle_timeout_s": idle_timeout_s, "total_timeout_s": total_timeout_s}
    if app.middleware_stack is not None:
        app.middleware_stack = BodySizeLimit(app.build_middleware_stack(), **limits)
    else:
        app.add_middleware(BodySizeLimit, **limits)

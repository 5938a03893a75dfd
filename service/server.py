"""`t2i-reward serve`'s HTTP server: uvicorn, with the connection-level limits uvicorn lacks.

uvicorn (0.55) answers a request only once its headers are complete, and until then it has no limit: no
timer runs between a connection's accept and its first byte, nor while its request line and headers
arrive, and its httptools parser buffers headers of any size (a 400 MiB header cost 154 CPU-s, quadratic
in its size). Its `limit_concurrency` answers 503 to requests, but idle connections still hold a file
descriptor each. So the server runs uvicorn with its own HTTP protocol, uvicorn's httptools one plus:
- `max_connections`: a connection beyond it is closed as soon as it is accepted;
- `idle_timeout_s`: a connection that sends nothing this long after it opens is closed (between requests,
  uvicorn's keep-alive timeout, set to the same value, does it);
- `header_timeout_s`: from the first byte of a request, its request line and headers must be in within
  this time, or it gets 408 and the connection is closed;
- `max_header_bytes`: a request line plus headers larger than this gets 431 and the connection is closed,
  counted on the raw bytes before the parser buffers them.
The request body's limits (size, time, rate, upload slots) are the app's (middleware.py).
"""

from __future__ import annotations

import asyncio
import logging
import resource

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import Settings

log = logging.getLogger(__name__)
FD_HEADROOM = 64  # descriptors kept for the process itself beside connections: models, Redis, logs, the pool


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of the module doc (class attributes: `protocol_for`)."""

    max_connections = 1000
    idle_timeout_s = 5.0
    header_timeout_s = 10.0
    max_header_bytes = 65536

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.abort()  # before a byte is read: no answer, the descriptor back at once
            return
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        self._timer = self.loop.call_later(self.idle_timeout_s, self._close_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._head_bytes == 0:  # a request's first bytes: its headers have header_timeout_s from now
                self._cancel_timer()
                self._timer = self.loop.call_later(self.header_timeout_s, self._refuse, 408, "the request headers did not arrive in time")
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"the request line and headers are over {self.max_header_bytes} bytes")
                return
            self._tail = seen[-3:]
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # the next bytes are the next request's head (keep-alive or pipelined): counted and timed again
        self._in_head, self._head_bytes, self._tail = True, 0, b""

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_idle(self) -> None:
        self._timer = None
        if self._head_bytes == 0 and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with `message` (plain text) and close: the request never reaches the app."""
        self._timer = None
        if self.transport.is_closing():
            return
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = message.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.transport.close()
        self._in_head = False


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with the settings' limits."""
    return type("ServiceHttpProtocol", (GuardedHttpToolsProtocol,), {
        "max_connections": settings.max_connections, "idle_timeout_s": settings.idle_timeout_s,
        "header_timeout_s": settings.header_timeout_s, "max_header_bytes": settings.max_header_bytes})


def raise_open_files_limit(connections: int) -> int:
    """Raise this process's open-files limit to its hard limit (the usual default soft limit, 1024, is
    below the default `max_connections`) and return how many connections fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, connections + FD_HEADROOM)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    fit = max(1, soft - FD_HEADROOM)
    if fit < connections:
        log.warning("max_connections %d lowered to %d: the open-files limit is %d", connections, fit, soft)
    return min(connections, fit)


def serve(app, settings: Settings) -> None:
    """Run `app` under uvicorn with the settings' address and connection limits (the module doc)."""
    settings = settings.model_copy(update={"max_connections": raise_open_files_limit(settings.max_connections)})
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", http=protocol_for(settings),
                timeout_keep_alive=max(1, round(settings.idle_timeout_s)))

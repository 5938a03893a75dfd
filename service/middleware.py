"""The ASGI middleware in front of every route: the API key, the request body's limits, and metrics.

Order matters, and this is where it is fixed:
1. the API key is checked from the headers before a byte of the body is read (401 / 403), so an
   unauthenticated client can make the server buffer nothing;
2. a Content-Length over the limit is refused at once (413);
3. a Transfer-Encoding other than `chunked` is refused (400): a coding the server would ignore;
4. the body is then read by the handler itself, through a guarded `receive`: more than
   `max_body_bytes` -> 413; slower than `body_timeout_s` in all, or than `min_upload_bytes_per_s` after
   `upload_grace_s` -> 408; more than `max_concurrent_uploads` bodies arriving at once, or more than
   `max_client_uploads` from one client (its API key, or its address without keys) -> 429, so stalled
   uploads of one client cannot hold every slot. Because the handler reads it, a handler can refuse work
   before the upload (the reward routes answer 429 on a full queue without reading the body);
5. every request is counted and timed per route.
The refusals' statuses and headers are `errors.http_error`'s, like every other error answer.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import HTTPException

from .deps import OPEN_PATHS, api_key_error
from .errors import BadFraming, BodyTooLarge, BodyTooSlow, TooManyUploads, http_error
from .metrics import Metrics
from .settings import Settings


class LimitsAndMetrics:
    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app = app
        self.api_keys = list(settings.api_keys)
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout_s = settings.body_timeout_s
        self.max_uploads = settings.max_concurrent_uploads
        self.max_client_uploads = settings.max_client_uploads
        self.min_rate = settings.min_upload_bytes_per_s
        self.grace_s = settings.upload_grace_s
        self.metrics = metrics
        self.uploads = 0  # bodies being received now (one event loop: a plain counter is enough)
        self.client_uploads: dict[str, int] = {}  # the same, per client

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = _headers(scope)
            refusal = self._refuse_from_headers(scope["path"], headers)
            if refusal is not None:
                await send_error(send_wrapper, refusal)
                return
            body = _GuardedBody(self, receive, _has_body(headers), self._client(scope, headers))
            try:
                if body.finished or not hasattr(asyncio, "timeout"):  # no body, or Python 3.10: per-read timeouts
                    await self.app(scope, body.receive, send_wrapper)
                else:
                    await self._with_body_deadline(scope, body, send_wrapper)
            finally:
                body.done()
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _with_body_deadline(self, scope, body: "_GuardedBody", send) -> None:
        """Run the app under one deadline that is armed only while the body arrives (Python 3.11+).

        Why one: a 12 MB body arrives in about 200 reads, and a timeout per read cost ~1.5 ms per request."""
        started = {"response": False}

        async def send_tracked(message):
            started["response"] = started["response"] or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(None) as deadline:
                body.deadline_cm = deadline
                try:
                    await self.app(scope, body.receive, send_tracked)
                finally:
                    body.deadline_cm = None  # the deadline ends with the app, whether the body came or not
        except TimeoutError:
            if not deadline.expired():  # not the body's deadline: the app's own
                raise
            if not started["response"]:
                await send_error(send, body.late())

    def _client(self, scope, headers: dict[str, str]) -> str:
        """Whose upload slots a request takes: its API key (already checked) when keys are configured, else
        its address (uvicorn's, from X-Forwarded-For only behind a trusted proxy)."""
        if self.api_keys:
            key = headers.get("x-api-key") or headers.get("authorization", "").partition(" ")[2].strip()
            return "key:" + key
        client = scope.get("client")
        return "addr:" + (client[0] if client else "")

    def _refuse_from_headers(self, path: str, headers: dict[str, str]) -> HTTPException | None:
        if path not in OPEN_PATHS:
            error = api_key_error(self.api_keys, headers.get("authorization"), headers.get("x-api-key"))
            if error is not None:
                return error
        coding = headers.get("transfer-encoding")
        if coding is not None and [c.strip() for c in coding.lower().split(",")] != ["chunked"]:
            return http_error(BadFraming(f"Transfer-Encoding {coding[:100]!r} is not supported: send the body plain "
                                         "or chunked"))
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body_bytes:
            return http_error(BodyTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes"))
        return None


class _GuardedBody:
    """One request's `receive`, counting bytes against the limit and the clock against the timeout and the
    minimum rate, in the client's upload slot."""

    def __init__(self, limits: LimitsAndMetrics, receive, has_body: bool, client: str):
        self.limits = limits
        self._receive = receive
        self.has_body = has_body
        self.client = client
        self.size = 0
        self.started: float | None = None
        self.deadline_cm = None  # the app's one deadline (asyncio.timeout), armed while the body arrives
        self.counted = False
        self.finished = not has_body

    def deadline(self) -> float:
        """When the body must be in (time.monotonic()): `body_timeout_s` after its start, sooner when it
        arrives slower than the minimum rate after the grace period."""
        limits, end = self.limits, self.started + self.limits.body_timeout_s
        if limits.min_rate:
            end = min(end, self.started + limits.grace_s + self.size / limits.min_rate)
        return end

    def late(self) -> HTTPException:
        limits = self.limits
        if limits.min_rate and self.started + limits.grace_s + self.size / limits.min_rate < self.started + limits.body_timeout_s:
            return http_error(BodyTooSlow(f"the request body arrived slower than {limits.min_rate} bytes/s"))
        return http_error(BodyTooSlow(f"the request body did not arrive within {limits.body_timeout_s:g} s"))

    def _arm(self) -> None:
        if self.deadline_cm is not None:  # the deadline cancels the app wherever it waits
            loop = asyncio.get_running_loop()
            self.deadline_cm.reschedule(loop.time() + self.deadline() - time.monotonic())

    async def receive(self):
        if self.finished:  # after the body: disconnect notifications and the like, unguarded
            return await self._receive()
        if self.started is None:  # the first read of the body: take an upload slot
            limits = self.limits
            if limits.uploads >= limits.max_uploads:
                raise http_error(TooManyUploads(f"{limits.uploads} request bodies are being received; retry shortly"))
            mine = limits.client_uploads.get(self.client, 0)
            if mine >= limits.max_client_uploads:
                raise http_error(TooManyUploads(f"{mine} request bodies of this client are being received (limit "
                                                f"{limits.max_client_uploads}); retry shortly"))
            limits.uploads += 1
            limits.client_uploads[self.client] = mine + 1
            self.counted = True
            self.started = time.monotonic()
            self._arm()
        try:
            if self.deadline_cm is not None:
                message = await self._receive()
            else:
                message = await _within(self._receive(), max(self.deadline() - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            self.done()
            raise self.late() from None
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limits.max_body_bytes:
                self.done()
                raise http_error(BodyTooLarge(f"request body is over the limit of {self.limits.max_body_bytes} bytes"))
            if not message.get("more_body", False):
                self.done()
            elif self.limits.min_rate:
                self._arm()  # more bytes, a later deadline
        else:
            self.done()
        return message

    def done(self) -> None:
        self.finished = True
        if self.deadline_cm is not None:
            if not self.deadline_cm.expired():
                self.deadline_cm.reschedule(None)  # the body is in (or refused): the deadline no longer applies
            self.deadline_cm = None
        if self.counted:
            self.counted = False
            self.limits.uploads -= 1
            left = self.limits.client_uploads[self.client] - 1
            if left:
                self.limits.client_uploads[self.client] = left
            else:
                del self.limits.client_uploads[self.client]


async def _within(awaitable, seconds: float):
    """`await awaitable`, or asyncio.TimeoutError after `seconds` (Python 3.10, the CUDA image's Ubuntu 22.04,
    has no asyncio.timeout: one deadline per read there)."""
    return await asyncio.wait_for(awaitable, seconds)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}


def _has_body(headers: dict[str, str]) -> bool:
    length = headers.get("content-length", "").strip()
    return "chunked" in headers.get("transfer-encoding", "").lower() or (length.isdigit() and int(length) > 0)


async def send_error(send, error: HTTPException) -> None:
    """A JSON error answer sent straight from the middleware, in the app's `{"detail": ...}` shape."""
    body = json.dumps({"detail": error.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})

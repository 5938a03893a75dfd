"""Every error answer of the service, decided here: which status (and `Retry-After`) each error gets, and
how its `{"detail": ...}` is written so that it can always be sent as JSON.

`http_error` is the one mapping from an error to its answer: the library's errors (bad input: 400, 413,
415 or 422; the MLLM peer down or slow: 502 or 504), the batcher's (queue full: 429; waited too long:
504), the service's own (`Unavailable`: 503; a request body too large, too slow or one too many: 413,
408, 429). Routes and dependencies just raise; `install_error_handlers` turns every such error into its
answer through `http_error`, and the middleware calls it for the body's limits.

FastAPI's default 422 echoes each invalid input back. That fails (a 500) when the input is a NaN or an
infinity (not JSON) or holds a lone UTF-16 surrogate (not UTF-8), and it sends a 20 MB input straight back.
Here a validation error keeps its `type`, `loc` and `msg` and its scalar `ctx`, never the input, and every
string is escaped and shortened; an `HTTPException`'s detail gets the same treatment.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from t2i_reward.rewarders.errors import (
    ImageTooLargeError,
    InvalidBodyError,
    InvalidImageError,
    MalformedBodyError,
    RewardError,
    UnsupportedMediaTypeError,
    public_message,
)
from t2i_reward.rewarders.mllm import MLLMError

from .batcher import ClientGone, QueueFullError, QueueTimeoutError

log = logging.getLogger(__name__)

MAX_ERRORS = 20  # a list of 10,000 bad prompts gets a readable answer, not 10,000 errors
MAX_CHARS = 500


class Unavailable(RuntimeError):
    """Something a route needs is not there yet, or failed (the models, the prompt index, Redis, the MLLM
    peer): a 503, with `retry_after` seconds when retrying soon may succeed."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class BodyTooLarge(RuntimeError):
    """The request body is over `max_body_bytes` (413)."""


class BodyTooSlow(RuntimeError):
    """The request body did not arrive within `body_timeout_s` (408)."""


class TooManyUploads(RuntimeError):
    """More request bodies are arriving at once than `max_concurrent_uploads`, or from one client than
    `max_client_uploads` (429)."""


class BadFraming(RuntimeError):
    """A request whose body framing the service does not take: a Transfer-Encoding other than chunked (400)."""


class NotServed(RuntimeError):
    """An endpoint this deployment of the service does not serve, and why (501): `/reward/gradient` on Ray."""


# errors `http_error` answers; anything else is a bug: a 500
SERVICE_ERRORS = (RewardError, QueueFullError, QueueTimeoutError, Unavailable, BodyTooLarge, BodyTooSlow, TooManyUploads,
                  BadFraming, ClientGone, NotServed)
RETRY_AFTER_S = {429: 1, 504: 1}  # busy or slow now: worth a retry in a second


def error_status(e: Exception) -> int:
    """The HTTP status of an error of `SERVICE_ERRORS`."""
    if isinstance(e, Unavailable):
        return 503
    if isinstance(e, NotServed):
        return 501
    if isinstance(e, ClientGone):  # nobody reads it: nginx's "client closed request", for the metrics and logs
        return 499
    if isinstance(e, MLLMError):  # the MLLM peer (vlm_judge) is down, slow, or answered garbage: not the caller's fault
        return 504 if e.kind == "timeout" else 502
    if isinstance(e, (QueueFullError, TooManyUploads)):
        return 429
    if isinstance(e, QueueTimeoutError):
        return 504
    if isinstance(e, (ImageTooLargeError, BodyTooLarge)):
        return 413
    if isinstance(e, BodyTooSlow):
        return 408
    if isinstance(e, (InvalidImageError, MalformedBodyError, BadFraming)):
        return 400
    if isinstance(e, UnsupportedMediaTypeError):
        return 415
    return 422  # any other bad input


def http_error(e: Exception, detail: Any = None) -> HTTPException:
    """The answer to error `e`: its status, `detail` (default: its message; a JSON body's schema errors
    as their list) and `Retry-After` when a retry may succeed. A server-side failure (5xx: a peer, Redis,
    the models) is logged in full and answered without URLs or paths (`public_message`)."""
    status = error_status(e)
    retry_after = e.retry_after if isinstance(e, Unavailable) else RETRY_AFTER_S.get(status)
    if detail is None:
        detail = e.errors if isinstance(e, InvalidBodyError) else str(e)
    if status >= 500 and isinstance(detail, str):
        log.warning("answered %d: %s", status, detail)
        detail = public_message(detail)
    return HTTPException(status, detail, headers=None if retry_after is None else {"Retry-After": str(retry_after)})


def json_safe(value: Any, limit: int = MAX_CHARS) -> Any:
    """`value` with strings escaped to valid UTF-8 and shortened, non-finite floats as strings, and
    anything else that JSON cannot hold as its (escaped) string."""
    if isinstance(value, str):
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return text if len(text) <= limit else text[:limit] + "..."
    if value is None or isinstance(value, int):  # bools too
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {json_safe(str(k), 100): json_safe(v, limit) for k, v in list(value.items())[:MAX_ERRORS]}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, limit) for v in value[:MAX_ERRORS]]
    return json_safe(str(value), limit)


def _message(error: dict) -> str:
    ctx = error.get("ctx") or {}
    if error["type"] == "too_short" and ctx.get("actual_length") == 0:  # "should have at least 1 item, not 0"
        return "must not be empty"
    return error["msg"]


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    detail = []
    for e in errors[:MAX_ERRORS]:
        item = {"type": e["type"], "loc": [json_safe(p, 100) for p in e["loc"]], "msg": json_safe(_message(e))}
        ctx = {k: v for k, v in (e.get("ctx") or {}).items() if isinstance(v, (str, int, float))}  # bounds, not exceptions
        if ctx:
            item["ctx"] = json_safe(ctx)
        detail.append(item)
    if len(errors) > MAX_ERRORS:
        detail.append({"type": "too_many_errors", "loc": [], "msg": f"{len(errors) - MAX_ERRORS} more errors not shown"})
    return JSONResponse(status_code=422, content={"detail": detail})


async def http_exception(request: Request, exc: StarletteHTTPException):
    exc.detail = json_safe(exc.detail, 2000)
    if exc.status_code == 405:  # Starlette's Allow names the first route of the path only (POST /jobs: not GET)
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
    return await http_exception_handler(request, exc)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at this request's path."""
    from starlette.routing import Match

    return [method for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)]


async def service_error(request: Request, exc: Exception):
    return await http_exception(request, http_error(exc))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_exception)  # fastapi's HTTPException is one too
    for error in SERVICE_ERRORS:
        app.add_exception_handler(error, service_error)

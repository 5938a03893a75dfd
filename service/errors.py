"""Exception handlers: every error answer is `{"detail": ...}` that can always be written as JSON.

FastAPI's default 422 echoes each invalid input back. That fails (a 500) when the input is a NaN or an
infinity (not JSON) or holds a lone UTF-16 surrogate (not UTF-8), and it sends a 20 MB input straight back.
Here a validation error keeps its `type`, `loc` and `msg` and its scalar `ctx`, never the input, and every
string is escaped and shortened; an `HTTPException`'s detail gets the same treatment.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

MAX_ERRORS = 20  # a list of 10,000 bad prompts gets a readable answer, not 10,000 errors
MAX_CHARS = 500


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


async def http_error(request: Request, exc: HTTPException):
    exc.detail = json_safe(exc.detail, 2000)
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)

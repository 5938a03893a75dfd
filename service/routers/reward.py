"""POST /reward (JSON or multipart) and POST /reward/gradient (safetensors in, safetensors out).

The router only decodes the body; the library checks the request against the service's limits
(`Mixture.check_request`, `Mixture.check_tensor`), and the batcher admits it and runs the model.
Error statuses are set in one place, `error_status`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rewarders import ImageTooLargeError, InvalidImageError, RewardError

from ..batcher import QueueFullError, QueueTimeoutError
from ..deps import AuthDep, BatcherDep
from ..schemas import ErrorResponse, RewardRequest, RewardResponse

router = APIRouter(prefix="/reward", tags=["reward"], dependencies=[AuthDep])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 408, 413, 415, 422, 429, 503, 504)}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["prompt", "images"],
    "properties": {
        "prompt": {"type": "string"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "weights": {"type": "string", "description": "JSON object of per-expert weights"},
    },
}


def error_status(e: Exception) -> int:
    """The HTTP status of an error from the library or the batcher (anything else is a 500)."""
    if isinstance(e, QueueFullError):
        return 429
    if isinstance(e, QueueTimeoutError):
        return 504
    if isinstance(e, ImageTooLargeError):
        return 413
    if isinstance(e, InvalidImageError):
        return 400
    return 422


def http_error(e: Exception) -> HTTPException:
    status = error_status(e)
    return HTTPException(status, str(e), headers={"Retry-After": "1"} if status in (429, 504) else None)


async def run_model_call(coro):
    """Await a batcher call, turning library and admission errors into their HTTP answers."""
    try:
        return await coro
    except (RewardError, QueueFullError, QueueTimeoutError) as e:
        raise http_error(e) from None


def admit(batcher) -> None:
    """429 before the body is read when the queue is already full."""
    try:
        batcher.check_admission()
    except QueueFullError as e:
        raise http_error(e) from None


def content_type(request: Request) -> str:
    """The media type of the request body, without parameters, lower-cased ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def decode_image_string(s: str, index: int) -> bytes:
    if s.startswith("data:"):
        header, sep, s = s.partition(",")
        if not sep or ";base64" not in header:
            raise HTTPException(400, f"images[{index}]: data URL must be base64-encoded (data:image/...;base64,...)")
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"images[{index}]: not valid base64") from None
    if not data:
        raise HTTPException(400, f"images[{index}]: empty image")
    return data


async def parse_reward_request(request: Request, max_images: int) -> tuple[str, list[bytes], dict | None]:
    """The body's prompt, encoded images and weights. `max_images` only bounds how many multipart
    parts the parser reads (the body size is bounded already); the library checks the count."""
    ctype = content_type(request)
    if ctype == "application/json":
        body = await request.body()
        try:
            req = RewardRequest.model_validate_json(body)
        except ValidationError as e:
            raise HTTPException(422, json.loads(e.json(include_url=False, include_input=False))) from None
        return req.prompt, [decode_image_string(s, i) for i, s in enumerate(req.images)], req.weights
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=16)
        except HTTPException:  # the body's own limits (size, time), raised while it streams in
            raise
        except Exception as e:  # starlette raises for malformed bodies and too many parts
            raise HTTPException(400, f"cannot read multipart body: {e}") from None
        prompt = form.get("prompt")
        if not isinstance(prompt, str):
            raise HTTPException(422, "multipart field 'prompt' (text) is required")
        files = form.getlist("images")
        if any(isinstance(f, str) for f in files):
            raise HTTPException(422, "multipart field 'images' must hold files")
        weights = None
        if form.get("weights") is not None:
            try:
                weights = json.loads(form.get("weights"))
            except (TypeError, json.JSONDecodeError):
                raise HTTPException(422, "multipart field 'weights' must be a JSON object") from None
            if not isinstance(weights, dict):
                raise HTTPException(422, "multipart field 'weights' must be a JSON object")
        return prompt, [await f.read() for f in files], weights
    raise HTTPException(415, f"unsupported content type {ctype or '(none)'!r}: send application/json or multipart/form-data")


@router.post(
    "",
    response_model=RewardResponse,
    responses=ERRORS,
    summary="Score images against a prompt",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": RewardRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
    },
)
async def reward(request: Request, batcher: BatcherDep) -> JSONResponse:
    """Score one or more images (base64 / data URLs in JSON, or files in multipart) against a prompt."""
    admit(batcher)
    prompt, images, weights = await parse_reward_request(request, batcher.limits.max_images)
    check = functools.partial(batcher.rewarder.check_request, limits=batcher.limits)
    # decoding and validation off the event loop, in the default thread pool
    prompt, decoded, weights = await run_model_call(asyncio.to_thread(check, prompt, images, weights))
    result = await run_model_call(batcher.score(prompt, decoded, weights))
    # the result is already typed; skip a second validation pass (the schema stays documented above)
    return JSONResponse(result.to_dict())


@router.post(
    "/gradient",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "safetensors: rewards, grad, components.*"}},
    summary="Rewards and d(total)/d(pixels) for image tensors",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "safetensors with tensor `images` (B, 3, H, W), float16/float32 in [0, 1]; metadata "
            "`prompts`: a JSON list with one prompt per image (or a JSON string for all); optional `weights`: JSON object.",
        }
    },
)
async def reward_gradient(request: Request, batcher: BatcherDep) -> Response:
    """For workers that keep the diffusion model on their own GPU: send pixels, get rewards and gradients.

    The answer is safetensors with `rewards` (B,), `grad` (B, 3, H, W) = d(sum of totals)/d(images),
    and `components.<expert>` (B,). On the worker: `images.backward(-grad)` to maximise the reward.
    """
    if content_type(request) != "application/octet-stream":
        raise HTTPException(415, "send the image tensors as safetensors with content type application/octet-stream")
    admit(batcher)
    body = await request.body()
    try:
        tensors = load_safetensors(body)
        metadata = _safetensors_metadata(body)
    except Exception:
        raise HTTPException(400, "body is not a valid safetensors file") from None
    images = tensors.get("images")
    if images is None:
        raise HTTPException(422, "safetensors must hold a tensor named 'images'")
    try:
        prompts = json.loads(metadata.get("prompts", "null"))
        weights = json.loads(metadata["weights"]) if "weights" in metadata else None
    except json.JSONDecodeError:
        raise HTTPException(422, "metadata 'prompts' and 'weights' must be JSON") from None
    if not (isinstance(prompts, str) or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))):
        raise HTTPException(422, "metadata 'prompts' must be a JSON list of strings (one per image) or one string")
    if weights is not None and not isinstance(weights, dict):
        raise HTTPException(422, "metadata 'weights' must be a JSON object")
    out = await run_model_call(batcher.reward_and_gradient(images, prompts, weights))
    payload = save_safetensors(out, metadata={"experts": json.dumps(batcher.rewarder.sources())})
    return Response(payload, media_type="application/octet-stream")


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    return {k: v for k, v in meta.items() if isinstance(v, str)}



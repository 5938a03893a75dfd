"""POST /reward (JSON or multipart) and POST /reward/gradient (safetensors in, safetensors out)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json

import torch
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rewarders import ImageTooLargeError, InvalidImageError, RewardError

from ..batcher import QueueFullError
from ..deps import AuthDep, BatcherDep, SettingsDep
from ..schemas import ErrorResponse, RewardRequest, RewardResponse

router = APIRouter(prefix="/reward", tags=["reward"], dependencies=[AuthDep])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 429, 503)}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["prompt", "images"],
    "properties": {
        "prompt": {"type": "string"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "weights": {"type": "string", "description": "JSON object of per-expert weights"},
    },
}


def error_status(e: RewardError) -> int:
    if isinstance(e, ImageTooLargeError):
        return 413
    if isinstance(e, InvalidImageError):
        return 400
    return 422


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
    ctype = content_type(request)
    if ctype == "application/json":
        body = await request.body()
        try:
            req = RewardRequest.model_validate_json(body)
        except ValidationError as e:
            raise HTTPException(422, json.loads(e.json(include_url=False, include_input=False))) from None
        if len(req.images) > max_images:
            raise HTTPException(422, f"{len(req.images)} images; the limit is {max_images} per request")
        return req.prompt, [decode_image_string(s, i) for i, s in enumerate(req.images)], req.weights
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=16)
        except Exception as e:  # starlette raises for malformed bodies and too many parts
            raise HTTPException(400, f"cannot read multipart body: {e}") from None
        prompt = form.get("prompt")
        if not isinstance(prompt, str):
            raise HTTPException(422, "multipart field 'prompt' (text) is required")
        files = form.getlist("images")
        if any(isinstance(f, str) for f in files):
            raise HTTPException(422, "multipart field 'images' must hold files")
        if len(files) > max_images:
            raise HTTPException(422, f"{len(files)} images; the limit is {max_images} per request")
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
async def reward(request: Request, batcher: BatcherDep, settings: SettingsDep) -> JSONResponse:
    """Score one or more images (base64 / data URLs in JSON, or files in multipart) against a prompt."""
    prompt, images, weights = await parse_reward_request(request, settings.max_images)
    try:
        # decoding and validation off the event loop, in the default thread pool
        prompt, decoded, weights = await asyncio.to_thread(
            functools.partial(
                batcher.rewarder.check_request,
                max_prompt_chars=settings.max_prompt_chars,
                max_images=settings.max_images,
                max_image_pixels=settings.max_image_pixels,
            ),
            prompt,
            images,
            weights,
        )
        result = await batcher.score(prompt, decoded, weights)
    except RewardError as e:
        raise HTTPException(error_status(e), str(e)) from None
    except QueueFullError as e:
        raise HTTPException(429, str(e), headers={"Retry-After": "1"}) from None
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
async def reward_gradient(request: Request, batcher: BatcherDep, settings: SettingsDep) -> Response:
    """For workers that keep the diffusion model on their own GPU: send pixels, get rewards and gradients.

    The answer is safetensors with `rewards` (B,), `grad` (B, 3, H, W) = d(sum of totals)/d(images),
    and `components.<expert>` (B,). On the worker: `images.backward(-grad)` to maximise the reward.
    """
    if content_type(request) != "application/octet-stream":
        raise HTTPException(415, "send the image tensors as safetensors with content type application/octet-stream")
    body = await request.body()
    try:
        tensors = load_safetensors(body)
    except Exception:
        raise HTTPException(400, "body is not a valid safetensors file") from None
    metadata = _safetensors_metadata(body)
    images = tensors.get("images")
    if images is None:
        raise HTTPException(422, "safetensors must hold a tensor named 'images'")
    if images.dtype not in (torch.float16, torch.float32, torch.bfloat16) or images.ndim != 4 or images.shape[1] != 3:
        raise HTTPException(422, f"'images' must be float16/float32 of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    if b == 0 or h == 0 or w == 0:
        raise HTTPException(422, "'images' is empty")
    if b > settings.max_images:
        raise HTTPException(422, f"{b} images; the limit is {settings.max_images} per request")
    if h * w > settings.max_image_pixels:
        raise HTTPException(413, f"{w}x{h} images are over the limit of {settings.max_image_pixels} pixels")
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1:
        raise HTTPException(422, "'images' values must be finite and in [0, 1]")
    try:
        prompts = json.loads(metadata.get("prompts", "null"))
        weights = json.loads(metadata["weights"]) if "weights" in metadata else None
    except json.JSONDecodeError:
        raise HTTPException(422, "metadata 'prompts' and 'weights' must be JSON") from None
    if not (isinstance(prompts, str) or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))):
        raise HTTPException(422, "metadata 'prompts' must be a JSON list of strings (one per image) or one string")
    if weights is not None and not isinstance(weights, dict):
        raise HTTPException(422, "metadata 'weights' must be a JSON object")

    def run():
        x = images.float().requires_grad_(True)
        scores = batcher.rewarder(x, prompts, weights, max_prompt_chars=settings.max_prompt_chars)
        scores.total.sum().backward()
        out = {"rewards": scores.total.detach().cpu(), "grad": x.grad.detach().cpu().contiguous()}
        out.update({f"components.{n}": s.detach().cpu() for n, s in scores.components.items()})
        return out

    try:
        out = await batcher.run_on_model_thread(run)
    except RewardError as e:
        raise HTTPException(error_status(e), str(e)) from None
    payload = save_safetensors(out, metadata={"experts": json.dumps(batcher.rewarder.sources())})
    return Response(payload, media_type="application/octet-stream")


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    return {k: v for k, v in meta.items() if isinstance(v, str)}



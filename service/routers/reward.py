"""POST /reward (JSON, multipart or safetensors in; JSON or safetensors out) and POST /reward/gradient
(safetensors in, safetensors out).

The router only reads the body; the library checks the request against the service's limits and
prepares its pixels (`Mixture.check_request`, `check_tensor_request`, in the batcher's preprocessing
pool), and the batcher admits it and runs the model. Error statuses are set in one place, `error_status`.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from t2i_reward.rewarders import ImageTooLargeError, InvalidImageError, RewardError
from t2i_reward.rewarders.mllm import MLLMError

from ..batcher import QueueFullError, QueueTimeoutError
from ..deps import AuthDep, BatcherDep
from ..schemas import ErrorResponse, RewardRequest, RewardResponse

router = APIRouter(prefix="/reward", tags=["reward"], dependencies=[AuthDep])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 408, 413, 415, 422, 429, 503, 504)}

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "prompt": {"type": "string", "description": "one prompt for all images; or repeat `prompts`"},
        "prompts": {"type": "array", "items": {"type": "string"}, "description": "one prompt per image, in order"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "weights": {"type": "string", "description": "JSON object of per-expert weights"},
        "group_ids": {"type": "array", "items": {"type": "string"}, "description": "one group id per image"},
        "explain": {"type": "string", "enum": ["true", "false"]},
    },
}


def error_status(e: Exception) -> int:
    """The HTTP status of an error from the library or the batcher (anything else is a 500)."""
    if isinstance(e, MLLMError):  # the MLLM peer (vlm_judge) is down, slow, or answered garbage: not the caller's fault
        return 504 if e.kind == "timeout" else 502
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


@dataclass
class RewardBody:
    """A /reward body, decoded but not yet checked: encoded images, or one image tensor."""

    prompts: Any  # one prompt (str) or one per image (list); the library checks it
    images: list[bytes] | None = None
    tensor: Any = None
    weights: dict | None = None
    group_ids: list | None = None
    explain: bool = False


def _one_of(prompt, prompts, where: str):
    if prompt is not None and prompts is not None:
        raise HTTPException(422, f"send either {where} 'prompt' (one for all images) or 'prompts' (one per image), not both")
    if prompt is None and prompts is None:
        raise HTTPException(422, f"{where} 'prompt' (one for all images) or 'prompts' (one per image) is required")
    return prompt if prompt is not None else prompts


def _json_field(value, name: str, kind: type, where: str):
    try:
        out = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        raise HTTPException(422, f"{where} '{name}' must be a JSON {kind.__name__}") from None
    if not isinstance(out, kind):
        raise HTTPException(422, f"{where} '{name}' must be a JSON {kind.__name__}")
    return out


def _flag(value, name: str, where: str) -> bool:
    if value is None:
        return False
    if str(value).strip().lower() not in ("true", "false", "1", "0"):
        raise HTTPException(422, f"{where} '{name}' must be true or false")
    return str(value).strip().lower() in ("true", "1")


async def parse_reward_request(request: Request, max_images: int) -> RewardBody:
    """The body's prompts, images (encoded, or one tensor), weights, group ids and explain flag.
    `max_images` only bounds how many multipart parts the parser reads (the body size is bounded already);
    the library checks the counts."""
    ctype = content_type(request)
    if ctype == "application/json":
        body = await request.body()
        try:
            req = RewardRequest.model_validate_json(body)
        except ValidationError as e:
            raise HTTPException(422, json.loads(e.json(include_url=False, include_input=False))) from None
        return RewardBody(_one_of(req.prompt, req.prompts, "field"), [decode_image_string(s, i) for i, s in enumerate(req.images)],
                          weights=req.weights, group_ids=req.group_ids, explain=req.explain)
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=2 * max_images + 8)
        except HTTPException:  # the body's own limits (size, time), raised while it streams in
            raise
        except Exception as e:  # starlette raises for malformed bodies and too many parts
            raise HTTPException(400, f"cannot read multipart body: {e}") from None
        prompts = form.getlist("prompts") or None
        prompt = form.get("prompt")
        if any(not isinstance(p, str) for p in [prompt, *(prompts or [])] if p is not None):
            raise HTTPException(422, "multipart fields 'prompt' and 'prompts' must be text")
        prompts = _one_of(prompt, prompts, "multipart field")
        files = form.getlist("images")
        if any(isinstance(f, str) for f in files):
            raise HTTPException(422, "multipart field 'images' must hold files")
        group_ids = form.getlist("group_ids") or None
        if group_ids is not None and any(not isinstance(g, str) for g in group_ids):
            raise HTTPException(422, "multipart fields 'group_ids' must be text")
        weights = _json_field(form.get("weights"), "weights", dict, "multipart field") if form.get("weights") is not None else None
        return RewardBody(prompts, [await f.read() for f in files], weights=weights,
                          group_ids=group_ids, explain=_flag(form.get("explain"), "explain", "multipart field"))
    if ctype == "application/octet-stream":
        tensors, meta = read_safetensors(await request.body())
        if "prompts" not in meta:
            raise HTTPException(422, "safetensors metadata 'prompts' (a JSON list with one prompt per image, or one string) is required")
        try:
            prompts = json.loads(meta["prompts"])
        except json.JSONDecodeError:
            prompts = meta["prompts"]  # a bare string: one prompt for every image
        return RewardBody(
            prompts, tensor=tensors["images"],
            weights=_json_field(meta["weights"], "weights", dict, "metadata") if "weights" in meta else None,
            group_ids=_json_field(meta["group_ids"], "group_ids", list, "metadata") if "group_ids" in meta else None,
            explain=_flag(meta.get("explain"), "explain", "metadata"),
        )
    raise HTTPException(415, f"unsupported content type {ctype or '(none)'!r}: send application/json, multipart/form-data "
                             "or application/octet-stream (safetensors)")


def read_safetensors(body: bytes) -> tuple[dict, dict[str, str]]:
    """The tensors and string metadata of a safetensors body that must hold `images`."""
    try:
        tensors = load_safetensors(body)
        metadata = _safetensors_metadata(body)
    except Exception:
        raise HTTPException(400, "body is not a valid safetensors file") from None
    if "images" not in tensors:
        raise HTTPException(422, "safetensors must hold a tensor named 'images'")
    return tensors, metadata


def wants_tensors(request: Request) -> bool:
    """True when the client asks for a safetensors answer (`Accept: application/octet-stream`)."""
    accept = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    return "application/octet-stream" in accept


def result_tensors(result, experts: dict) -> bytes:
    """A /reward result as safetensors: `rewards`, `components.<expert>`, with group ids `advantages` and
    `advantages.<expert>`, with explain `percentiles.<expert>` (NaN where the calibration lacks one)."""
    names = list(result.component_rewards)
    out = {"rewards": torch.tensor([im.total for im in result.images], dtype=torch.float32)}
    out.update({f"components.{n}": torch.tensor([im.components[n] for im in result.images], dtype=torch.float32) for n in names})
    if result.advantages is not None:
        out["advantages"] = torch.tensor(result.advantages["total"], dtype=torch.float32)
        out.update({f"advantages.{n}": torch.tensor(result.advantages[n], dtype=torch.float32) for n in names})
    if result.images[0].percentiles is not None:
        nan = float("nan")
        out.update({f"percentiles.{n}": torch.tensor([nan if im.percentiles[n] is None else im.percentiles[n] for im in result.images],
                                                     dtype=torch.float32) for n in names})
    meta = {"mean_reward": repr(result.mean_reward), "component_rewards": json.dumps(result.component_rewards),
            "experts": json.dumps(experts)}
    return save_safetensors(out, metadata=meta)


_TENSOR_BODY = {"type": "string", "format": "binary", "description": "safetensors: tensor `images`, uint8 (B, H, W, 3) or "
                "float16/float32 (B, 3, H, W) in [0, 1]; metadata `prompts` (a JSON list, one per image, or one string), "
                "optional `weights` (JSON object), `group_ids` (JSON list), `explain` (true/false)."}


@router.post(
    "",
    response_model=RewardResponse,
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}},
                               "description": "JSON, or with `Accept: application/octet-stream` safetensors: rewards, "
                               "components.<expert>, advantages[.<expert>], percentiles.<expert>"}},
    summary="Score images against their prompts",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": RewardRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
                "application/octet-stream": {"schema": _TENSOR_BODY},
            },
        }
    },
)
async def reward(request: Request, batcher: BatcherDep) -> Response:
    """Score images against one prompt, or (prompt, image) pairs: base64 / data URLs in JSON, files in
    multipart, or a raw image tensor in safetensors (never encoded as an image)."""
    admit(batcher)
    phases, t = {}, time.monotonic()
    body = await parse_reward_request(request, batcher.limits.max_images)
    phases["read"], t = time.monotonic() - t, time.monotonic()
    rewarder, opts = batcher.rewarder, dict(limits=batcher.limits, group_ids=body.group_ids, explain=body.explain)
    # decoding, checking and preprocessing in the preprocessing pool, beside the model thread
    if body.tensor is not None:
        checked = await run_model_call(batcher.prepare_request(rewarder.check_tensor_request, body.prompts, body.tensor, body.weights, **opts))
    else:
        checked = await run_model_call(batcher.prepare_request(rewarder.check_request, body.prompts, body.images, body.weights, **opts))
    phases["prepare"] = time.monotonic() - t
    result = await run_model_call(batcher.score(checked, timing=phases))
    t = time.monotonic()
    if wants_tensors(request):
        response = Response(result_tensors(result, result.experts), media_type="application/octet-stream")
    else:  # the result is already typed; skip a second validation pass (the schema stays documented above)
        response = JSONResponse(result.to_dict())
    phases["encode"] = time.monotonic() - t
    response.headers["server-timing"] = server_timing(phases)
    return response


def server_timing(phases: dict[str, float]) -> str:
    """A `Server-Timing` header (milliseconds) from phase durations in seconds: where a request's time went
    on the server (read the body, prepare pixels, wait in the queue, the micro-batch's model call, encode)."""
    return ", ".join(f"{name};dur={1e3 * seconds:.2f}" for name, seconds in phases.items())


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
    tensors, metadata = read_safetensors(await request.body())
    images = tensors["images"]
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



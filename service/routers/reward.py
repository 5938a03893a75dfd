"""POST /reward (JSON, multipart or safetensors in; JSON or safetensors out) and POST /reward/gradient
(safetensors in, safetensors out).

A route reads the body (never cached on the request), is admitted with its bytes (`MicroBatcher.admit`:
a ticket that stops its work if the client goes), decodes it with the wire format (`rewarders.wire`, which
the clients share) in the preprocessing pool, makes one call into the batcher (which checks the request against the service's limits, prepares its
pixels in the preprocessing pool, admits it and runs the model), and encodes the answer with the wire
format. Errors are raised as they come; `errors.http_error` gives each its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from t2i_reward.rewarders import wire
from t2i_reward.rewarders.errors import MalformedBodyError

from ..batcher import MicroBatcher, Ticket
from ..deps import AuthDep, BatcherDep
from ..errors import NotServed
from ..pooled import GRADIENT_NOT_SERVED
from ..schemas import error_responses

router = APIRouter(prefix="/reward", tags=["reward"], dependencies=[AuthDep])

ERRORS = error_responses(400, 401, 403, 408, 413, 415, 422, 429, 503, 504)


async def read_body(request: Request) -> bytes:
    """The body's bytes, read through the middleware's guarded `receive` and never cached on the request:
    once decoded, nothing keeps them."""
    return b"".join([chunk async for chunk in request.stream()])


async def read_reward_request(request: Request, batcher: MicroBatcher) -> tuple[wire.RewardBody, Ticket]:
    """The /reward body, decoded in the preprocessing pool (safetensors and JSON parsing hold the GIL: never on
    the event loop), and its admission ticket, which holds the body's bytes until the answer. The media type
    is checked first (415 before the body is read). `max_images` bounds how many multipart parts the parser
    reads (the body size is bounded already); the library checks the counts."""
    ctype = wire.media_type(request.headers.get("content-type"))
    wire.check_reward_media_type(ctype)
    if ctype != wire.MULTIPART:
        data = await read_body(request)
        ticket = batcher.admit(2 * len(data))  # the body and what it decodes to, until the pixels replace them
        try:
            return await batcher.prepare(wire.decode_reward_request, ctype, data, batcher.limits), ticket
        except BaseException:
            ticket.release()
            raise
    max_images = batcher.limits.max_images
    try:
        form = await request.form(max_files=max_images + 1, max_fields=2 * max_images + 8)
    except HTTPException:  # the body's own limits (size, time), raised while it streams in
        raise
    except Exception as e:  # starlette raises for malformed bodies and too many parts
        raise MalformedBodyError(f"cannot read multipart body: {e}") from None
    try:
        fields: dict[str, list[str | bytes]] = {}
        for name, value in form.multi_items():
            fields.setdefault(name, []).append(value if isinstance(value, str) else await value.read())
    finally:
        await form.close()
    ticket = batcher.admit(sum(len(v) for values in fields.values() for v in values))
    try:
        return await batcher.prepare(wire.decode_reward_request, ctype, fields), ticket
    except BaseException:
        ticket.release()
        raise


@contextlib.asynccontextmanager
async def stop_when_client_goes(request: Request, ticket: Ticket):
    """While the body runs, watch the connection (its body is read: the next message is the disconnect): a
    client that goes stops its request's work between images and takes it out of the model's queue."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        ticket.client_gone()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


@router.post(
    "",
    response_model=wire.RewardResponse,
    responses={**ERRORS, 200: {"content": {wire.OCTET: {}},
                               "description": "JSON, or with `Accept: application/octet-stream` safetensors: rewards, "
                               "components.<expert>, advantages[.<expert>], percentiles.<expert>"}},
    summary="Score images against their prompts",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                wire.JSON: {"schema": wire.RewardRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
                wire.MULTIPART: {"schema": wire.MULTIPART_SCHEMA},
                wire.OCTET: {"schema": wire.TENSOR_SCHEMA},
            },
        }
    },
)
async def reward(request: Request, batcher: BatcherDep) -> Response:
    """Score images against one prompt, or (prompt, image) pairs: base64 / data URLs in JSON, files in
    multipart, or a raw image tensor in safetensors (never encoded as an image)."""
    batcher.check_admission()  # a full queue is a 429 before the body is read
    phases, t = {}, time.monotonic()
    body, ticket = await read_reward_request(request, batcher)
    phases["read"] = time.monotonic() - t
    with ticket:
        async with stop_when_client_goes(request, ticket):
            result = await batcher.reward(body, timing=phases, ticket=ticket)  # adds 'prepare', 'queue' and 'model'
    t = time.monotonic()
    if wire.accepts_tensors(request.headers.get("accept")):
        response = Response(wire.encode_scores(result), media_type=wire.OCTET)
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
    responses={**ERRORS, **error_responses(501),
               200: {"content": {wire.OCTET: {}}, "description": "safetensors: rewards, grad, components.*"}},
    summary="Rewards and d(total)/d(pixels) for image tensors",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {wire.OCTET: {"schema": {"type": "string", "format": "binary"}}},
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
    if not batcher.rewarder.differentiable:  # the Ray deployment (service/pooled.py): 501, before the body is read
        raise NotServed(GRADIENT_NOT_SERVED)
    wire.check_gradient_media_type(wire.media_type(request.headers.get("content-type")))
    batcher.check_admission()
    data = await read_body(request)
    with batcher.admit(2 * len(data)) as ticket:
        body = await batcher.prepare(wire.decode_gradient_request, data, batcher.limits)
        del data  # decoded: the tensor is what the request holds now
        batcher.held(ticket, getattr(body.images, "nbytes", 0))
        async with stop_when_client_goes(request, ticket):
            out = await batcher.reward_and_gradient(body.images, body.prompts, body.weights, ticket, body.metadata)
    return Response(wire.encode_gradient_answer(out, batcher.rewarder.sources()), media_type=wire.OCTET)

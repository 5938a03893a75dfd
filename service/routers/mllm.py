"""The MLLM peer's endpoints: POST /verify (does each image match the prompt? score, reason, pass/fail) and
POST /prompts/enhance (n richer prompts that keep the user's intent). Both answer 503 when no peer is
configured, 502 when it is down or answers garbage, 504 when it is too slow (`errors.http_error` maps the
peer's `MLLMError`); the rest of the service does not depend on the peer."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from t2i_reward.finetune.spec import Text
from t2i_reward.prompter.enhance import MAX_ENHANCED, enhance_prompt
from t2i_reward.rewarders import Limits
from t2i_reward.rewarders.errors import RewardError
from t2i_reward.rewarders.images import decode_budget, open_image
from t2i_reward.rewarders.mllm import downscaled, question_for
from t2i_reward.rewarders.wire import decode_image_string

from ..deps import AuthDep, PeerDep, SettingsDep
from ..schemas import error_responses
from .health import public_peer

router = APIRouter(tags=["mllm"], dependencies=[AuthDep])
ERRORS = error_responses(400, 401, 403, 413, 422, 502, 503, 504)
MAX_VERIFY_IMAGES = 16


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text = Field(..., description="What the images should show.")
    images: list[str] = Field(..., min_length=1, max_length=MAX_VERIFY_IMAGES, description="Base64 or data URLs.")
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0, strict=True, description="Pass mark of P(yes); default: the setting.")


class Verdict(BaseModel):
    score: float = Field(..., description="The judge's probability that the image matches the prompt, in [0, 1].")
    reason: str = Field(..., description="The model's one-line reason.")
    passed: bool = Field(..., description="score >= threshold")


class VerifyResponse(BaseModel):
    threshold: float
    results: list[Verdict]
    peer: dict


class EnhanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(..., description="The user's prompt.")
    n: int = Field(1, ge=1, le=MAX_ENHANCED, strict=True, description="How many enhanced prompts: a JSON integer "
                   "(16.0 is refused with 422, as every integer field of the API is strict).")
    seed: int = Field(0, ge=0, le=2**31 - 1, strict=True, description="Seed of the first rewrite (the k-th uses seed + k).")


class EnhanceResponse(BaseModel):
    prompt: str
    prompts: list[str]


@router.post("/verify", response_model=VerifyResponse, responses=ERRORS)
async def verify(body: VerifyRequest, peer: PeerDep, settings: SettingsDep) -> VerifyResponse:
    """Stage 1's check: for each image, the judge's P(yes) that it matches the prompt, its reason, and pass/fail."""
    images = await asyncio.to_thread(shown_images, body.images, settings.limits(), peer.cfg.image_size)
    question = question_for(settings.verify_question, body.prompt)
    scores = await asyncio.gather(*(asyncio.to_thread(peer.yes_probability, im, question) for im in images))
    reasons = await asyncio.gather(*(asyncio.to_thread(peer.reason, im, question) for im in images))
    threshold = settings.verify_threshold if body.threshold is None else body.threshold
    return VerifyResponse(threshold=threshold, peer=public_peer(peer.describe()),
                          results=[Verdict(score=s, reason=r, passed=s >= threshold) for s, r in zip(scores, reasons)])


def shown_images(strings: list[str], limits: Limits, side: int) -> list[Image.Image]:
    """The images of a /verify body as the peer is shown them, in a worker thread (never on the event loop):
    every header checked and the request's pixels counted first, then one image at a time decoded and
    downscaled to the peer's `side` (what the peer would do itself), so only small copies are kept."""
    data = [decode_image_string(s, i) for i, s in enumerate(strings)]  # its errors name the image already
    decode_budget(data, limits)
    shown = []
    for i, d in enumerate(data):
        try:
            shown.append(downscaled(open_image(d, limits.max_image_pixels, limits.max_aspect_ratio), side))
        except RewardError as e:
            raise type(e)(f"images[{i}]: {e}") from None
    return shown


@router.post("/prompts/enhance", response_model=EnhanceResponse, responses=ERRORS)
async def enhance(body: EnhanceRequest, peer: PeerDep, settings: SettingsDep) -> EnhanceResponse:
    """`n` rewrites of the prompt by the MLLM peer, richer in detail, keeping the user's intent."""
    prompts = await asyncio.to_thread(enhance_prompt, peer, body.prompt, body.n, settings.enhance_system_prompt,
                                      settings.enhance_max_tokens, body.seed)
    return EnhanceResponse(prompt=body.prompt, prompts=prompts)

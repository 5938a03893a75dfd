"""POST /prompts: prompts by topic from the FAISS prompt index."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from finetune.spec import MAX_N_PROMPTS, MAX_TOPICS, Text
from rewarders.errors import RewardError

from ..deps import AuthDep, PrompterDep, SettingsDep
from ..schemas import ErrorResponse

router = APIRouter(prefix="/prompts", tags=["prompts"], dependencies=[AuthDep])
MAX_LENGTH = 100_000  # min_length / max_length filters: beyond any prompt of a corpus


class PromptsRequest(BaseModel):
    """Hard bounds in the schema; the settings (`max_topics`, `max_n_prompts`, `max_prompt_chars`) may
    tighten them. Ints are strict (`false` is not 0), floats finite, topics valid text without NUL."""

    model_config = ConfigDict(allow_inf_nan=False)

    topics: list[Text] = Field(..., min_length=1, max_length=MAX_TOPICS, description="Topics to find prompts for.", examples=[["artistic style", "animated style"]])
    n_prompts: int = Field(..., ge=1, le=MAX_N_PROMPTS, strict=True, description="Prompts per topic.", examples=[3])
    diversity: float = Field(0.0, ge=0.0, le=1.0, strict=True, description="0: most similar first; above 0: maximal marginal relevance re-ranking, so the prompts differ from each other.")
    min_length: Optional[int] = Field(None, ge=0, le=MAX_LENGTH, strict=True, description="Shortest prompt, in characters.")
    max_length: Optional[int] = Field(None, ge=1, le=MAX_LENGTH, strict=True, description="Longest prompt, in characters.")


class PromptsResponse(BaseModel):
    prompts: list[list[str]] = Field(..., description="Per topic, the prompts found, best first.")
    scores: list[list[float]] = Field(..., description="Per topic, each prompt's cosine similarity to the topic.")


@router.post("", response_model=PromptsResponse, summary="Prompts by topic",
             responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 408, 413, 422, 429, 503)})
async def prompts(body: PromptsRequest, prompter: PrompterDep, settings: SettingsDep) -> PromptsResponse:
    """For each topic, the `n_prompts` most similar prompts of the corpus (optionally diversified)."""
    if len(body.topics) > settings.max_topics:
        raise HTTPException(422, f"{len(body.topics)} topics; the limit is {settings.max_topics}")
    if body.n_prompts > settings.max_n_prompts:
        raise HTTPException(422, f"n_prompts is {body.n_prompts}; the limit is {settings.max_n_prompts}")
    if any(len(t) > settings.max_prompt_chars for t in body.topics):
        raise HTTPException(422, f"a topic is longer than {settings.max_prompt_chars} characters")
    if body.min_length is not None and body.max_length is not None and body.min_length > body.max_length:
        raise HTTPException(422, "min_length is greater than max_length")
    try:
        found, scores = await asyncio.to_thread(
            prompter.search, body.topics, body.n_prompts, body.diversity, body.min_length, body.max_length
        )
    except RewardError as e:
        raise HTTPException(422, str(e)) from None
    return PromptsResponse(prompts=found, scores=scores)

"""The error body every endpoint documents. The /reward bodies and answers are the wire format's
(`t2i_reward.rewarders.wire`: the clients and the router share them); the other endpoints keep their
request and response models beside their routes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    detail: str | list = Field(..., description="What was wrong with the request.")


def error_responses(*codes: int) -> dict:
    """The OpenAPI `responses` of a route that may answer these error statuses."""
    return {code: {"model": ErrorResponse} for code in codes}

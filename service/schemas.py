"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


class RewardRequest(BaseModel):
    prompt: str = Field(..., description="The prompt the images were generated from.", examples=["a red apple on a wooden table"])
    images: list[str] = Field(..., description="Images as base64 strings or data URLs (PNG, JPEG, WebP, ...).",
                              examples=[[f"data:image/png;base64,{PNG_1PX}"]])
    weights: Optional[dict[str, float]] = Field(None, description="Per-expert weight overrides for this call.",
                                                examples=[{"aesthetic": 0.5}])


class ImageReward(BaseModel):
    total: float = Field(..., description="Weighted sum of the (normalised) expert scores of this image.")
    components: dict[str, float] = Field(..., description="Raw score of each expert for this image.")


class ExpertInfo(BaseModel):
    checkpoint: str = Field(..., description="The checkpoint spec the expert was loaded from.")
    random_weights: bool = Field(..., description="True when the weights are random (tiny / random-full profiles).")


class RewardResponse(BaseModel):
    mean_reward: float = Field(..., description="Mean of the per-image totals.")
    component_rewards: dict[str, float] = Field(..., description="Mean raw score of each expert over the images.")
    images: list[ImageReward]
    experts: dict[str, ExpertInfo]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "mean_reward": 0.42,
                    "component_rewards": {"imagereward": 0.61, "aesthetic": 5.9},
                    "images": [{"total": 0.42, "components": {"imagereward": 0.61, "aesthetic": 5.9}}],
                    "experts": {"imagereward": {"checkpoint": "THUDM/ImageReward", "random_weights": False},
                                "aesthetic": {"checkpoint": "sac+logos+ava1-l14-linearMSE.pth", "random_weights": False}},
                }
            ]
        }
    }


class ErrorResponse(BaseModel):
    detail: str | list = Field(..., description="What was wrong with the request.")

"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, Field

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


MAX_BATCH = 1024  # schema bound of the per-image lists; the service's max_images is the limit that counts
GroupId = Union[Annotated[str, Field(max_length=256)], Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]]


class RewardRequest(BaseModel):
    prompt: Optional[str] = Field(None, description="The prompt all the images were generated from; or send `prompts`.",
                                  examples=["a red apple on a wooden table"])
    prompts: Optional[list[str]] = Field(None, max_length=MAX_BATCH, description="One prompt per image, in the order of "
                                         "`images` (batched (prompt, image) pairs); instead of `prompt`.")
    images: list[str] = Field(..., max_length=MAX_BATCH, description="Images as base64 strings or data URLs (PNG, JPEG, WebP, ...).",
                              examples=[[f"data:image/png;base64,{PNG_1PX}"]])
    weights: Optional[dict[str, float]] = Field(None, description="Per-expert weight overrides for this call.",
                                                examples=[{"aesthetic": 0.5}])
    group_ids: Optional[list[GroupId]] = Field(None, max_length=MAX_BATCH, description="One group id per image (e.g. the "
                                               "prompt's index in a GRPO batch): the answer's `advantages` are the "
                                               "scores z-scored within each group.")
    explain: bool = Field(False, description="Add each image's percentile per expert, from the configured calibration file.")


class ImageReward(BaseModel):
    total: float = Field(..., description="Weighted sum of the (normalised) expert scores of this image.")
    components: dict[str, float] = Field(..., description="Raw score of each expert for this image.")
    percentiles: Optional[dict[str, Optional[float]]] = Field(None, description="With `explain`: per expert, the share (0..100) "
                                                              "of the calibration set scoring below this image; null for an expert it lacks.")


class ExpertInfo(BaseModel):
    checkpoint: str = Field(..., description="The checkpoint spec the expert was loaded from.")
    random_weights: bool = Field(..., description="True when the weights are random (tiny / random-full profiles).")


class RewardResponse(BaseModel):
    mean_reward: float = Field(..., description="Mean of the per-image totals.")
    component_rewards: dict[str, float] = Field(..., description="Mean raw score of each expert over the images.")
    images: list[ImageReward]
    experts: dict[str, ExpertInfo]
    advantages: Optional[dict[str, list[float]]] = Field(None, description="With `group_ids`: `total` and each expert, per "
                                                         "image, z-scored within its group: (x - mean) / (std + 1e-4), "
                                                         "population std; 0 for an image alone in its group.")

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

"""Diversity: how much the images of one request differ from each other, on the shared CLIP image embeddings.

A batch-level expert: an image's score depends on the other images of its request, so the mixture calls
`forward` once per request with that request's embeddings (`batch_level = True`), never across requests
pooled in one micro-batch. The CLIP pass is the one the other CLIP experts share.

Variants (`variant`):
- `per_image` (default): each image's mean cosine distance to the other images of its request,
  s_i = mean_{j != i} (1 - cos(e_i, e_j)), in [0, 2] (0: a duplicate of every other image).
- `ig_rewarding`: ig-rewarding's batch diversity, every image of the request gets the same value:
  D = mean pairwise cosine distance over the request (the mean of the s_i above); below 0.1 it becomes
  log(D + 1e-4), a steep penalty for near-duplicates (identical images: log(1e-4) = -9.21, as there).

One image alone has no other image to differ from: the request is refused with an `InvalidRequestError`
("needs at least 2 images"), before any model runs, rather than scored with a made-up value.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import InvalidRequestError
from ..registry import Expert, ExpertConfig, register_expert

IG_THRESHOLD = 0.1  # ig-rewarding: mean distances below this are replaced by their log
IG_EPS = 1e-4  # ... of (D + 1e-4), so that identical images give a finite penalty


class DiversityConfig(ExpertConfig):
    clip: str = Field("ViT-L-14/openai", description="open_clip MODEL/PRETRAINED (tag, local file or 'random'), or 'tiny'; shared with the other CLIP experts.")
    variant: Literal["per_image", "ig_rewarding"] = Field(
        "per_image",
        description="'per_image': each image's mean cosine distance to the others; 'ig_rewarding': the request's mean "
                    "pairwise distance for every image, log(D + 1e-4) when below 0.1.",
    )


@register_expert
class DiversityExpert(Expert):
    """Cosine distances between the CLIP image embeddings of one request's images."""

    name = "diversity"
    pool = "clip"  # runs beside the other experts on the shared CLIP (one image pass): one Ray Serve pool
    Config = DiversityConfig
    batch_level = True  # the mixture calls forward once per request
    min_images = 2  # requests with fewer images are refused

    def __init__(self, clip_spec: str, preprocess, random_weights: bool, variant: str):
        super().__init__(preprocess, clip_spec, random_weights, clip_spec)
        self.variant = variant

    @classmethod
    def from_config(cls, cfg: DiversityConfig, ctx) -> "DiversityExpert":
        clip = ctx.get_clip(cfg.clip)
        return cls(cfg.clip, clip.preprocess, clip.random_weights, cfg.variant)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        """`image_embeds` (N, D) of the images of ONE request -> (N,) scores."""
        n = image_embeds.shape[0]
        if n < self.min_images:
            raise InvalidRequestError(f"expert 'diversity' needs at least {self.min_images} images per request, got {n}")
        e = F.normalize(image_embeds.float(), dim=-1)
        dist = 1 - e @ e.T
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=e.device)
        per_image = (dist * off_diagonal).sum(1) / (n - 1)
        if self.variant == "per_image":
            return per_image
        d = per_image.mean()
        d = torch.log(d + IG_EPS) if float(d) < IG_THRESHOLD else d
        return d.expand(n)

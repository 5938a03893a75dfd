"""CLIP score: the cosine of the CLIP image and text embeddings (image-reward 1.5's "CLIP" baseline).

It reads the shared CLIP backbone (`clip.py`), so on `ViT-L-14/openai` it costs nothing beyond the
image pass the aesthetic and MLP experts already run: one text pass per distinct prompt and a dot
product. The tokenizer is open_clip's (OpenAI's BPE, truncated at 77 tokens, the last kept as the end
token, as `clip.tokenize(..., truncate=True)` does).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from ..registry import Expert, ExpertConfig, register_expert

log = logging.getLogger(__name__)


class ClipScoreConfig(ExpertConfig):
    clip: str = Field("ViT-L-14/openai", description="open_clip MODEL/PRETRAINED (tag, local file or 'random'), 'hf-hub:org/repo', or 'tiny'.")


@register_expert
class ClipScoreExpert(Expert):
    """cos(image, text) in [-1, 1]; about 0.2..0.35 for OpenAI ViT-L/14 on matching images."""

    name = "clip_score"
    pool = "clip"  # runs beside the other experts on the shared CLIP (one image pass): one Ray Serve pool
    Config = ClipScoreConfig
    needs_text_embeds = True
    # CLIPScore (Hessel et al. 2021) rescales this cosine by w = 2.5 "to stretch the range" of typical
    # cosines (about 0..0.4); std 0.4 = 1/w is that published scale, mean 0 its published zero point
    default_mean = 0.0
    default_std = 0.4

    @classmethod
    def from_config(cls, cfg: ClipScoreConfig, ctx) -> "ClipScoreExpert":
        clip = ctx.get_clip(cfg.clip)  # shared: one image pass per image for every expert on this spec
        if clip.random_weights:
            log.warning("clip_score expert has RANDOM weights (CLIP %s)", cfg.clip)
        return cls(clip.preprocess, cfg.clip, clip.random_weights, cfg.clip)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        # both embeddings arrive L2-normalised in float32 (ClipBackbone), so this is the cosine in float32
        return (image_embeds.float() * text_embeds.float()).sum(-1)

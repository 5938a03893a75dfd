"""unified_reward: UnifiedReward's pointwise judgement of a generated image, through the MLLM peer.

The peer (any OpenAI-compatible server serving a UnifiedReward checkpoint, e.g. `vllm serve
CodeGoat24/UnifiedReward-2.0-qwen-7b`, or the model in-process) is asked UnifiedReward's published prompt of
the configured `version` (rewarders/judges.py) and its answer parsed: "Final Score: x" (1.0) or the
"Alignment / Coherence / Style Score (1-5): x" lines (1.0-acs, 2.0), each scaled from 1..5 to [0, 1]. The score
is the `dimension` asked for (`overall`: the final score, or the mean of the three); the three dimensions are
also reported per image as extras ("unified_reward.alignment", ...). An answer that holds no score is an error
for that pair (its component is null and the answer's `errors` say why), never a made-up score; a peer that is
down or too slow fails the call (HTTP 502/504), or, with `required: false`, each pair it could not score.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..images import Preprocess
from ..judges import DIMENSIONS, UNIFIED_REWARD_TEMPLATES, UnifiedRewardVersion, ask_all, failed, fill, parse_unified_reward, pil_images
from ..mllm import MLLMConfig, create_peer
from ..registry import Expert, ExpertConfig, ExpertOutput, register_expert


class UnifiedRewardConfig(ExpertConfig, MLLMConfig):
    """The peer's settings (`MLLMConfig`; `yes_no` is unused: this judge reads text answers), the template
    version and the dimension scored, and an expert's weight and normalisation."""

    version: UnifiedRewardVersion = Field("2.0", description="UnifiedReward's prompt: '1.0' (UnifiedReward-qwen: 'Final Score' 1-5), "
                                          "'1.0-acs' (UnifiedReward-qwen: word-wise, then alignment/coherence/style 1-5), "
                                          "'2.0' (UnifiedReward-2.0: alignment/coherence/style 1-5). Ask the checkpoint the "
                                          "prompt it was trained on.")
    dimension: Literal["overall", "alignment", "coherence", "style"] = Field(
        "overall", description="The score: 'overall' (1.0: the final score; 1.0-acs and 2.0: the mean of the three "
                               "dimensions) or one dimension (not with 1.0). Scaled from 1..5 to [0, 1].")
    max_tokens: int = Field(512, ge=1, le=8192, description="Longest answer the peer may give (tokens).")

    @model_validator(mode="after")
    def _dimension_of_version(self):
        if self.version == "1.0" and self.dimension != "overall":
            raise ValueError("UnifiedReward 1.0 answers one final score: dimension must be 'overall'")
        return self


@register_expert
class UnifiedRewardExpert(Expert):
    name = "unified_reward"
    Config = UnifiedRewardConfig
    default_mean = 0.5  # a score in [0, 1]: its middle
    default_std = 0.25
    extras = DIMENSIONS  # with 1.0-acs and 2.0: each dimension in [0, 1]
    per_pair = True  # one question per pair: never padded in the batch-invariant mode

    def __init__(self, peer, cfg: UnifiedRewardConfig):
        # the pixels stay in [0, 1] at the size sent to the peer (square, as every expert's input)
        super().__init__(Preprocess(cfg.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), cfg.url or cfg.model, cfg.model == "tiny")
        self.peer, self.cfg = peer, cfg
        self.template = UNIFIED_REWARD_TEMPLATES[cfg.version]
        self.per_pair_errors = not cfg.required  # an optional judge fails pair by pair when the peer does

    @classmethod
    def from_config(cls, cfg: UnifiedRewardConfig, ctx) -> "UnifiedRewardExpert":
        peer_cfg = MLLMConfig(**cfg.model_dump(include=set(MLLMConfig.model_fields)))
        return cls(create_peer(peer_cfg, ctx.cache_dir, str(ctx.device)), cfg)

    def judge(self, item) -> dict[str, float]:
        image, prompt = item
        return parse_unified_reward(self.peer.answer([image], fill(self.template, prompt), self.cfg.max_tokens), self.cfg.version)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> ExpertOutput:
        answers = ask_all(self.judge, list(zip(pil_images(pixels), prompts)), self.cfg.max_concurrency, self.per_pair_errors)
        nan = float("nan")
        errors = {i: str(a) for i, a in enumerate(answers) if failed(a)}
        parsed = [None if failed(a) else a for a in answers]

        def score(d: dict | None) -> float:
            if d is None:
                return nan
            if self.cfg.dimension != "overall":
                return d[self.cfg.dimension]
            return d["final"] if "final" in d else sum(d[k] for k in DIMENSIONS) / len(DIMENSIONS)

        scores = torch.tensor([score(d) for d in parsed], dtype=torch.float32)
        extras = {}
        if self.cfg.version != "1.0":
            extras = {k: torch.tensor([nan if d is None else d[k] for d in parsed], dtype=torch.float32) for k in DIMENSIONS}
        return ExpertOutput(scores, extras=extras, errors=errors)

    def describe(self) -> dict:
        return {**super().describe(), "peer": self.peer.describe(), "version": self.cfg.version, "dimension": self.cfg.dimension}

"""pairwise_judge: each image's win rate in its group, the judge comparing pairs of images (Pref-GRPO).

A batch-level expert that scores groups: for each group of a request (its `group_ids`; without them the
request is one group) the MLLM peer is shown two images of the group's prompt and asked which is better, with
the `template`'s published prompt ("Image 1 is better" / "Image 2 is better"; rewarders/judges.py). An image's
reward is its share of the comparisons it took part in (a win 1, a tie 0.5, a loss 0), as Pref-GRPO's
`_pairwise_win_rate`. Every pair is compared when the group is small enough (`max_comparisons`), else a bounded
schedule of `max_comparisons` comparisons drawn with `seed` (every image in at least one); with `both_orders`
each pair is asked twice, each image shown first once, so a judge's preference for a position cancels.

A comparison whose answer names no better image is left out of the win rates (`unparsed: error`; an image
left without any comparison is an error for that pair) or counted as a tie (`unparsed: tie`, as Pref-GRPO). The
peer calls are reported: per image ("pairwise_judge.calls": the comparisons it was in; "pairwise_judge.failed":
those without an outcome) and per request (the answer's `summaries`: calls and failed). A peer that is down or
too slow fails the call, or with `required: false` is left out like an unparsed comparison.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..errors import InvalidRequestError
from ..images import Preprocess
from ..judges import PAIRWISE_TEMPLATES, PairwiseTemplate, ask_all, failed, fill, min_comparisons, parse_preference, pil_images, schedule, win_rates
from ..mllm import MLLMConfig, create_peer
from ..registry import Expert, ExpertConfig, ExpertOutput, register_expert


class PairwiseJudgeConfig(ExpertConfig, MLLMConfig):
    """The peer's settings (`MLLMConfig`; `yes_no` is unused), the comparison prompt and schedule, and an
    expert's weight and normalisation."""

    template: PairwiseTemplate = Field("unifiedreward-think", description="The comparison prompt: 'unifiedreward-think' "
                                       "(Pref-GRPO's UnifiedReward-Think prompt, verdict in <answer></answer>) or 'unifiedreward' "
                                       "(UnifiedReward-qwen's pair ranking).")
    max_comparisons: int = Field(56, ge=2, le=100_000, description="Most peer calls per group: every pair (both orders: "
                                 "n(n-1) calls; 56 covers groups of 8) when they fit, else a seeded schedule of this many.")
    both_orders: bool = Field(True, description="Ask each pair twice, each image shown first once (cancels position bias); "
                              "false: once, as Pref-GRPO.")
    seed: int = Field(0, ge=0, description="Seed of the bounded schedule (the same seed, the same comparisons).")
    unparsed: Literal["error", "tie"] = Field("error", description="A comparison whose answer names no better image: "
                                              "'error' leaves it out (an image with no comparison left is an error for "
                                              "that pair); 'tie' counts it 0.5 each, as Pref-GRPO.")
    max_tokens: int = Field(1024, ge=1, le=8192, description="Longest answer the peer may give (tokens); the think prompt "
                            "reasons before its verdict.")


@register_expert
class PairwiseJudge(Expert):
    name = "pairwise_judge"
    Config = PairwiseJudgeConfig
    default_mean = 0.5  # a win rate: a group's mean is 0.5 when every comparison has an outcome
    default_std = 0.25
    batch_level = True  # the mixture calls forward once per request ...
    uses_group_ids = True  # ... with its group ids
    min_images = 2
    extras = ("calls", "failed")

    def __init__(self, peer, cfg: PairwiseJudgeConfig):
        super().__init__(Preprocess(cfg.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), cfg.url or cfg.model, cfg.model == "tiny")
        self.peer, self.cfg = peer, cfg
        self.template = PAIRWISE_TEMPLATES[cfg.template]
        self.per_pair_errors = not cfg.required

    @classmethod
    def from_config(cls, cfg: PairwiseJudgeConfig, ctx) -> "PairwiseJudge":
        peer_cfg = MLLMConfig(**cfg.model_dump(include=set(MLLMConfig.model_fields)))
        return cls(create_peer(peer_cfg, ctx.cache_dir, str(ctx.device)), cfg)

    def check_group(self, prompts) -> None:
        n, distinct = len(prompts), set(prompts)
        if n < 2:
            raise InvalidRequestError("expert 'pairwise_judge' compares images within a group: a group has 1 image")
        if len(distinct) > 1:
            raise InvalidRequestError(f"expert 'pairwise_judge' compares images of one prompt: a group has {len(distinct)} prompts")
        need = min_comparisons(n, self.cfg.both_orders)
        if need > self.cfg.max_comparisons:
            raise InvalidRequestError(f"expert 'pairwise_judge': a group of {n} images needs at least {need} comparisons; "
                                      f"max_comparisons is {self.cfg.max_comparisons}")

    def compare(self, item) -> float:
        first, second, prompt = item
        return parse_preference(self.peer.answer([first, second], fill(self.template, prompt), self.cfg.max_tokens), self.cfg.template)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None, group_ids=None) -> ExpertOutput:
        """`pixels` (N, 3, S, S) of ONE request; `group_ids` its images' groups (None: one group)."""
        n = len(prompts)
        images = pil_images(pixels)
        groups: dict = {}
        for i, g in enumerate(group_ids if group_ids is not None else [None] * n):
            groups.setdefault(g, []).append(i)
        calls: list[tuple[int, int]] = []  # (first, second) as request indices
        for members in groups.values():
            plan = schedule(len(members), self.cfg.max_comparisons, self.cfg.seed, self.cfg.both_orders)
            calls += [(members[a], members[b]) for a, b in plan]
        answers = ask_all(self.compare, [(images[a], images[b], prompts[a]) for a, b in calls], self.cfg.max_concurrency,
                          self.per_pair_errors)
        tie = self.cfg.unparsed == "tie"
        outcomes = [(0.5 if tie and not _peer_error(a) else None) if failed(a) else a for a in answers]
        rates, _ = win_rates(n, calls, outcomes)
        in_calls, in_failed, why = [0] * n, [0] * n, {}
        for (a, b), answer, outcome in zip(calls, answers, outcomes):
            for i in (a, b):
                in_calls[i] += 1
                if outcome is None:
                    in_failed[i] += 1
                    why.setdefault(i, str(answer))
        errors = {i: f"no comparison of this image has an outcome ({in_failed[i]} failed), e.g.: {why[i]}"
                  for i in range(n) if rates[i] is None}
        scores = torch.tensor([float("nan") if r is None else r for r in rates], dtype=torch.float32)
        return ExpertOutput(scores, extras={"calls": torch.tensor(in_calls, dtype=torch.float32),
                                            "failed": torch.tensor(in_failed, dtype=torch.float32)}, errors=errors)

    def summarize(self, scores, extras, metadata):
        """The request's peer calls (each comparison is one call and counts for two images) and failed comparisons."""
        if "calls" not in extras:
            return None
        return {"calls": int(extras["calls"].nansum()) // 2, "failed": int(extras["failed"].nansum()) // 2}

    def describe(self) -> dict:
        return {**super().describe(), "peer": self.peer.describe(), "template": self.cfg.template,
                "max_comparisons": self.cfg.max_comparisons, "both_orders": self.cfg.both_orders}


def _peer_error(answer) -> bool:
    """A call the peer itself failed (down, slow): never counted as a tie, whatever `unparsed` says."""
    from ..mllm import MLLMError

    return isinstance(answer, MLLMError)

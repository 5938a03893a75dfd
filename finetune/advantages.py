"""The advantages of the policy-gradient methods (GRPO, DDPO): how much better each sampled image did than
its prompt's others. Each image's reward is z-scored within its prompt's group
(`t2i_reward.rewarders.advantages`): the weighted total (`advantage_normalization: total`), or each expert
z-scored then weighted (`per_expert`); with `per_prompt_stats` (DDPO) against the prompt's rewards of
earlier steps too (`PromptStats`, saved with the checkpoints); clipped to +-`adv_clip_max`.

An image without a reward (its total NaN: a required expert failed on it, the service's null) is left out of
its group's (or its prompt's) statistics and gets advantage 0: it adds no policy-gradient term, and the
other images of its group are normalised over those that were scored.
"""

from __future__ import annotations

from typing import Mapping, Optional

import math

import torch
from t2i_reward.rewarders.advantages import EPS, group_advantages

from .spec import JobSpec


class PromptStats:
    """DDPO's per-prompt statistics: each prompt's rewards of the last `buffer_size` samples (this step's
    included); a prompt seen fewer than `min_count` times is normalised with the whole batch instead.
    Saved with the checkpoints (`to_dict` / `from_dict`), so a resumed job normalises the same way."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, list[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages of this step's rewards: (r - mean_p) / (std_p + EPS) per prompt p. A NaN reward (no
        reward) enters no buffer and no statistics, and its advantage is NaN."""
        rewards = rewards.detach().double().cpu()
        scored = rewards[~torch.isnan(rewards)]
        out = torch.full_like(rewards, float("nan"))
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            new = [r for r in rewards[idx].tolist() if not math.isnan(r)]
            buf = (self.buffers.setdefault(p, []) + new)[-self.buffer_size:]
            self.buffers[p] = buf
            ref = torch.tensor(buf, dtype=torch.float64) if len(buf) >= self.min_count else scored
            if len(ref):
                out[idx] = (rewards[idx] - ref.mean()) / (ref.std(unbiased=False) + EPS)
        return out.float()

    def to_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": self.buffers}

    @classmethod
    def for_spec(cls, spec: JobSpec, saved: Optional[dict]) -> Optional["PromptStats"]:
        """The statistics of a job that uses them (GRPO with `per_prompt_stats`), as its checkpoint left them
        (`saved`), else None."""
        if not (spec.is_policy_gradient and spec.per_prompt_stats):
            return None
        return cls.from_dict(saved or {"buffer_size": spec.stat_buffer_size, "min_count": spec.stat_min_count})

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "PromptStats":
        stats = cls(d.get("buffer_size", 32), d.get("min_count", 16)) if d else cls()
        stats.buffers = {k: list(v) for k, v in (d or {}).get("buffers", {}).items()}
        return stats


def advantages(spec: JobSpec, prompts: list[str], total: torch.Tensor, components: Mapping[str, torch.Tensor],
               weights: Mapping[str, float], stats: Optional[PromptStats]) -> torch.Tensor:
    """Each image's advantage (see the module doc), clipped to +-adv_clip_max; 0 for an image without a reward."""
    total = total.detach().cpu()
    if stats is not None:  # DDPO: against the prompt's history (the weighted total only)
        adv = stats.update(prompts, total)
    else:
        groups = list(prompts)  # the images of one prompt are one group
        z = group_advantages(total, {n: c.detach().cpu() for n, c in components.items()}, groups)
        adv = per_expert(z, weights, list(components)) if spec.advantage_normalization == "per_expert" else z["total"]
    adv = torch.where(torch.isnan(total), torch.zeros_like(adv), adv)  # no reward: no policy-gradient term
    return torch.nan_to_num(adv, nan=0.0).clamp(-spec.adv_clip_max, spec.adv_clip_max)


def per_expert(z: Mapping[str, torch.Tensor], weights: Mapping[str, float], experts: list[str]) -> torch.Tensor:
    """sum_e w_e * z_e over the experts that scored each image, renormalised to the whole weight as the
    mixture's total is (`Mixture.combine`) when an optional expert failed on it; NaN when none scored it."""
    w = {n: float(weights.get(n, 0.0)) for n in experts}
    if not any(bool(torch.isnan(z[n]).any()) for n in experts):
        return sum(w[n] * z[n] for n in experts)
    adv = sum(w[n] * torch.nan_to_num(z[n], nan=0.0) for n in experts)
    answered = sum(abs(w[n]) * (~torch.isnan(z[n])).float() for n in experts)
    whole = sum(abs(v) for v in w.values())
    return torch.where(answered > 0, adv * (whole / answered.clamp_min(1e-30)), torch.full_like(adv, float("nan")))

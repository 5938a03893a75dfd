"""The advantages of the policy-gradient methods (GRPO, DDPO): how much better each sampled image did than
its prompt's others. Each image's reward is z-scored within its prompt's group
(`t2i_reward.rewarders.advantages`): the weighted total (`advantage_normalization: total`), or each expert
z-scored then weighted (`per_expert`); with `per_prompt_stats` (DDPO) against the prompt's rewards of
earlier steps too (`PromptStats`, saved with the checkpoints); clipped to +-`adv_clip_max`.
"""

from __future__ import annotations

from typing import Mapping, Optional

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
        """Advantages of this step's rewards: (r - mean_p) / (std_p + EPS) per prompt p."""
        rewards = rewards.detach().double().cpu()
        out = torch.empty_like(rewards)
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buf = (self.buffers.setdefault(p, []) + rewards[idx].tolist())[-self.buffer_size:]
            self.buffers[p] = buf
            ref = torch.tensor(buf, dtype=torch.float64) if len(buf) >= self.min_count else rewards
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
    """Each image's advantage (see the module doc), clipped to +-adv_clip_max."""
    if stats is not None:  # DDPO: against the prompt's history (the weighted total only)
        adv = stats.update(prompts, total)
    else:
        groups = list(prompts)  # the images of one prompt are one group
        z = group_advantages(total.detach().cpu(), {n: c.detach().cpu() for n, c in components.items()}, groups)
        if spec.advantage_normalization == "per_expert":
            adv = sum(float(weights.get(n, 0.0)) * z[n] for n in components)
        else:
            adv = z["total"]
    return adv.clamp(-spec.adv_clip_max, spec.adv_clip_max)

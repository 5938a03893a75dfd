"""GRPO (and DDPO, its group-of-one preset) for diffusion models: policy gradients on the model's own samples.

One step of a job:
1. **sample** `group_size` images for each of the step's prompts with a stochastic sampler (eta > 0:
   DDIM for SD-1.x/2.x and SDXL, the flow-matching SDE for SD3; `Sampler.transition`), keeping every
   transition x_t -> x_prev and its log-probability under the current policy (`sample_with_logprobs`);
2. **score** the images (scalar rewards only: in-process, or the service's raw-tensor `/reward`);
3. **advantages**: each image's reward z-scored within its prompt's group (`t2i_reward.rewarders.advantages`):
   the weighted total (`advantage_normalization: total`), or each expert z-scored then weighted
   (`per_expert`); with `per_prompt_stats` (DDPO) against the prompt's rewards of earlier steps too
   (`PromptStats`); clipped to +-`adv_clip_max`;
4. **update**, `num_inner_epochs` times: for a random subset of the chain's transitions
   (`timestep_fraction`), recompute each transition's log-probability under the LoRA policy, and minimise
   PPO's clipped surrogate, -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = p_new / p_old, plus
   `kl_weight` times the KL between the policy's and the frozen base's Gaussian transitions (the same
   denoiser with its adapters disabled). Gradients are accumulated over the transitions and over
   `gradient_accumulation_steps` micro-batches of images, then one optimiser step per inner epoch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from t2i_reward.rewarders.advantages import EPS, group_advantages

from .pipeline import adapters_disabled
from .sampler import MIN_STD, Sampler, transition_kl
from .spec import JobSpec


@dataclass
class Trajectory:
    """The sampled chain of a batch: latents[k] -> latents[k + 1] at schedule step k; `log_probs` (B, T)."""

    latents: torch.Tensor  # (B, T + 1, C, h, w)
    log_probs: torch.Tensor  # (B, T)
    stochastic: list[int]  # the steps k whose transition has noise (std > 0): the only ones with a log-probability
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]


# MIN_STD (sampler.py): a step with less noise has no density; its "log-probability" would divide by zero,
# so such steps are sampled but never trained on


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2), averaged over every dimension but the batch (as DDPO does: a per-element
    scale keeps the PPO ratio away from overflow at any resolution)."""
    var = std.clamp_min(1e-12) ** 2
    lp = -((x.detach() - mean) ** 2) / (2 * var) - torch.log(var.sqrt()) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


@torch.no_grad()
def sample_with_logprobs(s: Sampler, prompts: list[str], seeds: list[int], eta: float, cond, uncond) -> Trajectory:
    """The stochastic chain (each step's noise seeded from the image's seed, so a resumed job draws the same
    samples), keeping every latent and each transition's log-probability under the current policy."""
    latents = s.initial_latents(seeds)
    gens = [torch.Generator().manual_seed(seed + 1) for seed in seeds]
    chain, log_probs, stochastic = [latents], [], []
    for k in range(s.num_steps):
        mean, std = s.transition(s.predict(latents, k, cond, uncond), latents, k, eta)
        if float(std) > MIN_STD:
            stochastic.append(k)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(s.device)
        latents = mean + std * noise
        log_probs.append(gaussian_log_prob(latents, mean, std))
        chain.append(latents)
    images = s.decode(latents)
    return Trajectory(torch.stack(chain, dim=1), torch.stack(log_probs, dim=1), stochastic, images)


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


@dataclass
class GRPOStep:
    loss: torch.Tensor  # detached: the mean surrogate + KL over the updates
    reward: torch.Tensor  # (B,)
    kl: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    advantages: Optional[torch.Tensor] = None
    clip_fraction: float = 0.0


def policy_loss(ratio: torch.Tensor, adv: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate (to minimise)."""
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def grpo_step(s: Sampler, spec: JobSpec, reward, prompts: list[str], seeds: list[int], cond, uncond,
              rng: random.Random, optimizer, params, stats: Optional[PromptStats], weights: Mapping[str, float],
              after_backward=None) -> GRPOStep:
    """Sample, score, compute advantages and update the LoRA (the optimiser steps here: PPO takes several
    steps per batch of samples). `prompts`/`seeds`/`cond`/`uncond` hold one entry per image (each prompt
    repeated `group_size` times). `after_backward()` (gradient averaging across processes) runs before each
    optimiser step."""
    traj = sample_with_logprobs(s, prompts, seeds, spec.eta, cond, uncond)
    with torch.no_grad():
        total, components = reward.scores(traj.images, prompts)
    adv = advantages(spec, prompts, total, components, weights, stats).to(s.device)
    n_train = max(1, int(round(spec.timestep_fraction * len(traj.stochastic))))
    micro = _micro_batches(len(prompts), spec.gradient_accumulation_steps)
    losses, kls, clipped, counted = [], [], 0, 0
    for _ in range(spec.num_inner_epochs):
        chosen = sorted(rng.sample(traj.stochastic, n_train))
        optimizer.zero_grad(set_to_none=True)
        for idx in micro:
            for k in chosen:
                x_t, x_prev = traj.latents[idx, k], traj.latents[idx, k + 1]
                mean, std = s.transition(s.predict(x_t, k, cond[idx], uncond[idx]), x_t, k, spec.eta)
                ratio = torch.exp(gaussian_log_prob(x_prev, mean, std) - traj.log_probs[idx, k])
                loss = policy_loss(ratio, adv[idx], spec.clip_range)
                kl = torch.zeros((), device=s.device)
                if spec.kl_weight > 0:
                    with torch.no_grad(), adapters_disabled(s.m.denoiser, True):
                        base_mean, _ = s.transition(s.predict(x_t, k, cond[idx], uncond[idx]), x_t, k, spec.eta)
                    kl = transition_kl(mean, base_mean, std)
                    loss = loss + spec.kl_weight * kl
                (loss * len(idx) / len(prompts) / len(chosen)).backward()
                losses.append(float(loss.detach()))
                kls.append(float(kl.detach()))
                clipped += int(((ratio - 1).abs() > spec.clip_range).sum())
                counted += ratio.numel()
        if after_backward is not None:
            after_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return GRPOStep(torch.tensor(sum(losses) / len(losses)), total.detach(), torch.tensor(sum(kls) / len(kls)),
                    components, adv.detach().cpu(), clipped / max(counted, 1))


def _micro_batches(n: int, parts: int) -> list[list[int]]:
    parts = max(1, min(parts, n))
    size = math.ceil(n / parts)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

"""GRPO (and DDPO, its group-of-one preset) for diffusion models: policy gradients on the model's own samples.

One step of a job:
1. **sample** `group_size` images for each of the step's prompts with a stochastic sampler (eta > 0:
   DDIM for SD-1.x/2.x and SDXL, the flow-matching SDE for SD3; `Sampler.transition`), keeping every
   transition x_t -> x_prev and its log-probability under the current policy (`sample_with_logprobs`);
2. **score** the images (scalar rewards only: in-process, or the service's raw-tensor `/reward`), each with
   its prompt's metadata;
3. **advantages** (`advantages.py`): each image's reward z-scored within its prompt's group, or with
   `per_prompt_stats` (DDPO) against the prompt's rewards of earlier steps too; clipped to +-`adv_clip_max`;
   an image without a reward (a required expert failed on it: NaN total) gets advantage 0 and is left out
   of the statistics;
4. **update**, `num_inner_epochs` times: for a random subset of the chain's transitions
   (`timestep_fraction`), recompute each transition's log-probability under the LoRA policy, and minimise
   PPO's clipped surrogate, -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = p_new / p_old, plus
   `kl_weight` times the KL between the policy's and the frozen base's Gaussian transitions (the same
   denoiser with its adapters disabled). Gradients are accumulated over the transitions and over
   `gradient_accumulation_steps` micro-batches of images, then one optimiser step per inner epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .advantages import advantages
from .context import Batch, TrainState, require_rewards
from .pipeline import adapters_disabled
from .sampler import MIN_STD, Sampler, transition_kl


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


def grpo_step(state: TrainState, batch: Batch) -> GRPOStep:
    """Sample, score, compute advantages and update the LoRA (the optimiser steps here: PPO takes several
    steps per batch of samples). The batch holds one entry per image (each prompt repeated `group_size`
    times)."""
    s, spec, prompts, cond, uncond = state.sampler, state.spec, batch.prompts, batch.cond, batch.uncond
    traj = sample_with_logprobs(s, prompts, batch.seeds, spec.eta, cond, uncond)
    with torch.no_grad():
        total, components = state.reward.scores(traj.images, prompts, batch.metadata)
    require_rewards(total, batch.step)
    # an image without a reward (NaN total) has advantage 0: no policy-gradient term, and no part in its group's statistics
    adv = advantages(spec, prompts, total, components, state.weights, state.stats).to(s.device)
    n_train = max(1, int(round(spec.timestep_fraction * len(traj.stochastic))))
    micro = _micro_batches(len(prompts), spec.gradient_accumulation_steps)
    losses, kls, clipped, counted = [], [], 0, 0
    for _ in range(spec.num_inner_epochs):
        chosen = sorted(batch.rng.sample(traj.stochastic, n_train))
        state.models.optimizer.zero_grad(set_to_none=True)
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
        state.apply_gradients()
    return GRPOStep(torch.tensor(sum(losses) / len(losses)), total.detach(), torch.tensor(sum(kls) / len(kls)),
                    components, adv.detach().cpu(), clipped / max(counted, 1))


def _micro_batches(n: int, parts: int) -> list[list[int]]:
    parts = max(1, min(parts, n))
    size = math.ceil(n / parts)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

"""GRPO (and DDPO, its group-of-one preset) for diffusion models: policy gradients on the model's own samples.

One step of a job, on the training chain (`train_inference_steps`, shorter than the evaluation chain if asked:
Flow-GRPO trains with 10 steps and evaluates with 40):
1. **sample** `group_size` images for each of the step's prompts, in `sampling_micro_batches` micro-batches.
   Only the step's **SDE window** of transitions is stochastic (eta > 0: DDIM for SD-1.x/2.x and SDXL, the
   flow-matching SDE for SD3; `Sampler.transition`); the steps before and after it are the deterministic chain
   (eta = 0). Each window transition x_t -> x_prev keeps its log-probability under the current policy
   (`sample_with_logprobs`). The window is the whole chain by default; `sde_window_schedule` fixes it, slides
   it (MixGRPO) or draws it each step (Flow-GRPO-Fast), `sde_window_at`. With `group_initial_noise` a group's
   images share their starting noise, and the steps before the window run once per group;
2. **score** the images (scalar rewards only: in-process, or the service's raw-tensor `/reward`), each with
   its prompt's metadata: after sampling, or with `stream_rewards` each micro-batch as soon as it is sampled,
   on a scoring thread, while the next one is sampled;
3. **advantages** (`advantages.py`), once the whole batch is scored: each image's reward z-scored within its
   prompt's group, or with `per_prompt_stats` (DDPO) against the prompt's rewards of earlier steps too;
   clipped to +-`adv_clip_max`; an image without a reward (a required expert failed on it: NaN total) gets
   advantage 0 and is left out of the statistics;
4. **update**, `num_inner_epochs` times: for a random subset (`timestep_fraction`) of the window's
   stochastic transitions, recompute each transition's log-probability under the LoRA policy, and minimise
   PPO's clipped surrogate, -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = p_new / p_old, plus
   `kl_weight` times the KL between the policy's and the frozen base's Gaussian transitions (the same
   denoiser with its adapters disabled), over the window only. Gradients are accumulated over the
   transitions and over `gradient_accumulation_steps` micro-batches of images, then one optimiser step per
   inner epoch.
The step's denoiser forward passes are counted by the sampler (`metrics.forward_passes`).
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from .advantages import advantages
from .context import Batch, TrainState, require_rewards
from .pipeline import adapters_disabled
from .sampler import MIN_STD, Sampler, transition_kl
from .spec import JobSpec


@dataclass
class Trajectory:
    """The sampled chain of a batch: latents[k] -> latents[k + 1] at schedule step k; `log_probs` (B, T), of
    the stochastic steps only (0 elsewhere)."""

    latents: torch.Tensor  # (B, T + 1, C, h, w)
    log_probs: torch.Tensor  # (B, T)
    stochastic: list[int]  # the steps k whose transition has noise (in the window, std > 0): the only ones trained on
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]

    @staticmethod
    def cat(parts: list["Trajectory"]) -> "Trajectory":
        """The micro-batches of one step (they share the window) as one batch."""
        return Trajectory(torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]),
                          parts[0].stochastic, torch.cat([p.images for p in parts]))


# MIN_STD (sampler.py): a step with less noise has no density; its "log-probability" would divide by zero,
# so such steps are sampled but never trained on


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2), averaged over every dimension but the batch (as DDPO does: a per-element
    scale keeps the PPO ratio away from overflow at any resolution)."""
    var = std.clamp_min(1e-12) ** 2
    lp = -((x.detach() - mean) ** 2) / (2 * var) - torch.log(var.sqrt()) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def sde_window_at(spec: JobSpec, step: int, rng: random.Random) -> tuple[int, int]:
    """The SDE window [first, last) of the training chain at optimiser step `step`: `sde_window` itself
    ('fixed'); moved `sde_window_stride` transitions every `sde_window_shift_every` steps and back to the start
    of `sde_window_range` when it would leave it ('sliding'); or drawn uniformly within the range from the
    step's `rng` ('random')."""
    first, last = spec.window
    if spec.sde_window_schedule == "fixed":
        return first, last
    lo, hi = spec.window_range
    size = last - first
    positions = hi - lo - size + 1  # where a window of this size can start within the range
    if spec.sde_window_schedule == "sliding":
        start = lo + (first - lo + step // spec.sde_window_shift_every * spec.sde_window_stride) % positions
    else:
        start = lo + rng.randrange(positions)
    return start, start + size


@torch.no_grad()
def shared_prefix(s: Sampler, seeds: list[int], cond, uncond, first: int, groups: list,
                  chunk: Optional[int] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The deterministic steps before the window (`first` of them), run once per group from the starting noise of
    the group's first image, `chunk` groups at a time (default: all): the chain's latents 0..first with one row
    per group, and each image's row (`[x[rows] for x in chain]` gives the images' own)."""
    distinct = list(dict.fromkeys(groups))
    firsts = [groups.index(g) for g in distinct]  # each group's first image
    chunk = chunk or len(firsts)
    parts = []
    for a in range(0, len(firsts), chunk):
        r = firsts[a:a + chunk]
        latents = s.initial_latents([seeds[i] for i in r])
        prefix = [latents]
        for k in range(first):
            latents, _ = s.transition(s.predict(latents, k, cond[r], uncond[r]), latents, k, 0.0)
            prefix.append(latents)
        parts.append(prefix)
    chain = [torch.cat([p[k] for p in parts]) for k in range(first + 1)]
    return chain, torch.tensor([distinct.index(g) for g in groups], device=s.device)


@torch.no_grad()
def sample_with_logprobs(s: Sampler, seeds: list[int], eta: float, cond, uncond, window: Optional[tuple[int, int]] = None,
                         groups: Optional[list] = None, prefix: Optional[list[torch.Tensor]] = None) -> Trajectory:
    """The chain with the SDE `window` (default: the whole chain) stochastic and the other steps
    deterministic, keeping every latent and each window transition's log-probability under the current
    policy. Each image starts from its seed's noise and draws the k-th step's noise from its seed's generator
    whatever the window (a resumed job draws the same samples). Images of one `groups` entry (one prompt's)
    share the starting noise of the group's first image, and the steps before the window run once per group
    (`shared_prefix`; or `prefix`, its rows for these images, run beforehand)."""
    first, last = window if window is not None else (0, s.num_steps)
    if prefix is None:
        per_group, rows = shared_prefix(s, seeds, cond, uncond, first, list(range(len(seeds))) if groups is None else list(groups))
        prefix = [x[rows] for x in per_group]
    chain = list(prefix)
    latents = chain[-1]
    gens = [torch.Generator().manual_seed(seed + 1) for seed in seeds]
    log_probs, stochastic = [torch.zeros(len(seeds), device=s.device)] * s.num_steps, []
    for k in range(s.num_steps):
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(s.device)
        if k < first:
            continue  # its noise is drawn all the same: the k-th step's noise does not depend on the window
        mean, std = s.transition(s.predict(latents, k, cond, uncond), latents, k, eta if k < last else 0.0)
        latents = mean + std * noise
        if float(std) > MIN_STD:
            stochastic.append(k)
            log_probs[k] = gaussian_log_prob(latents, mean, std)
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
    window: tuple[int, int] = (0, 0)  # the step's SDE window


def policy_loss(ratio: torch.Tensor, adv: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's clipped surrogate (to minimise)."""
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def grpo_step(state: TrainState, batch: Batch) -> GRPOStep:
    """Sample, score, compute advantages and update the LoRA (the optimiser steps here: PPO takes several
    steps per batch of samples). The batch holds one entry per image (each prompt repeated `group_size`
    times, a group's images next to each other)."""
    s, spec, prompts, cond, uncond = state.train_sampler, state.spec, batch.prompts, batch.cond, batch.uncond
    window = sde_window_at(spec, batch.step, batch.rng)
    # the images of a prompt are next to each other: image i is in group i // group_size
    groups = [i // spec.group_size for i in range(len(prompts))] if spec.group_initial_noise else None
    traj, total, components = sample_and_score(state, batch, window, groups)
    if not traj.stochastic:
        raise ValueError(f"step {batch.step + 1}: the SDE window {window} of the {s.num_steps}-step training chain has no "
                         "step with noise to train on; widen sde_window")
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
                    components, adv.detach().cpu(), clipped / max(counted, 1), window)


def sample_and_score(state: TrainState, batch: Batch, window: tuple[int, int],
                     groups: Optional[list[int]]) -> tuple[Trajectory, torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's trajectories, sampled in `sampling_micro_batches` parts, and their rewards (total, {expert:
    scores}): each part scored as soon as it is sampled, on a scoring thread while the next part is sampled
    (`stream_rewards`), or the whole batch once sampling is done. Either way the rewards are each image's own,
    so the advantages computed from them are the same."""
    s, spec, prompts = state.train_sampler, state.spec, batch.prompts
    parts = _micro_batches(len(prompts), spec.sampling_micro_batches)

    def score(idx: list[int], images: torch.Tensor):
        metadata = None if batch.metadata is None else [batch.metadata[i] for i in idx]
        with torch.no_grad():
            return state.reward.scores(images, [prompts[i] for i in idx], metadata)

    per_group = rows = None
    if groups is not None and len(parts) > 1:
        # why beforehand: a group split across micro-batches would run its steps before the window once per part,
        # each part from its own first image's noise
        per_group, rows = shared_prefix(s, batch.seeds, batch.cond, batch.uncond, window[0], groups, chunk=len(parts[0]))
    trajectories, pending = [], []
    # why one thread: the parts are scored in order, one at a time, as the reward would score them without streaming
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="t2i-grpo-rewards") if spec.stream_rewards else nullcontext() as pool:
        for idx in parts:
            t = sample_with_logprobs(s, [batch.seeds[i] for i in idx], spec.eta, batch.cond[idx], batch.uncond[idx], window,
                                     None if groups is None else [groups[i] for i in idx],
                                     None if per_group is None else [x[rows[idx]] for x in per_group])
            trajectories.append(t)
            if pool is not None:
                pending.append(pool.submit(score, idx, t.images))
        traj = Trajectory.cat(trajectories)
        scored = [f.result() for f in pending] if pool is not None else [score(list(range(len(prompts))), traj.images)]
    total = torch.cat([t.detach().float().cpu() for t, _ in scored])
    components = {name: torch.cat([c[name].detach().cpu() for _, c in scored]) for name in scored[0][1]}
    return traj, total, components


def _micro_batches(n: int, parts: int) -> list[list[int]]:
    parts = max(1, min(parts, n))
    size = math.ceil(n / parts)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

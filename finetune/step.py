"""What every training job sets up (`setup_training`: the accelerator, models, sampler) and one optimiser
step of it, whatever its method (`train_step`), with the gradients averaged across processes
(`average_gradients`) and the step's numbers recorded (`record`). The trainer (`train.py`) and active
learning (`active.py`) both run through it."""

from __future__ import annotations

import math
import random
from typing import Optional

import torch

from .grpo import PromptStats, grpo_step
from .losses import RewardFn, load_pretrain_pairs, pretrain_loss, refl_loss, reward_weighted_loss
from .pipeline import WEIGHT_DTYPES, setup_models
from .sampler import Sampler
from .spec import JobSpec


def setup_training(spec: JobSpec, ctx) -> tuple:
    """(accelerator, models, sampler, pre-training pairs) of a job: the accelerator's device ("auto" takes the
    GPU, a named device is used as named) with the spec's mixed precision on a GPU, the frozen pipeline with
    the LoRA (`pipeline.setup_models`), the layout's sampler, and `pretrain_data`'s pairs (or none)."""
    from accelerate import Accelerator

    on_gpu = ctx.device != "cpu" and torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=spec.mixed_precision if on_gpu else "no")
    device = accelerator.device if ctx.device in ("auto", "cpu") else torch.device(ctx.device)
    models = setup_models(spec, ctx.base_model, ctx.cache_dir, device, WEIGHT_DTYPES[accelerator.mixed_precision])
    sampler = Sampler(models, spec.guidance_scale, device, accelerator.autocast)
    pairs = load_pretrain_pairs(ctx.pretrain_dir) if ctx.pretrain_dir is not None else []
    return accelerator, models, sampler, pairs


def average_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Data parallel without a DDP wrapper (a step runs several forward passes: guidance, the base model,
    the pre-training loss): every process applies the mean gradient, so the LoRAs stay equal."""
    if accelerator.num_processes > 1:
        for p in params:
            p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")


def train_step(spec: JobSpec, sampler: Sampler, models, reward: RewardFn, prompts: list[str], step: int, rng: random.Random,
               accelerator, stats: Optional[PromptStats], weights: dict, pairs: list, metrics: dict):
    """One optimiser step of the spec's training method (`spec.training_method`) on `prompts` (one per batch
    entry; GRPO repeats each `group_size` times), recorded in `metrics`. Raises FloatingPointError when the
    loss or the reward is not finite (a NaN step ruins the LoRA: the job fails, never "succeeds")."""
    if spec.is_policy_gradient:  # each prompt group_size times: one group per prompt
        prompts = [p for p in prompts for _ in range(spec.group_size)]
    seeds = [rng.randrange(2**31) for _ in prompts]
    cond, uncond = sampler.conditions(prompts)
    models.denoiser.train()
    if spec.is_policy_gradient:  # PPO steps the optimiser itself, once per inner epoch
        result = grpo_step(sampler, spec, reward, prompts, seeds, cond, uncond, rng, models.optimizer, models.params,
                           stats, weights, after_backward=lambda: average_gradients(accelerator, models.params))
    elif spec.training_method == "refl":
        result = refl_loss(sampler, spec, reward, prompts, seeds, cond, uncond, rng)
        if pairs:
            result.loss = result.loss + spec.pretrain_weight * pretrain_loss(sampler, pairs, step, spec.batch_size, spec.resolution, rng)
    else:
        result = reward_weighted_loss(sampler, spec, reward, prompts, seeds, cond, uncond, rng)
        if spec.regularizer == "pretrain" and pairs:
            result.loss = result.loss + spec.pretrain_weight * pretrain_loss(sampler, pairs, step, spec.batch_size, spec.resolution, rng)
    if not spec.is_policy_gradient:
        models.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        average_gradients(accelerator, models.params)
        torch.nn.utils.clip_grad_norm_(models.params, 1.0)
        models.optimizer.step()
    record(metrics, accelerator, result)
    step_loss, step_reward = metrics["loss"][-1], metrics["reward"][-1]  # averaged over processes: all stop together
    if not (math.isfinite(step_loss) and math.isfinite(step_reward)):
        raise FloatingPointError(f"step {step + 1}: the loss ({step_loss}) or the reward ({step_reward}) is not finite; "
                                 "try a lower learning_rate or guidance_scale")
    return result


def record(metrics: dict, accelerator, result) -> None:
    """Append the step's reward, loss and KL (averaged over processes) and each expert's mean score."""
    values = [result.reward.mean(), result.loss.detach(), result.kl]
    if accelerator.num_processes > 1:
        values = [accelerator.reduce(v.detach().float(), reduction="mean") for v in values]
    for key, v in zip(("reward", "loss", "kl"), values):
        metrics[key].append(float(v))
    for name, v in result.components.items():
        metrics.setdefault("components", {}).setdefault(name, []).append(float(v.float().mean()))
    if getattr(result, "advantages", None) is not None:  # GRPO: how much of the batch the clip held back
        metrics.setdefault("clip_fraction", []).append(float(result.clip_fraction))

"""What every training job sets up (`setup_training`: the accelerator, models, sampler, resumed from the
last checkpoint, in one `TrainState`) and one optimiser step of it, whatever its method (`train_step`):
`STEPS` maps each training method to its step function, and the step's numbers are recorded (`record`).
The trainer (`train.py`) and active learning (`active.py`) both run through it."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .advantages import PromptStats
from .artifacts import resume
from .context import Batch, TrainState
from .grpo import GRPOStep, grpo_step
from .losses import StepLoss, load_pretrain_pairs, refl_step, reward_weighted_step
from .pipeline import WEIGHT_DTYPES, setup_models
from .sampler import Sampler
from .spec import JobSpec

StepResult = Union[StepLoss, GRPOStep]

# training method (`JobSpec.training_method`) -> one optimiser step of it; ddpo is GRPO with DDPO's preset
# (tests/test_finetune.py checks that every training method has its step)
STEPS: dict[str, Callable[[TrainState, Batch], StepResult]] = {
    "refl": refl_step,
    "reward_weighted": reward_weighted_step,
    "grpo": grpo_step,
    "ddpo": grpo_step,
}


def setup_training(spec: JobSpec, ctx) -> tuple[TrainState, int, Optional[dict], dict]:
    """(state, the step to start at, the base model's evaluation, the method's extra state) of a job: the
    accelerator's device ("auto" takes the GPU, a named device is used as named) with the spec's mixed
    precision on a GPU, the frozen pipeline with the LoRA (`pipeline.setup_models`), the layout's sampler,
    `pretrain_data`'s pairs (or none), all as the job's last checkpoint in `ctx.out_dir` left them (if any;
    `ctx.metrics` too), and the experts' weights where the method or the sentinel needs them."""
    from accelerate import Accelerator

    on_gpu = ctx.device != "cpu" and torch.cuda.is_available()
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=spec.mixed_precision if on_gpu else "no")
    device = accelerator.device if ctx.device in ("auto", "cpu") else torch.device(ctx.device)
    models = setup_models(spec, ctx.base_model, ctx.cache_dir, device, WEIGHT_DTYPES[accelerator.mixed_precision])
    sampler = Sampler(models, spec.guidance_scale, device, accelerator.autocast)
    pairs = load_pretrain_pairs(ctx.pretrain_dir) if ctx.pretrain_dir is not None else []
    start, base_eval, extra = resume(Path(ctx.out_dir), models.denoiser, models.optimizer, ctx.metrics, root=ctx.checkpoint_dir)
    # why only when used: a remote reward asks the service for them (GET /models)
    weights = ctx.reward.expert_weights() if spec.is_policy_gradient or spec.eval_every else {}
    state = TrainState(spec, accelerator, models, sampler, sampler.with_steps(spec.train_steps), ctx.reward, ctx.metrics, pairs,
                       stats=PromptStats.for_spec(spec, extra.get("prompt_stats")),  # DDPO's, as the checkpoint left them
                       weights=weights, metadata=ctx.metadata)
    return state, start, base_eval, extra


def train_step(state: TrainState, prompts: list[str], step: int, rng: random.Random) -> StepResult:
    """One optimiser step of the spec's training method (`spec.training_method`) on `prompts` (one per batch
    entry; GRPO repeats each `group_size` times), recorded in `state.metrics`. Raises FloatingPointError when
    the loss or the reward is not finite (a NaN step ruins the LoRA: the job fails, never "succeeds")."""
    spec = state.spec
    if spec.is_policy_gradient:  # each prompt group_size times: one group per prompt
        prompts = [p for p in prompts for _ in range(spec.group_size)]
    seeds = [rng.randrange(2**31) for _ in prompts]
    cond, uncond = state.train_sampler.conditions(prompts)
    state.models.denoiser.train()
    batch = Batch(step, prompts, seeds, cond, uncond, rng, state.metadata_for(prompts))  # each image its prompt's metadata
    passes = state.train_sampler.forward_passes
    result = STEPS[spec.training_method](state, batch)
    record(state, result, state.train_sampler.forward_passes - passes)
    step_loss, step_reward = state.metrics["loss"][-1], state.metrics["reward"][-1]  # averaged over processes: all stop together
    if not (math.isfinite(step_loss) and math.isfinite(step_reward)):
        raise FloatingPointError(f"step {step + 1}: the loss ({step_loss}) or the reward ({step_reward}) is not finite; "
                                 "try a lower learning_rate or guidance_scale")
    return result


def record(state: TrainState, result: StepResult, forward_passes: int = 0) -> None:
    """Append the step's reward (the mean over the images that got one), loss and KL (averaged over processes),
    how many images got no reward (`unscored`: a required expert failed on them), the denoiser's forward passes
    (`forward_passes`: images through the denoiser while sampling and training, guidance's two branches counted
    as two; both summed over processes) and each expert's mean score (over the images it scored; null when it
    scored none); GRPO adds the share of clipped ratios and the step's SDE window."""
    metrics, accelerator = state.metrics, state.accelerator
    reward = result.reward.detach().float()
    values = [reward.nanmean(), result.loss.detach(), result.kl]
    counts = torch.tensor([int(torch.isnan(reward).sum()), forward_passes], device=reward.device)
    if accelerator.num_processes > 1:
        values = [accelerator.reduce(v.detach().float(), reduction="mean") for v in values]
        counts = accelerator.reduce(counts, reduction="sum")
    for key, v in zip(("reward", "loss", "kl"), values):
        metrics[key].append(float(v))
    metrics.setdefault("unscored", []).append(int(counts[0]))
    metrics.setdefault("forward_passes", []).append(int(counts[1]))
    for name, v in result.components.items():
        mean = float(v.float().nanmean())
        metrics.setdefault("components", {}).setdefault(name, []).append(mean if math.isfinite(mean) else None)
    if isinstance(result, GRPOStep):  # how much of the batch the clip held back
        metrics.setdefault("clip_fraction", []).append(float(result.clip_fraction))
        metrics.setdefault("sde_window", []).append(list(result.window))

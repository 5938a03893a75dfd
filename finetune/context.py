"""What a job runs with, whatever its method: the `JobContext` (where it writes, its rewards, prompts, base
model, callbacks), `JobCancelled`, the write guard and scoring without gradients; and, for the methods that
train, the `TrainState` (the objects every step works with, set up once per job by `step.setup_training`)
and a step's `Batch` (what changes from one step to the next). The trainer (`train.py`), active learning
(`active.py`) and best-of-n generation (`generate.py`) use them; the step functions (`losses.py`,
`grpo.py`) take a `TrainState` and a `Batch`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .advantages import PromptStats
from .pipeline import Models
from .prompts import PromptMetadata, metadata_for
from .rewards import Reward
from .sampler import Cond, Sampler
from .spec import JobSpec

if TYPE_CHECKING:
    from accelerate import Accelerator


class JobCancelled(Exception):
    """Raised inside the loop when `should_stop` says so; the last state is checkpointed first."""


@dataclass
class JobContext:
    out_dir: Path
    reward: Reward  # reward(images (B,3,H,W) in [0,1], prompts) -> (total (B,), {expert: (B,)}); see rewards.py
    prompts: list[str]
    base_model: str  # 'tiny', a hub id, or a local pipeline directory (prepare_job resolved it)
    cache_dir: Path
    pretrain_dir: Optional[Path] = None
    device: str = "auto"
    on_progress: Optional[Callable[[dict], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    # raises when this process may no longer write (its job was taken over, or it is cut off from the job
    # store): checked at every step and before every write to the job directory, so a stale runner stops
    guard: Optional[Callable[[], None]] = None
    metrics: dict = field(default_factory=lambda: {"reward": [], "loss": [], "kl": []})
    lora_path: Optional[Path] = None  # generate: the LoRA the base model loads
    peer: Optional[object] = None  # the MLLM peer (t2i_reward.rewarders.mllm), for generate's enhancement and reasons
    checkpoint_dir: Optional[Path] = None  # where checkpoints are read and written (default out_dir/checkpoints; a worker: its attempt's)
    # each prompt's metadata for the reward (the spec's prompt_metadata / eval_prompt_metadata, or its prompts_file's);
    # None: `run_job` takes the spec's table, if it has one
    metadata: Optional[PromptMetadata] = None

    def metadata_for(self, prompts: list[str]) -> Optional[list[dict]]:
        """One metadata object per prompt (each image's prompt's), or None for a job without metadata."""
        return metadata_for(self.metadata, prompts)


@dataclass
class TrainState:
    """Everything a training step works with; one per job, from `step.setup_training`."""

    spec: JobSpec
    accelerator: Accelerator  # the device and mixed precision; the other processes under accelerate launch / torchrun
    models: Models  # the frozen pipeline, the denoiser with its LoRA, the LoRA parameters and their optimiser
    sampler: Sampler  # the evaluation chain (`num_inference_steps`): evaluations, the sentinel, active learning's candidates
    train_sampler: Sampler  # the training chain (`train_inference_steps`): what the step functions sample with
    reward: Reward
    metrics: dict  # the job's curves (`ctx.metrics`): each step appends to them
    pairs: list[tuple[Path, str]]  # the pre-training image-text pairs (`pretrain_data`), or none
    stats: Optional[PromptStats]  # DDPO's per-prompt statistics (saved with the checkpoints), else None
    weights: dict[str, float]  # each expert's weight (GRPO's per_expert advantages, the sentinel); {} if unused
    metadata: Optional[PromptMetadata] = None  # each prompt's metadata for the reward (`JobContext.metadata`)

    def metadata_for(self, prompts: list[str]) -> Optional[list[dict]]:
        return metadata_for(self.metadata, prompts)

    def average_gradients(self) -> None:
        """Data parallel without a DDP wrapper (a step runs several forward passes: guidance, the base model,
        the pre-training loss): every process applies the mean gradient, so the LoRAs stay equal."""
        if self.accelerator.num_processes > 1:
            for p in self.models.params:
                p.grad = self.accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")

    def apply_gradients(self) -> None:
        """One optimiser step on the accumulated gradients: averaged across processes, clipped to norm 1."""
        self.average_gradients()
        torch.nn.utils.clip_grad_norm_(self.models.params, 1.0)
        self.models.optimizer.step()

    def minimise(self, loss: torch.Tensor) -> None:
        """One optimiser step on `loss`."""
        self.models.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.apply_gradients()


@dataclass
class Batch:
    """One step's inputs: its index, its prompts (one per image), their seeds and text conditioning, and the
    step's random stream (seeded by the step alone, so a resumed job draws what the uninterrupted one did), and
    each image's prompt's metadata for the reward."""

    step: int
    prompts: list[str]
    seeds: list[int]
    cond: Cond
    uncond: Cond
    rng: random.Random
    metadata: Optional[list[dict]] = None  # one object per image (its prompt's) for the reward, or None


def guard(ctx: JobContext) -> None:
    if ctx.guard is not None:
        ctx.guard()


def require_rewards(total: torch.Tensor, step: int) -> None:
    """A step whose images all lack a reward (an expert failed on every pair) has nothing to learn from: the
    job fails with the reason, and resumes from its last checkpoint when submitted again."""
    if not bool((~torch.isnan(total)).any()):
        raise RuntimeError(f"step {step + 1}: no image got a reward (a required expert failed on every pair); "
                           "see the reward service's log or t2i_expert_failures in its /metrics")


def score(reward: Reward, images: torch.Tensor, prompts: list[str],
          metadata: Optional[list[dict]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total and every expert's scores of evaluation images, without gradients, per pair: NaN where a
    pair has no score (the summaries leave it out) rather than a failed evaluation."""
    with torch.no_grad():
        total, components = reward.scores(images, prompts, metadata)
    return total.detach().cpu(), {n: c.detach().cpu() for n, c in components.items()}

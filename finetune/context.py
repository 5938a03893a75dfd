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


@dataclass
class TrainState:
    """Everything a training step works with; one per job, from `step.setup_training`."""

    spec: JobSpec
    accelerator: Accelerator  # the device and mixed precision; the other processes under accelerate launch / torchrun
    models: Models  # the frozen pipeline, the denoiser with its LoRA, the LoRA parameters and their optimiser
    sampler: Sampler
    reward: Reward
    metrics: dict  # the job's curves (`ctx.metrics`): each step appends to them
    pairs: list[tuple[Path, str]]  # the pre-training image-text pairs (`pretrain_data`), or none
    stats: Optional[PromptStats]  # DDPO's per-prompt statistics (saved with the checkpoints), else None
    weights: dict[str, float]  # each expert's weight (GRPO's per_expert advantages, the sentinel); {} if unused

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
    step's random stream (seeded by the step alone, so a resumed job draws what the uninterrupted one did)."""

    step: int
    prompts: list[str]
    seeds: list[int]
    cond: Cond
    uncond: Cond
    rng: random.Random


def guard(ctx: JobContext) -> None:
    if ctx.guard is not None:
        ctx.guard()


def score(reward: Reward, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total and every expert's scores of evaluation images, without gradients."""
    with torch.no_grad():
        total, components = reward(images, prompts)
    return total.detach().cpu(), {n: c.detach().cpu() for n, c in components.items()}

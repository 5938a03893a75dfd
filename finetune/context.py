"""What a job runs with, whatever its method: the `JobContext` (where it writes, its rewards, prompts, base
model, callbacks), `JobCancelled`, the write guard and scoring without gradients. The trainer (`train.py`)
and best-of-n generation (`generate.py`) both use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .losses import RewardFn


class JobCancelled(Exception):
    """Raised inside the loop when `should_stop` says so; the last state is checkpointed first."""


@dataclass
class JobContext:
    out_dir: Path
    reward: RewardFn  # reward(images (B,3,H,W) in [0,1], prompts) -> (total (B,), {expert: (B,)})
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


def guard(ctx: JobContext) -> None:
    if ctx.guard is not None:
        ctx.guard()


def score(reward: RewardFn, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total and every expert's scores of evaluation images, without gradients."""
    with torch.no_grad():
        total, components = reward(images, prompts)
    return total.detach().cpu(), {n: c.detach().cpu() for n, c in components.items()}

"""The typed spec of a fine-tuning job, with every field documented and defaulted (`prepare.py` turns a
spec into a runnable job).

Paths are confined: `base_model` is a hub id or a path under the configured models directory, and
`pretrain_data` a folder under the configured data directory; the job writes only under its own
directory. `validate_spec` applies the operator's limits (steps, batch size, resolution, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def default_base_model(profile: Optional[str]) -> str:
    """The base model a spec without one gets: the tiny pipeline under the tiny profile, else SD 1.5."""
    return "tiny" if profile == "tiny" else SD15


def with_defaults(spec: "JobSpec", profile: Optional[str]) -> "JobSpec":
    return spec if spec.base_model else spec.model_copy(update={"base_model": default_base_model(profile)})


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["refl", "reward_weighted"] = Field("refl", description="ReFL with KL (thesis) or reward-weighted likelihood (Lee et al.).")
    base_model: Optional[str] = Field(None, description="Hub id, a path under the models directory, or 'tiny' (the tiny random pipeline); default: Stable Diffusion 1.5, or 'tiny' under the tiny profile.")
    prompts: Optional[list[str]] = Field(None, description="Training prompts (cycled); or give topics + n_prompts.")
    topics: Optional[list[str]] = Field(None, description="Topics whose prompts the prompter supplies.")
    n_prompts: int = Field(8, ge=1, description="Prompts drawn per topic when topics are given.")
    steps: int = Field(100, ge=1, description="Optimiser steps.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate of the LoRA parameters.")
    lora_rank: int = Field(4, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(4.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], description="UNet attention projections that get LoRA adapters.")
    batch_size: int = Field(1, ge=1, description="Prompts per step.")
    resolution: int = Field(512, ge=8, description="Image side in pixels (a multiple of the VAE's scale factor).")
    num_inference_steps: int = Field(40, ge=2, description="DDIM steps of the sampling chain.")
    refl_step_range: tuple[int, int] = Field((30, 40), description="ReFL: the step index with gradients is drawn from [a, b).")
    guidance_scale: float = Field(7.5, ge=1.0, description="Classifier-free guidance scale while sampling (1: off).")
    reward_weight: float = Field(1.0, ge=0, description="alpha: weight of the reward term.")
    kl_weight: float = Field(0.01, ge=0, description="beta: weight of the KL term to the frozen base model.")
    reward_loss: Literal["linear", "hinge"] = Field("linear", description="ReFL: -alpha*reward, or ImageReward's hinge relu(2 - reward).")
    regularizer: Literal["kl", "pretrain", "none"] = Field("kl", description="reward_weighted: the KL term, the pre-training loss on pretrain_data, or none.")
    pretrain_data: Optional[str] = Field(None, description="Folder of image-text pairs (x.png + x.txt) under the data directory, for the pre-training loss.")
    pretrain_weight: float = Field(1.0, ge=0, description="Weight of the pre-training denoising loss when pretrain_data is given.")
    reward_weights: Optional[dict[str, float]] = Field(None, description="Per-expert weights of the reward mixture for this job.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast dtype on GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to save memory.")
    seed: int = Field(0, description="Seed of the noise, the prompt order and the step draws.")
    checkpoint_every: int = Field(50, ge=1, description="Save LoRA and optimiser state every N steps (resume point).")
    eval_prompts: Optional[list[str]] = Field(None, description="Prompts of the before/after evaluation (default: the first 4 training prompts).")
    eval_images_per_prompt: int = Field(2, ge=1, description="Images per evaluation prompt, for the base and the fine-tuned model.")

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        if not self.prompts and not self.topics:
            raise ValueError("give prompts, or topics and n_prompts")
        if self.prompts is not None and any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must be non-empty strings")
        a, b = self.refl_step_range
        if not 0 <= a < b <= self.num_inference_steps:
            raise ValueError(f"refl_step_range must satisfy 0 <= a < b <= num_inference_steps, got ({a}, {b})")
        if not self.target_modules:
            raise ValueError("target_modules is empty")
        return self


class JobLimits(BaseModel):
    """What the operator allows; a spec beyond these is refused (422)."""

    max_steps: int = Field(10_000, description="Most steps per job.")
    max_batch_size: int = Field(16, description="Largest batch.")
    max_resolution: int = Field(1024, description="Largest image side.")
    max_prompts: int = Field(10_000, description="Most training prompts.")
    max_lora_rank: int = Field(256, description="Largest LoRA rank.")


def validate_spec(spec: JobSpec, limits: JobLimits, models_dir: Path, data_dir: Path) -> None:
    """Raise ValueError naming the first field outside the limits or the confined directories."""
    checks = [(spec.steps, limits.max_steps, "steps"), (spec.batch_size, limits.max_batch_size, "batch_size"),
              (spec.resolution, limits.max_resolution, "resolution"), (spec.lora_rank, limits.max_lora_rank, "lora_rank"),
              (len(spec.prompts or []), limits.max_prompts, "prompts")]
    for value, limit, name in checks:
        if value > limit:
            raise ValueError(f"{name} is {value}; the limit is {limit}")
    resolve_base_model(spec.base_model or SD15, models_dir)
    if spec.pretrain_data is not None:
        folder = confined(spec.pretrain_data, data_dir, "pretrain_data")
        if not folder.is_dir():
            raise ValueError(f"pretrain_data {spec.pretrain_data!r}: no such folder under the data directory")


def confined(path: str, root: Path, name: str) -> Path:
    """`path` (relative, or absolute inside `root`) resolved inside `root`, or ValueError."""
    root = root.resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root / p).resolve()
    if full != root and root not in full.parents:
        raise ValueError(f"{name} {path!r} is outside the allowed directory {root}")
    return full


def resolve_base_model(base_model: str, models_dir: Path) -> str:
    """'tiny', a hub id, or a directory under `models_dir` (returned as an absolute path)."""
    if base_model == "tiny" or (HUB_ID.match(base_model) and not Path(base_model).is_absolute() and not (models_dir / base_model).exists()):
        return base_model
    full = confined(base_model, models_dir, "base_model")
    if not (full / "model_index.json").is_file():
        raise ValueError(f"base_model {base_model!r}: no diffusers pipeline (model_index.json) under the models directory")
    return str(full)

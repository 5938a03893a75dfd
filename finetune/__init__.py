"""Reward fine-tuning of diffusion models with LoRA: ReFL with KL, and reward-weighted likelihood."""

from .spec import JobLimits, JobSpec, validate_spec
from .train import JobCancelled, JobContext, run_job

__all__ = ["JobCancelled", "JobContext", "JobLimits", "JobSpec", "run_job", "validate_spec"]

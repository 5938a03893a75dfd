"""Reward fine-tuning of diffusion models with LoRA: ReFL with KL, and reward-weighted likelihood."""

from .prepare import PreparedJob, prepare_job
from .settings import FinetuneSettings
from .spec import JobLimits, JobSpec, validate_spec
from .train import JobCancelled, JobContext, run_job

__all__ = ["FinetuneSettings", "JobCancelled", "JobContext", "JobLimits", "JobSpec", "PreparedJob", "prepare_job",
           "run_job", "validate_spec"]

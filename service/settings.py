"""The service's one Settings object: environment variables `T2I_SERVICE_*` (or a .env file)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from finetune.spec import JobLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_SERVICE_", env_file=".env", extra="ignore", env_nested_delimiter="__")

    reward_config: Optional[Path] = Field(None, description="YAML config of the rewarder (see README: Configuration).")
    profile: Optional[str] = Field(None, description="Built-in rewarder profile: default, tiny, random-full, ig-rewarding.")
    host: str = Field("127.0.0.1", description="Address `t2i-reward serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port `t2i-reward serve` listens on.")
    api_keys: list[str] = Field(default_factory=list, description="Accepted API keys (JSON list); empty: no auth.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413.")
    max_images: int = Field(16, ge=1, description="Most images in one request; more gets 422.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Most pixels per image, checked from the header; more gets 413.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt in characters; longer gets 422.")
    max_batch_images: int = Field(32, ge=1, description="Most images in one micro-batch (one forward pass per backbone).")
    max_wait_ms: float = Field(0.0, ge=0, description="Extra wait for more requests before a batch runs (0: run as soon as the model is free, batching what queued meanwhile).")
    max_queue_images: int = Field(256, ge=1, description="Most images waiting for the model; more gets 429.")

    prompts_index: Optional[Path] = Field(None, description="Prompt index directory (t2i-reward prompts build); none: the built-in corpus.")
    max_topics: int = Field(16, ge=1, description="Most topics in one /prompts request.")
    max_n_prompts: int = Field(100, ge=1, description="Most prompts per topic in one /prompts request.")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the job queue and job state.")
    jobs_dir: Path = Field(Path("jobs"), description="Where each job writes its checkpoints and artifacts (shared by API and workers).")
    models_dir: Path = Field(Path("models"), description="Local base models a job may name (besides hub ids and 'tiny').")
    data_dir: Path = Field(Path("data"), description="Folders a job may use as pretrain_data.")
    job_limits: JobLimits = Field(default_factory=JobLimits, description="Limits of a job spec (T2I_SERVICE_JOB_LIMITS__MAX_STEPS=...).")
    reward_service_url: Optional[str] = Field(None, description="Worker: take rewards from this reward service (none: in-process).")
    reward_service_api_key: Optional[str] = Field(None, description="Worker: API key for the reward service.")
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="Worker: a running job silent this long is queued again and resumes.")
    device: str = Field("auto", description="Worker: the device jobs run on.")

    def rewarder_overrides(self) -> dict:
        """The limits the library enforces itself, so the service and the library agree."""
        return {
            "max_images": self.max_images,
            "max_image_pixels": self.max_image_pixels,
            "max_prompt_chars": self.max_prompt_chars,
            "max_batch_size": self.max_batch_images,
        }

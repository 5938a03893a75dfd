"""The settings of fine-tuning: where jobs live (Redis, directories), their limits, and where a worker
takes its models and rewards from. Environment variables `T2I_SERVICE_*` (or a .env file), or flags of
`t2i-reward worker` / `finetune`. The service's `Settings` extends these, so the API and the workers
read one set of variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from t2i_reward.rewarders import RewardConfig, load_config
from t2i_reward.rewarders.mllm import MLLMConfig

from .spec import JobLimits


class FinetuneSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2I_SERVICE_", env_file=".env", extra="ignore", env_nested_delimiter="__")

    reward_config: Optional[Path] = Field(None, description="YAML config of the rewarder (docs: Configuration); `--config`.")
    profile: Optional[str] = Field(None, description="Built-in rewarder profile: default, light, tiny, random-full, ig-rewarding; `--profile`.")
    prompts_index: Optional[Path] = Field(None, description="Prompt index directory (t2i-reward prompts build); none: the built-in corpus; `--prompts-index`.")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the job queue and job state.")
    jobs_dir: Path = Field(Path("jobs"), description="Where each job writes its checkpoints and artifacts (shared by API and workers).")
    models_dir: Path = Field(Path("models"), description="Local base models a job may name (besides hub ids and 'tiny').")
    data_dir: Path = Field(Path("data"), description="Where a job may take pretrain_data (a folder) and prompts_file (a file) from.")
    job_limits: JobLimits = Field(default_factory=JobLimits, description="Limits of a job spec (T2I_SERVICE_JOB_LIMITS__MAX_STEPS=...).")
    reward_service_url: Optional[str] = Field(None, description="Worker: take rewards from this reward service (none: in-process).")
    reward_service_api_key: Optional[str] = Field(None, description="Worker: API key for the reward service.")
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="Worker: a running job silent this long is queued again and resumes.")
    shutdown_timeout_s: float = Field(25.0, gt=0, description="Worker: on SIGTERM or SIGINT the running job stops at its next "
                                      "step, is checkpointed and queued again, and the worker exits within this many seconds "
                                      "(a step still running then is abandoned: the job resumes from its last checkpoint). Keep "
                                      "it under the orchestrator's grace period (compose: stop_grace_period; Kubernetes: 30 s).")
    max_attempts: int = Field(3, ge=1, le=100, description="Worker: a job whose worker dies or is cut off this many times fails "
                              "(a poison job), its checkpoints kept.")
    queued_ttl_s: float = Field(7 * 24 * 3600, gt=0, description="A job still queued (not started) this long after it was queued fails as expired.")
    job_retention_s: float = Field(7 * 24 * 3600, gt=0, description="How long a finished (succeeded, failed, cancelled) job's "
                                   "state stays in Redis and in GET /jobs; its directory is not touched.")
    device: str = Field("auto", description="Worker: the device jobs run on.")
    mllm: Optional[MLLMConfig] = Field(None, description="The MLLM peer (T2I_SERVICE_MLLM__URL, __MODEL, __API_KEY, __TIMEOUT_S, ...; "
                                       "without __URL: the model in-process) of /verify, /prompts/enhance and of generate jobs "
                                       "with `enhance`; none: those answer 503 (jobs: 422).")

    def rewarder_config(self, **overrides) -> RewardConfig:
        """The rewarder's config: the YAML file and/or profile these settings name, then `overrides`."""
        return load_config(self.reward_config, profile=self.profile, **overrides)

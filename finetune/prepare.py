"""`prepare_job`: the one place a spec becomes a runnable job. The API (at submit), the worker (before it
runs the job) and `t2i-reward finetune` all call it, so defaults and checks are the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prompter import PromptIndex

from .settings import FinetuneSettings
from .spec import JobSpec, pretrain_folder, resolve_base_model, validate_spec, with_defaults


@dataclass(frozen=True)
class PreparedJob:
    """A spec ready to run: defaults applied, prompts drawn, paths resolved under these settings."""

    spec: JobSpec  # what is stored with the job: base_model as given (or defaulted), prompts filled in
    base_model: str  # 'tiny', a hub id, or an absolute pipeline directory under the models directory
    pretrain_dir: Optional[Path]


def prepare_job(spec: JobSpec, settings: FinetuneSettings, prompter: PromptIndex | None = None) -> PreparedJob:
    """Apply the defaults (the base model follows the rewarder's profile), check the operator's limits and
    the confined paths, and turn `topics` into prompts with `prompter`. Raises ValueError with a message.

    Idempotent: a prepared spec prepares to itself, so the worker re-checks what the API accepted against
    its own directories.
    """
    profile = settings.rewarder_config().profile
    spec = with_defaults(spec, profile)
    validate_spec(spec, settings.job_limits, settings.models_dir, settings.data_dir)
    if spec.prompts is None:  # topics: drawn once, when the job is prepared, so the job is reproducible
        if prompter is None:
            raise ValueError("the spec gives topics but no prompt index is loaded; give prompts")
        found, _ = prompter.search(spec.topics, spec.n_prompts)
        # validated, not copied: drawn prompts get the same bounds as given ones (the worker re-reads the spec)
        spec = JobSpec.model_validate({**spec.model_dump(), "prompts": [p for per_topic in found for p in per_topic]})
        validate_spec(spec, settings.job_limits, settings.models_dir, settings.data_dir)
    pretrain = pretrain_folder(spec.pretrain_data, settings.data_dir) if spec.pretrain_data else None
    return PreparedJob(spec, resolve_base_model(spec.base_model, settings.models_dir), pretrain)

"""`prepare_job`: the one place a spec becomes a runnable job. The API (at submit), the worker (before it
runs the job) and `t2i-reward finetune` all call it, so defaults and checks are the same everywhere."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from t2i_reward.prompter import PromptIndex
from t2i_reward.rewarders.errors import RewardError

from .settings import FinetuneSettings
from .spec import MAX_EVAL_PROMPTS, JobSpec, pretrain_folder, resolve_base_model, validate_spec, with_defaults


@dataclass(frozen=True)
class PreparedJob:
    """A spec ready to run: defaults applied, prompts drawn, paths resolved under these settings."""

    spec: JobSpec  # what is stored with the job: base_model as given (or defaulted), prompts filled in
    base_model: str  # 'tiny', a hub id, or an absolute pipeline directory under the models directory
    pretrain_dir: Optional[Path]
    lora_path: Optional[Path] = None  # generate: the LoRA file of `lora_from`


def prepare_job(spec: JobSpec, settings: FinetuneSettings, prompter: PromptIndex | None = None) -> PreparedJob:
    """Apply the defaults (the base model follows the rewarder's profile), check the operator's limits and
    the confined paths, and turn `topics` into prompts with `prompter` and `prompts_file` into prompts and
    their metadata (`prompts.load_prompts_file`). Raises ValueError with a message.

    Idempotent: a prepared spec prepares to itself, so the worker re-checks what the API accepted against
    its own directories.
    """
    profile = settings.rewarder_config().profile
    spec = with_defaults(spec, profile)
    validate_spec(spec, settings.job_limits, settings.models_dir, settings.data_dir)
    if spec.prompts is None and spec.prompts_file is not None:  # read once, when the job is prepared, as topics are drawn
        from .prompts import load_prompts_file

        prompts, metadata = load_prompts_file(spec.prompts_file, settings.data_dir)
        spec = JobSpec.model_validate({**spec.model_dump(), "prompts": prompts, "prompt_metadata": metadata})
        validate_spec(spec, settings.job_limits, settings.models_dir, settings.data_dir)
    if spec.prompts is None:  # topics: drawn once, when the job is prepared, so the job is reproducible
        if prompter is None:
            raise ValueError("the spec gives topics but no prompt index is loaded; give prompts")
        found, _ = prompter.search(spec.topics, spec.n_prompts)
        # validated, not copied: drawn prompts get the same bounds as given ones (the worker re-reads the spec)
        spec = JobSpec.model_validate({**spec.model_dump(), "prompts": [p for per_topic in found for p in per_topic]})
        validate_spec(spec, settings.job_limits, settings.models_dir, settings.data_dir)
    if spec.method == "active_learning":
        training_and_held_out(spec.prompts, spec.eval_prompts)  # raises when no prompt is left to train on
    pretrain = pretrain_folder(spec.pretrain_data, settings.data_dir) if spec.pretrain_data else None
    base_model = resolve_base_model(spec.base_model, settings.models_dir)
    check_layout(spec, base_model)
    lora = None
    if spec.lora_from is not None:
        from .pipeline import LORA_FILE

        lora = settings.jobs_dir / spec.lora_from / LORA_FILE
        if not lora.is_file():
            raise ValueError(f"lora_from {spec.lora_from!r}: no finished job with a LoRA of that id")
    if spec.enhance and settings.mllm is None:
        raise ValueError("enhance needs an MLLM peer: set T2I_SERVICE_MLLM__URL and T2I_SERVICE_MLLM__MODEL for the API and the workers")
    return PreparedJob(spec, base_model, pretrain, lora)


def training_and_held_out(prompts: list[str], eval_prompts: Optional[list[str]]) -> tuple[list[str], list[str]]:
    """Active learning's prompts: (the pool rounds draw from, the held-out evaluation prompts). The held-out
    prompts are `eval_prompts` (removed from the pool), else every 4th prompt (a quarter, at least one, at
    most MAX_EVAL_PROMPTS), spread over the list so that each topic's prompts are evaluated too; no round
    ever trains on what it is evaluated on."""
    unique = list(dict.fromkeys(prompts))
    if eval_prompts:
        held = list(dict.fromkeys(eval_prompts))
    else:
        n_held = max(1, min(MAX_EVAL_PROMPTS, len(unique) // 4))
        stride = len(unique) // n_held
        held = unique[stride - 1::stride][:n_held]
    pool = [p for p in unique if p not in set(held)]
    if not pool:
        raise ValueError("active_learning needs training prompts besides the held-out ones: give at least 2 distinct prompts, "
                         "or eval_prompts that are not all of the prompts")
    return pool, held


# the pipeline layouts each method's training loop runs on (`pipeline.pipeline_layout`): ReFL and reward-weighted
# likelihood are written for noise prediction (DDIM's x0 estimate, the epsilon denoising loss), so not for
# flow matching; GRPO needs only a stochastic sampler with log-probabilities, which every layout has
METHOD_LAYOUTS = {"refl": {"sd", "sdxl"}, "reward_weighted": {"sd", "sdxl"}, "grpo": {"sd", "sdxl", "sd3"}, "ddpo": {"sd", "sdxl", "sd3"},
                  "generate": {"sd", "sdxl", "sd3"}}  # active_learning: its learner's
LAYOUT_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3 (flow matching)"}


def check_layout(spec: JobSpec, base_model: str) -> None:
    """A clear error (422 at submit) for a layout the method cannot train, read from model_index.json without
    loading anything; a hub id not in the hub cache yet is checked when the job loads it."""
    from .pipeline import base_model_layout

    layout = base_model_layout(base_model, spec.base_model)
    method = spec.training_method
    if layout is not None and layout not in METHOD_LAYOUTS[method]:
        runs_on = ", ".join(LAYOUT_NAMES[l] for l in LAYOUT_NAMES if l in METHOD_LAYOUTS[method])
        raise ValueError(f"method {method!r} cannot run on a {layout} pipeline ({spec.base_model!r}); it runs on {runs_on} "
                         "pipelines; use method 'grpo' for flow-matching models")


def check_submission(submitted: JobSpec, prepared: PreparedJob, experts: Optional[list[str]], cache_dir: Path,
                     rewarder=None) -> None:
    """What the API refuses at submission (a 422) rather than let the worker fail later: `prompts` together
    with `topics` or `prompts_file` (one of them would be ignored), `reward_weights` naming an expert the
    mixture does not have (`experts`: the configured ones; None: unknown here), prompts whose metadata the
    served mixture's experts cannot score (`rewarder`, once loaded: a GenEval record lacking its `tag`, a
    prompt without the metadata an expert needs), and `target_modules` that match no layer of the base
    model's denoiser, where its config is at hand without a download."""
    if submitted.prompts is not None and submitted.topics is not None:
        raise ValueError("give prompts or topics, not both (the topics would be ignored)")
    if submitted.prompts is not None and submitted.prompts_file is not None:
        raise ValueError("give prompts or prompts_file, not both (the file would be ignored)")
    unknown = sorted(set(submitted.reward_weights or {}) - set(experts)) if experts is not None else []
    if unknown:
        raise ValueError(f"reward_weights names experts that are not configured: {', '.join(map(repr, unknown))}; "
                         f"configured: {', '.join(experts)}")
    if rewarder is not None:
        check_metadata_suits(prepared.spec, rewarder)
    if prepared.spec.method == "generate":  # no LoRA is trained
        return
    config = denoiser_config(prepared.base_model, cache_dir)
    if config is None:
        return
    layers = adaptable_layers(str(config), config.stat().st_mtime_ns)
    missing = [t for t in prepared.spec.target_modules if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        def short(n: str) -> str:  # what a target names: the last part, or the last two for to_out.0
            parts = n.split(".")
            return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]

        examples = sorted({short(n) for n in layers if "attn" in n} or {short(n) for n in layers})[:8]
        raise ValueError(f"target_modules {missing} match no Linear or Conv layer of the {config.parent.name} of "
                         f"{prepared.spec.base_model!r} (its attention layers include {', '.join(examples)})")


def check_metadata_suits(spec: JobSpec, rewarder) -> None:
    """ValueError when an expert of `rewarder` (a `Mixture`) cannot score a training or evaluation prompt with
    its metadata (its `metadata_fields`, its `check_pair`), as a scoring call would refuse it."""
    from .prompts import PromptMetadata, metadata_for

    table = PromptMetadata.of_spec(spec)
    for field, prompts in (("prompts", spec.prompts or []), ("eval_prompts", spec.eval_prompts or [])):
        if not prompts:
            continue
        try:
            rewarder.check_metadata(prompts, metadata_for(table, prompts))
        except RewardError as e:  # its words say "image i": here the i-th prompt of the list
            raise ValueError(f"the rewards cannot score {field} with their metadata ('image i' is {field}[i]): {e}") from None


def denoiser_config(base_model: str, cache_dir: Path) -> Optional[Path]:
    """The config.json of the denoiser (unet/ or transformer/) of a resolved base model: a tiny built-in
    (built once), a local pipeline folder, or a hub id already in the hub cache; None when not at hand."""
    from .tiny import TINY_PIPELINES

    if base_model in TINY_PIPELINES:
        folder = Path(TINY_PIPELINES[base_model](cache_dir))
    elif Path(base_model).is_absolute():
        folder = Path(base_model)
    else:
        from huggingface_hub import try_to_load_from_cache

        for sub in ("unet", "transformer"):
            try:
                cached = try_to_load_from_cache(base_model, f"{sub}/config.json")
            except Exception:
                return None
            if isinstance(cached, str):
                return Path(cached)
        return None
    return next((folder / sub / "config.json" for sub in ("unet", "transformer") if (folder / sub / "config.json").is_file()), None)


@functools.lru_cache(maxsize=16)
def adaptable_layers(config_file: str, mtime_ns: int) -> frozenset[str]:
    """The names of the layers LoRA can adapt (peft: Linear, Conv, Embedding) in the model a diffusers config
    describes, built on the meta device: no weights are read or allocated."""
    import json

    import diffusers
    import torch
    from accelerate import init_empty_weights

    config = json.loads(Path(config_file).read_text())
    with init_empty_weights():
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    return frozenset(n for n, m in model.named_modules() if isinstance(m, kinds))

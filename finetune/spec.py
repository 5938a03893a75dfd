"""The typed spec of a fine-tuning job, with every field documented, defaulted and bounded (`prepare.py`
turns a spec into a runnable job).

Every field has a hard bound in the schema (`/openapi.json` shows it), so no request can ask for a job the
service cannot run in finite time and memory; `JobLimits` (the operator's, from settings) may tighten the
bounds of steps, batch size, resolution, prompts and LoRA rank, never loosen them. Floats must be finite,
ints are strict (no `true` for 1), and text must be valid Unicode without NUL (a lone UTF-16 surrogate
cannot even be written back as UTF-8).

Paths are confined: `base_model` is 'tiny', a hub id, or a pipeline directory under the configured models
directory, and `pretrain_data` a folder and `prompts_file` a file under the configured data directory; the job writes only under its
own directory. Hub ids are never looked up relative to the working directory (`pipeline.load_pipeline`
resolves them through the hub cache).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.rewarders.limits import Limits
from t2i_reward.rewarders.metadata import MetadataObject, check_metadata

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_MODELS = ("tiny", "tiny-sdxl", "tiny-sd3")  # tiny random pipelines (SD-1.x, SDXL, SD3 layouts), built on first use

# Hard bounds of every spec (docs/finetuning.md, docs/configuration.md). Shared with the /prompts endpoint.
MAX_TEXT_CHARS = Limits().max_prompt_chars  # a prompt or topic: the library's prompt limit (rewarders/limits.py)
METADATA_LIMITS = Limits()  # a prompt's metadata: the library's bounds (size, depth), as every scoring call's
MAX_NAME_CHARS = 256  # base_model, pretrain_data
MAX_TOPICS = 16
MAX_N_PROMPTS = 100  # per topic
MAX_PROMPTS = 10_000
MAX_EVAL_PROMPTS = 16
MAX_STEPS = 100_000
MAX_BATCH_SIZE = 64
MIN_RESOLUTION, MAX_RESOLUTION = 32, 2048  # 32: the tiny test pipeline; real SD wants 512
MAX_LORA_RANK = 512
MAX_INFERENCE_STEPS = 1000  # the DDPM schedule SD was trained on has 1000 timesteps
MAX_WEIGHT = 1e3  # any loss or mixture weight, in absolute value
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
MAX_GROUP_SIZE = 64  # GRPO: images per prompt and step
MAX_ROUNDS = 100  # active learning

# Hub ids as the hub spells them: two parts of letters, digits, '_', '.', '-', neither starting nor ending
# with '.' or '-', at most 96 characters each; '..' and '--' are refused (the hub refuses them too).
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$", re.ASCII)


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and ".." not in name and "--" not in name


def _no_nul(s: str) -> str:
    """NUL breaks paths, C libraries and logs. (Lone UTF-16 surrogates, which cannot be stored or echoed as
    UTF-8, are refused by pydantic's length-constrained str itself: 'unable to parse ... unicode'.) Right-to-left
    marks and other format characters are ordinary text."""
    if "\x00" in s:
        raise ValueError("contains a NUL character")
    return s


def _non_blank(s: str) -> str:
    if not s.strip():
        raise ValueError("must be a non-empty string, not only spaces")
    return s


Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_no_nul), AfterValidator(_non_blank)]
PathName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_no_nul)]
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.]+$")]
ExpertName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT, strict=True)]
StepIndex = Annotated[int, Field(ge=0, le=MAX_INFERENCE_STEPS, strict=True)]
JobId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


def default_base_model(profile: Optional[str]) -> str:
    """The base model a spec without one gets: the tiny pipeline under the tiny profile, else SD 1.5."""
    return "tiny" if profile == "tiny" else SD15


def with_defaults(spec: "JobSpec", profile: Optional[str]) -> "JobSpec":
    return spec if spec.base_model else spec.model_copy(update={"base_model": default_base_model(profile)})


def _int(default: int, lo: int, hi: int, description: str):
    return Field(default, ge=lo, le=hi, strict=True, description=description)  # strict: `true` is not 1


def _float(default: float, lo: float, hi: float, description: str, gt: bool = False):
    bounds = {"gt": lo} if gt else {"ge": lo}
    return Field(default, le=hi, strict=True, description=description, **bounds)


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/inf in any float field: 422

    method: Literal["refl", "reward_weighted", "grpo", "ddpo", "generate", "active_learning"] = Field(
        "refl", description="ReFL with KL (thesis), reward-weighted likelihood (Lee et al.), GRPO (group-relative PPO on the model's "
        "own samples, as Flow-GRPO / DanceGRPO), ddpo: GRPO's preset for DDPO (group_size 1, per-prompt statistics), generate: "
        "best-of-n images per prompt, ranked by the rewards (no training), or active_learning: rounds of generate, score, select "
        "the most informative prompts, fine-tune on them with `learner`, evaluate on held-out prompts.")
    base_model: Optional[PathName] = Field(None, description="Hub id (org/name), a pipeline directory under the models directory, or 'tiny' / 'tiny-sdxl' / 'tiny-sd3' (tiny random SD-1.x / SDXL / SD3 pipelines); default: Stable Diffusion 1.5, or 'tiny' under the tiny profile.")
    prompts: Optional[list[Text]] = Field(None, min_length=1, max_length=MAX_PROMPTS, description="Training prompts (cycled); or give topics + n_prompts, or prompts_file.")
    prompt_metadata: Optional[list[MetadataObject]] = Field(None, min_length=1, max_length=MAX_PROMPTS, description="One JSON object per "
        "training prompt, in order, handed to the rewards with each of its images (GenEval records, an OCR `text`); at most "
        "max_metadata_bytes and max_metadata_depth each (the library's limits). A prompt given twice carries the same object.")
    prompts_file: Optional[PathName] = Field(None, description="A file of training prompts under the data directory, read when the job "
        "is submitted: .jsonl (one JSON object a line with a 'prompt'; the whole object is that prompt's metadata, as GenEval's "
        "and Flow-GRPO's metadata files) or .txt (one prompt a line, no metadata).")
    topics: Optional[list[Text]] = Field(None, min_length=1, max_length=MAX_TOPICS, description="Topics whose prompts the prompter supplies.")
    n_prompts: int = _int(8, 1, MAX_N_PROMPTS, "Prompts drawn per topic when topics are given.")
    steps: int = _int(100, 1, MAX_STEPS, "Optimiser steps (active_learning: per round); the operator's limit (on all rounds' steps) may be lower.")
    learning_rate: float = _float(1e-4, 0, 1.0, "AdamW learning rate of the LoRA parameters.", gt=True)
    lora_rank: int = _int(4, 1, MAX_LORA_RANK, "LoRA rank (the operator's limit may be lower).")
    lora_alpha: float = _float(4.0, 0, 4096.0, "LoRA alpha (scale = alpha / rank).", gt=True)
    target_modules: list[ModuleName] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1, max_length=32, description="UNet attention projections that get LoRA adapters.")
    batch_size: int = _int(1, 1, MAX_BATCH_SIZE, "Prompts per step (the operator's limit may be lower).")
    resolution: int = Field(512, ge=MIN_RESOLUTION, le=MAX_RESOLUTION, multiple_of=8, strict=True, description="Image side in pixels, a multiple of 8 (the VAE's scale factor); the operator's limit may be lower.")
    num_inference_steps: int = _int(40, 2, MAX_INFERENCE_STEPS, "Steps of the evaluation chain (the before/after evaluation, the "
                                    "sentinel, reports) and, unless train_inference_steps is given, of the chain sampled for training.")
    train_inference_steps: Optional[int] = Field(None, ge=2, le=MAX_INFERENCE_STEPS, strict=True, description="Steps of the chain "
        "sampled for training (every method; GRPO's trajectories, ReFL's refl_step_range counts in it); default: num_inference_steps. "
        "Flow-GRPO trains with 10 and evaluates with 40.")
    refl_step_range: tuple[StepIndex, StepIndex] = Field((30, 40), description="ReFL: the step index with gradients is drawn from [a, b).")
    guidance_scale: float = _float(7.5, 1.0, 30.0, "Classifier-free guidance scale while sampling (1: off).")
    reward_weight: float = _float(1.0, 0, MAX_WEIGHT, "alpha: weight of the reward term.")
    kl_weight: float = _float(0.01, 0, MAX_WEIGHT, "beta: weight of the KL term to the frozen base model.")
    reward_loss: Literal["linear", "hinge"] = Field("linear", description="ReFL: -alpha*reward, or ImageReward's hinge relu(2 - reward).")
    regularizer: Literal["kl", "pretrain", "none"] = Field("kl", description="reward_weighted: the KL term, the pre-training loss on pretrain_data, or none.")
    pretrain_data: Optional[PathName] = Field(None, description="Folder of image-text pairs (x.png + x.txt) under the data directory, for the pre-training loss.")
    pretrain_weight: float = _float(1.0, 0, MAX_WEIGHT, "Weight of the pre-training denoising loss when pretrain_data is given.")
    reward_weights: Optional[dict[ExpertName, Weight]] = Field(None, max_length=32, description="Per-expert weights of the reward mixture for this job.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast dtype on GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to save memory.")
    seed: int = _int(0, 0, MAX_SEED, "Seed of the noise, the prompt order and the step draws.")
    checkpoint_every: int = _int(50, 1, MAX_STEPS, "Save LoRA and optimiser state every N steps (resume point; active_learning: also at the end of each round).")
    eval_prompts: Optional[list[Text]] = Field(None, min_length=1, max_length=MAX_EVAL_PROMPTS, description="Prompts of the before/after evaluation (default: the first 4 training prompts; active_learning: held out of training, default every 4th prompt, at most 16).")
    eval_prompt_metadata: Optional[list[MetadataObject]] = Field(None, min_length=1, max_length=MAX_EVAL_PROMPTS, description="One JSON "
        "object per evaluation prompt, as prompt_metadata (default: an evaluation prompt that is a training prompt carries its metadata, "
        "another none).")
    eval_images_per_prompt: int = _int(2, 1, 16, "Images per evaluation prompt, for the base and the fine-tuned model.")
    # ---- GRPO / DDPO (defaults: DDPO's and Flow-GRPO's published settings where they agree)
    group_size: int = _int(4, 1, MAX_GROUP_SIZE, "GRPO: images sampled per prompt and step; the advantages are relative to the group (at least 2; ddpo: 1).")
    eta: float = _float(1.0, 0.0, 1.0, "GRPO: DDIM's eta, the sampler's stochasticity (DDPO: 1.0); > 0, since a deterministic step has no log-probability.", gt=True)
    clip_range: float = _float(1e-4, 0.0, 1.0, "GRPO: PPO's clip range of the probability ratio (DDPO and Flow-GRPO: 1e-4).", gt=True)
    adv_clip_max: float = _float(5.0, 0.0, 100.0, "GRPO: advantages are clipped to +-this (DDPO and Flow-GRPO: 5).", gt=True)
    num_inner_epochs: int = _int(1, 1, 16, "GRPO: optimiser passes over each batch of samples (DDPO: 1).")
    timestep_fraction: float = _float(1.0, 0.0, 1.0, "GRPO: share of the SDE window's transitions trained on per pass, drawn at random "
                                      "(DDPO: 1.0; Flow-GRPO: 0.99).", gt=True)
    sde_window: Optional[tuple[StepIndex, StepIndex]] = Field(None, description="GRPO: [first, last) transitions of the training chain "
        "that are stochastic and trained on; the others are deterministic (eta 0) and never trained on. Its length is the window's size "
        "under every schedule; its position is where a 'fixed' or 'sliding' window starts. Default: the whole chain.")
    sde_window_schedule: Literal["fixed", "sliding", "random"] = Field("fixed", description="GRPO: where the window is at each step: "
        "'fixed' (sde_window), 'sliding' (MixGRPO: it moves sde_window_stride transitions every sde_window_shift_every steps, back to the "
        "start of sde_window_range when it would leave it), or 'random' (Flow-GRPO-Fast: drawn at each step, uniformly within sde_window_range).")
    sde_window_range: Optional[tuple[StepIndex, StepIndex]] = Field(None, description="GRPO: [first, last) transitions a 'sliding' or "
        "'random' window stays within (Flow-GRPO-Fast: (0, train_inference_steps // 2)); default: the whole training chain.")
    sde_window_stride: int = _int(1, 1, MAX_INFERENCE_STEPS, "GRPO, sliding window: transitions the window moves at each shift.")
    sde_window_shift_every: int = _int(1, 1, MAX_STEPS, "GRPO, sliding window: optimiser steps between two shifts.")
    group_initial_noise: bool = Field(False, description="GRPO: the images of a group start from the same noise (their SDE steps differ), "
        "and the deterministic steps before the window are run once per group instead of once per image (Flow-GRPO-Fast's branching; "
        "Flow-GRPO's same_latent).")
    sampling_micro_batches: int = _int(1, 1, MAX_BATCH_SIZE * MAX_GROUP_SIZE, "GRPO: the step's images are sampled in this many "
        "micro-batches (memory; with stream_rewards, the unit of overlap).")
    stream_rewards: bool = Field(False, description="GRPO: send each sampling micro-batch's images to the reward as soon as it is "
        "sampled, while the next one is sampled (verl-omni's streaming); the advantages wait for the whole group. The same numbers as "
        "scoring after sampling, except for a batch-level expert (diversity), which then sees one micro-batch at a time.")
    gradient_accumulation_steps: int = _int(1, 1, MAX_BATCH_SIZE * MAX_GROUP_SIZE, "GRPO: micro-batches a step's images are split into (memory), their gradients summed before the optimiser step.")
    advantage_normalization: Literal["total", "per_expert"] = Field("total", description="GRPO: z-score the weighted total within each group, or z-score each expert within the group and then weight them (multi-reward).")
    per_prompt_stats: bool = Field(False, description="GRPO: normalise each prompt's rewards by its last stat_buffer_size rewards across steps (DDPO's per-prompt statistics) instead of its group.")
    stat_buffer_size: int = _int(32, 1, 10_000, "GRPO with per_prompt_stats: rewards kept per prompt.")
    stat_min_count: int = _int(16, 1, 10_000, "GRPO with per_prompt_stats: below this many rewards a prompt is normalised with the whole batch.")
    # ---- generate (best-of-n)
    n_images: int = _int(4, 1, MAX_GROUP_SIZE, "generate: images per prompt, ranked by the reward; active_learning: the K candidates "
                         "generated per drawn prompt (at least 2).")
    enhance: bool = Field(False, description="generate: rewrite each prompt with the MLLM peer first (the worker's T2I_SERVICE_MLLM__*).")
    lora_from: Optional[JobId] = Field(None, description="generate: the id of an earlier job whose LoRA the base model loads.")
    # ---- active learning (the MLLM-feedback seed's stage 2)
    rounds: int = _int(2, 1, MAX_ROUNDS, "active_learning: rounds of draw, generate, score, select, fine-tune, evaluate.")
    round_prompts: int = _int(4, 1, MAX_BATCH_SIZE, "active_learning: prompts drawn per round from the training prompts (not the held-out ones).")
    select_prompts: int = _int(2, 1, MAX_BATCH_SIZE, "active_learning: the most informative of a round's prompts kept for fine-tuning (<= round_prompts).")
    select: Literal["spread", "disagreement"] = Field("spread", description="active_learning: informativeness of a prompt: the spread "
                                                      "(std) of its K candidates' total reward, or how much the experts disagree on their order "
                                                      "(the variance across experts of each candidate's in-group z-score, averaged).")
    learner: Literal["grpo", "reward_weighted", "refl"] = Field("grpo", description="active_learning: the method of each round's `steps` "
                                                                "steps on the selected prompts (its own fields apply: group_size, kl_weight, ...).")
    # ---- reward-hacking sentinel (every method)
    eval_every: int = _int(0, 0, MAX_STEPS, "Every N steps, score the evaluation prompts with every configured expert and image statistics (0: only before and after).")
    stop_on_hacking: bool = Field(False, description="Stop, keep the best checkpoint and fail with the reason when a held-out expert falls while the optimised reward rises.")
    hacking_threshold_se: float = _float(3.0, 0.0, 100.0, "How many standard errors a held-out expert must fall below the base model to count as hacking.", gt=True)

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        if not self.prompts and not self.topics and not self.prompts_file:
            raise ValueError("give prompts, topics and n_prompts, or prompts_file")
        if self.topics and self.prompts_file:
            raise ValueError("give topics or prompts_file, not both")
        self._check_metadata()
        a, b = self.refl_step_range
        if self.training_method == "refl" and not 0 <= a < b <= self.train_steps:
            raise ValueError(f"refl_step_range must satisfy 0 <= a < b <= train_inference_steps ({self.train_steps}), got ({a}, {b})")
        self._check_window()
        if self.training_method == "grpo" and self.group_size < 2 and not self.per_prompt_stats:
            raise ValueError("GRPO needs group_size >= 2 (advantages are relative to the group); use method 'ddpo' "
                             "or per_prompt_stats for groups of one")
        if self.batch_size * self.group_size > MAX_BATCH_SIZE * 4:
            raise ValueError(f"batch_size * group_size is {self.batch_size * self.group_size}; the limit is {MAX_BATCH_SIZE * 4} images per step")
        if self.method != "generate" and (self.enhance or self.lora_from is not None):
            raise ValueError("enhance and lora_from apply to method 'generate' only")
        if self.method == "active_learning":
            if self.eval_every or self.stop_on_hacking:
                raise ValueError("active_learning evaluates the held-out prompts after every round; eval_every and stop_on_hacking do not apply")
            if self.n_images < 2:
                raise ValueError("active_learning needs n_images >= 2: a prompt's informativeness compares its candidates")
            if self.select_prompts > self.round_prompts:
                raise ValueError(f"select_prompts ({self.select_prompts}) must be at most round_prompts ({self.round_prompts})")
            if self.total_steps > MAX_STEPS:
                raise ValueError(f"rounds * steps is {self.total_steps}; the limit is {MAX_STEPS}")
        return self

    def _check_window(self) -> None:
        """The SDE window and its range lie in the training chain; the window fits in its range."""
        chosen = [f for f in ("sde_window", "sde_window_range", "group_initial_noise", "stream_rewards") if getattr(self, f)]
        chosen += [f for f, default in (("sde_window_schedule", "fixed"), ("sampling_micro_batches", 1)) if getattr(self, f) != default]
        if chosen and not self.is_policy_gradient:
            raise ValueError(f"{', '.join(chosen)} apply to GRPO and DDPO only (method {self.training_method!r})")
        n = self.train_steps
        for name, (a, b) in (("sde_window", self.window), ("sde_window_range", self.window_range)):
            if not 0 <= a < b <= n:
                raise ValueError(f"{name} must satisfy 0 <= first < last <= train_inference_steps ({n}), got ({a}, {b})")
        (a, b), (lo, hi) = self.window, self.window_range
        if self.sde_window_schedule != "fixed" and b - a > hi - lo:
            raise ValueError(f"sde_window ({a}, {b}) is longer than sde_window_range ({lo}, {hi})")
        if self.sde_window_schedule == "sliding" and not lo <= a <= hi - (b - a):
            raise ValueError(f"a sliding sde_window starts inside sde_window_range: ({a}, {b}) is not within ({lo}, {hi})")

    @property
    def train_steps(self) -> int:
        """Steps of the chain sampled for training."""
        return self.train_inference_steps if self.train_inference_steps is not None else self.num_inference_steps

    @property
    def window(self) -> tuple[int, int]:
        """The SDE window as given (default: the whole training chain)."""
        return tuple(self.sde_window) if self.sde_window is not None else (0, self.train_steps)

    @property
    def window_range(self) -> tuple[int, int]:
        return tuple(self.sde_window_range) if self.sde_window_range is not None else (0, self.train_steps)

    def _check_metadata(self) -> None:
        """Each list of metadata: one JSON object per prompt of its list, within the library's bounds, and one
        object per prompt text across both lists."""
        pairs = []
        for field, prompts_field, metadata, prompts in (("prompt_metadata", "prompts", self.prompt_metadata, self.prompts),
                                                        ("eval_prompt_metadata", "eval_prompts", self.eval_prompt_metadata, self.eval_prompts)):
            if metadata is None:
                continue
            if prompts is None:
                raise ValueError(f"{field} needs {prompts_field}: one JSON object per prompt")
            pairs += list(zip(prompts, checked_metadata(metadata, len(prompts), field)))
        check_prompt_metadata(pairs)

    @model_validator(mode="before")
    @classmethod
    def _ddpo_preset(cls, data):
        """method 'ddpo' is GRPO with DDPO's defaults: one image per prompt, per-prompt statistics, no KL
        (fields given explicitly are kept). It is a preset, not a second code path."""
        if isinstance(data, dict) and data.get("method") == "ddpo":
            data = {"group_size": 1, "per_prompt_stats": True, "kl_weight": 0.0, **data}
        return data

    @property
    def training_method(self) -> str:
        """The method whose steps train the LoRA: active learning trains with its `learner`."""
        return self.learner if self.method == "active_learning" else self.method

    @property
    def is_policy_gradient(self) -> bool:
        return self.training_method in ("grpo", "ddpo")

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole job (every round's, for active learning): the progress total."""
        return self.rounds * self.steps if self.method == "active_learning" else self.steps


class JobLimits(BaseModel):
    """What the operator allows; a spec beyond these is refused (422). Each is capped by the spec's hard
    bound: settings can tighten the bounds, never loosen them (a larger value fails at start-up)."""

    max_steps: int = Field(10_000, ge=1, le=MAX_STEPS, description="Most steps per job.")
    max_batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE, description="Largest batch.")
    max_resolution: int = Field(1024, ge=MIN_RESOLUTION, le=MAX_RESOLUTION, description="Largest image side.")
    max_prompts: int = Field(MAX_PROMPTS, ge=1, le=MAX_PROMPTS, description="Most training prompts.")
    max_lora_rank: int = Field(256, ge=1, le=MAX_LORA_RANK, description="Largest LoRA rank.")
    max_group_size: int = Field(32, ge=1, le=MAX_GROUP_SIZE, description="Largest GRPO group (images per prompt and step).")


def validate_spec(spec: JobSpec, limits: JobLimits, models_dir: Path, data_dir: Path) -> None:
    """Raise ValueError naming the first field outside the limits or the confined directories."""
    steps = "rounds * steps" if spec.method == "active_learning" else "steps"
    checks = [(spec.total_steps, limits.max_steps, steps), (spec.batch_size, limits.max_batch_size, "batch_size"),
              (spec.resolution, limits.max_resolution, "resolution"), (spec.lora_rank, limits.max_lora_rank, "lora_rank"),
              (len(spec.prompts or []), limits.max_prompts, "prompts"), (spec.group_size, limits.max_group_size, "group_size")]
    if spec.method == "active_learning":  # a round generates round_prompts x n_images candidates
        checks += [(spec.round_prompts, limits.max_batch_size, "round_prompts"), (spec.n_images, limits.max_group_size, "n_images")]
    for value, limit, name in checks:
        if value > limit:
            raise ValueError(f"{name} is {value}; the limit is {limit}")
    resolve_base_model(spec.base_model or SD15, models_dir)
    if spec.pretrain_data is not None:
        pretrain_folder(spec.pretrain_data, data_dir)


def checked_metadata(metadata: Sequence[Any], n: int, field: str) -> list[dict]:
    """`metadata` (one JSON object per prompt of n) checked against the library's bounds (rewarders/metadata.py);
    ValueError naming `field`."""
    try:
        return check_metadata(list(metadata), n, METADATA_LIMITS) or []
    except InvalidRequestError as e:
        message = str(e)
        if message.startswith("metadata["):  # the library names a pair's metadata; a spec names its field
            message = field + message.removeprefix("metadata")
        elif message.startswith(f"{len(metadata)} metadata objects"):
            message = f"{len(metadata)} {field} objects for {n} prompts: give one JSON object per prompt"
        raise ValueError(message) from None


def check_prompt_metadata(pairs: Sequence[tuple[str, dict]]) -> None:
    """ValueError when one prompt text carries two different metadata objects: a job looks each sampled prompt's
    metadata up by its text (finetune/prompts.py)."""
    seen: dict[str, dict] = {}
    for prompt, meta in pairs:
        if seen.setdefault(prompt, meta) != meta:
            raise ValueError(f"prompt {prompt[:80]!r} is given twice with different metadata; all the samples of a prompt "
                             "are scored with one metadata object")


def confined(path: str, root: Path, name: str) -> Path:
    """`path` (relative, or absolute inside `root`) resolved inside `root`, or ValueError. The message never
    names `root`: an API answer must not describe the server's filesystem."""
    root = root.resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root / p).resolve()
    if full != root and root not in full.parents:
        raise ValueError(f"{name} {path!r} is outside the allowed directory")
    return full


def pretrain_folder(path: str, data_dir: Path) -> Path:
    """The pretrain_data folder under `data_dir`. One message whether it is missing or outside, so the
    answer does not tell which folders exist elsewhere."""
    try:
        folder = confined(path, data_dir, "pretrain_data")
    except ValueError:
        folder = None
    if folder is None or not folder.is_dir():
        raise ValueError(f"pretrain_data {path!r}: no such folder in the data directory (paths outside it are refused)")
    return folder


def resolve_base_model(base_model: str, models_dir: Path) -> str:
    """'tiny'; a pipeline directory under `models_dir` (returned as an absolute path); else a hub id
    (returned as is: `pipeline.load_pipeline` loads it through the hub cache, never from the working
    directory). Anything else, missing or outside, gets one message that discloses nothing about the
    filesystem."""
    if base_model in TINY_MODELS:
        return base_model
    local = _local_pipeline(base_model, models_dir)
    if local is not None:
        return str(local)
    if is_hub_id(base_model):
        return base_model
    raise ValueError(f"base_model {base_model!r} is not 'tiny', 'tiny-sdxl', 'tiny-sd3', a hub id (org/name) or a pipeline directory "
                     "in the models directory (paths outside it are refused)")


def _local_pipeline(name: str, models_dir: Path) -> Optional[Path]:
    if any(part in (".", "..") for part in name.split("/")):  # no walking up, even to come back
        return None
    try:
        full = confined(name, models_dir, "base_model")
    except (ValueError, OSError):
        return None
    return full if (full / "model_index.json").is_file() else None

"""The one typed configuration of the rewarder, from a profile, a YAML file and environment variables.

Layers, lowest first: the profile, the YAML file, keyword overrides (`load_config(..., experts={...})`),
environment variables (`T2I_REWARD_...`, nested with `__`, e.g.
`T2I_REWARD_EXPERTS__IMAGEREWARD__CHECKPOINT=/models/ImageReward.pt`).

`experts` maps expert names (`list_experts()`, plugins included) to their configs, each validated by
the expert's own `Config` model. Which experts are enabled:
- a YAML file that has an `experts` key, or a whole `T2I_REWARD_EXPERTS` JSON variable, enables exactly
  the experts it lists; the profile supplies the defaults of each listed expert's fields;
- keyword overrides and single-field variables (`T2I_REWARD_EXPERTS__NAME__FIELD`) change the experts
  already there, field by field;
- `null` disables an expert in every layer.

Checkpoint specs understood by every expert (`checkpoints.resolve_checkpoint`): a local file or a
directory holding the expected file name; a hub id (`org/repo`, or `org/repo/path/in/repo` for another
file); `tiny` (the expert's tiny random-weight model in the real format, built on first use into
`cache_dir`); `random` (the full-size architecture with random weights, for benchmarks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import InvalidRequestError
from .limits import limit_field
from .pools import RayConfig
from .registry import ExpertConfig, get_expert_class

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i-reward"


class RewardConfig(BaseSettings):
    """Everything the mixture of reward experts needs."""

    model_config = SettingsConfigDict(env_prefix="T2I_REWARD_", env_nested_delimiter="__", extra="forbid")

    profile: str = Field("default", description="Name of the built-in profile this config started from.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="'auto': bfloat16 on GPU, float32 on CPU.")
    max_batch_size: int = Field(16, ge=1, description="Most images per forward pass of a backbone.")
    batch_invariant: bool = Field(
        False, description="Score every pair bit-identically whatever it is batched with: each forward pass runs at "
                           "exactly max_batch_size pairs (the last padded) and each text pass at a fixed shape "
                           "(rewarders/invariance.py). Costs the padding (docs: Scores, Batch invariance).",
    )
    normalize: bool = Field(True, description="Normalise each expert by its mean/std before weighting (False: raw weighted sum).")
    # the request limits (limits.py declares their defaults and bounds)
    max_image_pixels: int = limit_field("max_image_pixels")
    max_prompt_chars: int = limit_field("max_prompt_chars")
    max_request_pixels: int = limit_field("max_request_pixels")
    max_aspect_ratio: float = limit_field("max_aspect_ratio")
    max_images: int = limit_field("max_images")
    max_metadata_bytes: int = limit_field("max_metadata_bytes")
    max_metadata_depth: int = limit_field("max_metadata_depth")
    cache_dir: Path = Field(DEFAULT_CACHE, description="Where tiny models are built and hub files cached by us.")
    seed: int = Field(0, description="Seed for 'random' weights, so benchmarks are repeatable.")
    calibration: Optional[str] = Field(
        None, description="Path to a calibration JSON written by `t2i-reward calibrate`, or 'tiny' (the packaged "
                          "one of the tiny profile): answers can then give each score's percentile ('explain').",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="The service on Ray Serve (`t2i-reward serve "
                           "--ray`): which experts share a pool, each pool's replicas and resources (see `RayConfig`); "
                           "the single-process service ignores it.")
    experts: dict[str, SerializeAsAny[ExpertConfig]] = Field(
        default_factory=lambda: _default()["experts"], validate_default=True,
        description="The enabled experts by name, each with its own config (see the expert's Config).",
    )

    @field_validator("experts", mode="before")
    @classmethod
    def _validate_experts(cls, value: Any) -> dict[str, ExpertConfig]:
        """Each entry through its expert's own config model (the registry knows it); None drops the expert."""
        if not isinstance(value, dict):
            raise ValueError("experts must be a mapping from expert name to its config")
        out = {}
        for name, cfg in value.items():
            if cfg is None:
                continue
            config_cls = get_expert_class(name).Config
            try:
                out[name] = cfg if isinstance(cfg, config_cls) else config_cls.model_validate(cfg)
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
                raise ValueError(f"{name}: {problems}") from None
        return out

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the environment overrides both the profile and the YAML file (passed as init values)
        return env_settings, init_settings


# ----------------------------------------------------------------------------------------------
# profiles: the experts each one enables, and the defaults of their fields

def _default() -> dict[str, Any]:
    # the rewards today's RL fine-tuning trains with (Flow-GRPO, DanceGRPO, AlignProp): three preference
    # models trained on different human data, so that no single model's blind spot is worth exploiting,
    # CLIP score for text alignment, and the aesthetic head at half weight (alone, it rewards saturated,
    # over-stylised images); every expert normalised by its logit unit, so the weights are comparable.
    # docs/configuration.md "The default profile" says why, and what it costs.
    return {
        "experts": {
            "imagereward": {"weight": 1.0},
            "pickscore": {"weight": 1.0},
            "hpsv2": {"weight": 1.0},
            "clip_score": {"weight": 0.5},
            "aesthetic": {"weight": 0.5},
        }
    }


def _light() -> dict[str, Any]:
    # one BLIP and one CLIP ViT-L/14: for CPU hosts and small GPUs (what the default profile used to be)
    return {"experts": {"imagereward": {}, "aesthetic": {}}}


def _tiny() -> dict[str, Any]:
    return {
        "calibration": "tiny",  # rewarders/data/calibration-tiny.json, made by scripts/make_tiny_calibration.py
        "experts": {
            "imagereward": {"checkpoint": "tiny", "tokenizer": "packaged"},
            "aesthetic": {"clip": "tiny", "head": "tiny", "mean": 0.0, "std": 1.0},
            "mlp": {"checkpoint": "tiny"},
        }
    }


def _random_full() -> dict[str, Any]:
    return {
        "experts": {
            "imagereward": {"checkpoint": "random", "tokenizer": "packaged"},
            "aesthetic": {"clip": "ViT-L-14/random", "head": "random"},
            "mlp": {"checkpoint": "random"},
        }
    }


def _ig_rewarding() -> dict[str, Any]:
    # toilaluan/ig-rewarding's baseline.yaml: the weighted sum of the raw per-expert means, no normalisation;
    # PickScore and HPSv2 as its code computes them: the raw image-text cosine (no logit scale), HPSv2 v2.0
    # (HPS_v2_compressed.pt, the file its hpsv2 version loads)
    return {
        "normalize": False,
        "experts": {
            "aesthetic": {"weight": 0.0125},
            "pickscore": {"weight": 0.1, "logit_scale": False},
            "imagereward": {"weight": 1.0},
            "hpsv2": {"weight": 0.1, "checkpoint": "xswu/HPSv2/HPS_v2_compressed.pt"},
        },
    }


PROFILES = {
    "default": (_default, "the published checkpoints of ImageReward, PickScore, HPSv2.1, CLIP score and the LAION aesthetic head"),
    "light": (_light, "the published ImageReward and LAION aesthetic head only: two backbones, for CPU hosts and small GPUs"),
    "tiny": (_tiny, "tiny random-weight models in the real formats, built on first use (tests, demos, offline)"),
    "random-full": (_random_full, "full-size architectures with random weights (benchmarks)"),
    "ig-rewarding": (_ig_rewarding, "ig-rewarding's baseline: aesthetic, PickScore, ImageReward, HPSv2 as its raw weighted sum of means"),
}


def list_profiles() -> dict[str, str]:
    """Built-in profile names and what each one is."""
    return {name: doc for name, (_, doc) in PROFILES.items()}


def load_config(path: str | os.PathLike | None = None, profile: str | None = None, **overrides: Any) -> RewardConfig:
    """Build the config: a profile (from the argument, else the YAML's `profile:` key, else
    `T2I_REWARD_PROFILE`, else `default`), then the YAML file, then keyword overrides, then the environment."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InvalidRequestError(f"cannot read config file {path}: {e}") from None
        if not isinstance(data, dict):
            raise InvalidRequestError(f"config file {path} must hold a mapping at the top level")
    name = profile or data.get("profile") or os.environ.get("T2I_REWARD_PROFILE") or "default"
    if name not in PROFILES:
        raise InvalidRequestError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    base = PROFILES[name][0]()
    merged = _layer(base, data, base["experts"])
    env_experts = _env_experts()
    if env_experts is not None:  # a whole T2I_REWARD_EXPERTS lists the experts, like a file
        merged = _layer(merged, {"experts": env_experts}, base["experts"])
    merged = _deep_merge(merged, overrides)
    merged["profile"] = name
    try:
        return RewardConfig(**merged)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise InvalidRequestError(f"invalid configuration: {problems}") from None


def _layer(below: dict[str, Any], top: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`top` over `below`; when `top` lists experts, exactly those, each over the profile's defaults for it."""
    out = _deep_merge(below, {k: v for k, v in top.items() if k != "experts"})
    if "experts" in top:
        experts = top["experts"]
        if not isinstance(experts, dict):
            raise InvalidRequestError("experts must be a mapping from expert name to its config (or null)")
        out["experts"] = {
            n: None if cfg is None else _deep_merge(defaults.get(n) or {}, cfg) if isinstance(cfg, dict) else cfg
            for n, cfg in experts.items()
        }
    return out


def _env_experts() -> dict[str, Any] | None:
    for key, value in os.environ.items():
        if key.upper() == "T2I_REWARD_EXPERTS":
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"T2I_REWARD_EXPERTS must be a JSON object: {e}") from None
    return None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out

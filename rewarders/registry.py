"""The expert registry: what an expert is, and the table of experts by name.

    @register_expert
    class MyExpert(Expert):
        name = "mine"
        Config = MyConfig          # a pydantic model (subclass of ExpertConfig), every field documented
        ...

An expert maps preprocessed pixels (and, for CLIP-based experts, the shared CLIP embeddings) plus one
prompt per image to one raw float32 score per image. The mixture owns preprocessing, batching, the
shared CLIP passes and the weighted total; the factory (`factory.py`) loads experts from their configs.

Where experts come from, by name:
- the built-in ones (`BUILTIN` below, imported on first look-up);
- any installed package that declares an entry point in the group `t2i_reward.experts`
  (`name = "package.module:ExpertClass"`), loaded on first look-up;
- any class decorated with `@register_expert` in code that has run.

This module is a leaf: it imports no other module of the package but `errors`, so every expert
module can import it without a cycle.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .errors import InvalidRequestError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "t2i_reward.experts"

# the built-in experts, as "module:class" like entry points, so this module imports none of them
BUILTIN = {
    "imagereward": "t2i_reward.rewarders.experts.imagereward:ImageRewardExpert",
    "aesthetic": "t2i_reward.rewarders.experts.aesthetic:AestheticExpert",
    "mlp": "t2i_reward.rewarders.experts.mlp:MLPExpert",
    "blip_score": "t2i_reward.rewarders.experts.blip_score:BlipScoreExpert",
    "diversity": "t2i_reward.rewarders.experts.diversity:DiversityExpert",
    "pickscore": "t2i_reward.rewarders.experts.pickscore:PickScoreExpert",
    "hpsv2": "t2i_reward.rewarders.experts.hpsv2:HPSv2Expert",
    "clip_score": "t2i_reward.rewarders.experts.clip_score:ClipScoreExpert",
    "vlm_judge": "t2i_reward.rewarders.experts.vlm_judge:VLMJudge",
    "ocr": "t2i_reward.rewarders.experts.ocr:OCRExpert",
    "geneval": "t2i_reward.rewarders.experts.geneval:GenEvalExpert",
    "hpsv3": "t2i_reward.rewarders.experts.hpsv3:HPSv3Expert",
    "unified_reward": "t2i_reward.rewarders.experts.unified_reward:UnifiedRewardExpert",
    "pairwise_judge": "t2i_reward.rewarders.experts.pairwise_judge:PairwiseJudge",
    "vqascore": "t2i_reward.rewarders.experts.vqascore:VQAScoreExpert",
}


class ExpertConfig(BaseModel):
    """What every expert has: its weight in the total and the statistics that normalise it. Each expert
    subclasses this with its own fields (checkpoints, tokenizers, CLIP specs)."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, description="Weight of this expert's normalised score in the total.")
    mean: Optional[float] = Field(None, description="Mean subtracted before weighting (None: the expert's default).")
    std: Optional[float] = Field(None, gt=0, description="Std divided by before weighting (None: the expert's default).")
    required: bool = Field(True, description="True: a pair this expert fails to score has no total (null), and an error "
                           "the expert raises fails the request, as always. False: its component is null for the pairs "
                           "it failed, the answer's `errors` say why, and the total is taken over the experts that "
                           "answered, their weights scaled up to the same sum of |weight|.")


@dataclass
class ExpertOutput:
    """What `forward` returns when a plain (B,) tensor is not enough.

    `scores` (B,) is the expert's component (the number that enters the total). `extras` are further
    per-pair outputs by name, reported beside the components as "<expert>.<name>" and never part of the
    total (geneval's strict correctness, hpsv3's spread). `errors` maps a pair's index in the batch to why
    the expert could not score it (its score is NaN there): see the mixture for what a failed pair does
    to the total.
    """

    scores: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


class Expert(nn.Module):
    """Base class of every expert.

    Class attributes an expert sets: `name`, `Config` (its pydantic config model), `default_mean` /
    `default_std` (its normalisation unless the config sets one), and `build_tiny` (writes the expert's
    tiny random-weight checkpoint into a folder, in the real format; None when it has none).
    Instances pass `preprocess`, `checkpoint`, `random_weights` and `clip_spec` to this `__init__`.
    """

    name: ClassVar[str]
    Config: ClassVar[type[ExpertConfig]] = ExpertConfig
    default_mean: ClassVar[float] = 0.0
    default_std: ClassVar[float] = 1.0
    build_tiny: ClassVar[Optional[Callable[[Path], None]]] = None
    needs_text_embeds: ClassVar[bool] = False  # True: forward gets the shared CLIP's text embeddings
    # per-pair metadata (a JSON object per (prompt, image) pair; see `check_pair`):
    uses_metadata: ClassVar[bool] = False  # True: forward gets `metadata=[one dict per image]` ({} where none came)
    metadata_fields: ClassVar[tuple[str, ...]] = ()  # fields every pair must carry for this expert (422 otherwise)
    extras: ClassVar[tuple[str, ...]] = ()  # names of the ExpertOutput.extras this expert returns, if any
    # batch-level experts (`batch_level = True`) that score groups of a request rather than the whole request
    # (a pairwise judge): forward gets `group_ids=[one per image]` of its request (None when it came without),
    # and `check_group` sees every group's prompts before any model runs
    uses_group_ids: ClassVar[bool] = False
    # the Ray Serve pool this expert joins by default (rewarders/pools.py): experts naming the same pool share its
    # replicas and so their backbone pass ("clip": the shared-CLIP family); None: a pool of its own
    pool: ClassVar[Optional[str]] = None
    # the batch-invariant mode (rewarders/invariance.py): `batch_invariant` is set on each expert by the mixture
    # (True: keep every internal pass at a fixed shape); `per_pair = True`: in that mode forward scores each
    # pair on its own, so the mixture gives it the real pairs only, without the padding
    per_pair: ClassVar[bool] = False
    batch_invariant: bool = False

    def __init__(self, preprocess: Any = None, checkpoint: str = "", random_weights: bool = False,
                 clip_spec: str | None = None):
        """`preprocess`: an `images.Preprocess` (input size, normalisation); `checkpoint`: the spec it was
        loaded from; `clip_spec`: the shared CLIP backbone whose embeddings `forward` reads, if any."""
        super().__init__()
        self.preprocess = preprocess
        self.checkpoint = checkpoint
        self.random_weights = random_weights
        self.clip_spec = clip_spec

    @classmethod
    def from_config(cls, cfg: ExpertConfig, ctx: Any) -> "Expert":
        """Load the expert; `ctx` is the factory's `LoadContext` (device, dtype, cache, shared CLIPs)."""
        raise NotImplementedError

    def check_pair(self, prompt: str, metadata: Mapping[str, Any]) -> None:
        """Refuse a pair this expert cannot score, before any model runs: raise `InvalidRequestError` naming
        the expert and what is missing or wrong. The mixture has already checked `metadata_fields`."""

    def check_group(self, prompts: Sequence[str]) -> None:
        """For experts with `uses_group_ids`: refuse a group (its pairs' prompts) this expert cannot score, before
        any model runs, with an `InvalidRequestError` naming the expert. A request without group ids is one group."""

    def forward(
        self,
        pixels: torch.Tensor,
        prompts: list[str],
        image_embeds: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        **kwargs,  # metadata=[dict per image] for experts with uses_metadata
    ) -> torch.Tensor | ExpertOutput:
        raise NotImplementedError

    def summarize(self, scores: torch.Tensor, extras: Mapping[str, torch.Tensor],
                  metadata: Sequence[Mapping[str, Any]]) -> Optional[dict]:
        """A request-level summary of this expert's scores for the answer (geneval: per-tag means), or None."""
        return None

    def describe(self) -> dict:
        p = next(self.parameters(), None)
        return {
            "checkpoint": self.checkpoint,
            "random_weights": self.random_weights,
            "clip": self.clip_spec,
            "device": str(p.device) if p is not None else "cpu",
            "dtype": str(p.dtype).removeprefix("torch.") if p is not None else "float32",
        }


EXPERTS: dict[str, type[Expert]] = {}
_BROKEN: dict[str, str] = {}  # entry points that failed to load: name -> why
_discovered = False


def register_expert(cls: type[Expert]) -> type[Expert]:
    """Class decorator: make `cls` available by `cls.name` in configs and `list_experts()`."""
    if not (isinstance(cls, type) and issubclass(cls, Expert)):
        raise TypeError(f"{cls!r} is not an Expert subclass")
    if not (isinstance(getattr(cls, "Config", None), type) and issubclass(cls.Config, ExpertConfig)):
        raise TypeError(f"expert {cls.__name__}: Config must be a subclass of ExpertConfig")
    EXPERTS[cls.name] = cls
    return cls


def _load(target: str) -> None:
    """Import "module:Class" (or "module", whose import registers its experts) and register the class."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    if attr:
        obj = getattr(obj, attr)
        if obj not in EXPERTS.values():
            register_expert(obj)


def discover() -> None:
    """Import the built-in experts and every `t2i_reward.experts` entry point, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for target in BUILTIN.values():
        _load(target)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _load(ep.value)
        except Exception as e:  # a broken plugin must not take the other experts down
            _BROKEN[ep.name] = f"{type(e).__name__}: {e}"
            log.error("expert entry point %s = %s failed to load: %s", ep.name, ep.value, _BROKEN[ep.name])


def list_experts() -> list[str]:
    """Names of the registered experts: the built-in ones first, then plugins and later registrations."""
    discover()
    return list(BUILTIN) + [n for n in EXPERTS if n not in BUILTIN]


def get_expert_class(name: str) -> type[Expert]:
    discover()
    if name not in EXPERTS:
        if name in _BROKEN:
            raise InvalidRequestError(f"expert {name!r}: its entry point failed to load ({_BROKEN[name]})")
        raise InvalidRequestError(f"unknown expert {name!r}; known: {', '.join(list_experts())}")
    return EXPERTS[name]

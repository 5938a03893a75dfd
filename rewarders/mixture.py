"""The mixture of reward experts: one object that scores (prompt, images).

    from rewarders import create_rewarder
    rewarder = create_rewarder(profile="tiny")          # or create_rewarder(config)
    result = rewarder.score("a red apple", ["a.png", "b.png"])
    result.mean_reward, result.component_rewards, result.images[0].total

How the total is computed, per image i:
    total_i = sum_e  w_e * (s_e,i - mean_e) / std_e          (normalize: true, the default)
    total_i = sum_e  w_e * s_e,i                               (normalize: false, e.g. profile ig-rewarding)
    mean_reward = mean_i total_i   (= sum_e w_e * normalised mean of expert e: the sum is linear)
`components` and `component_rewards` are the raw expert scores (and their means over the images).

Images are preprocessed once per distinct input spec, every CLIP backbone runs once per image and is
shared by the experts that read it, and all images of a call go through each backbone in batches of
at most `max_batch_size`. `forward` (alias `score_tensor`) is the differentiable path for ReFL.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .config import RewardConfig, load_config
from .errors import InvalidPromptError, InvalidRequestError
from .images import ImageLike, Preprocess, open_image
from .registry import Expert, LoadContext, get_expert_class

log = logging.getLogger(__name__)


@dataclass
class ImageScore:
    total: float
    components: dict[str, float]


@dataclass
class RewardResult:
    mean_reward: float
    component_rewards: dict[str, float]
    images: list[ImageScore]
    experts: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TensorScores:
    """Differentiable scores: `total` (B,) and each expert's raw score (B,)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Mixture(nn.Module):
    def __init__(self, config: RewardConfig):
        super().__init__()
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        ctx = LoadContext(self.device, self.dtype, config.cache_dir, config.seed)
        experts: dict[str, Expert] = {}
        for name in type(config.experts).model_fields:
            cfg = getattr(config.experts, name)
            if cfg is not None:
                experts[name] = get_expert_class(name).from_config(cfg, ctx)
        if not experts:
            raise InvalidRequestError("the configuration enables no expert")
        self.experts = nn.ModuleDict(experts)
        self.clips = nn.ModuleDict({f"clip{i}": c for i, c in enumerate(ctx.clips.values())})
        self._clip_by_spec = {c.spec: c for c in ctx.clips.values()}
        self.weights = {n: getattr(config.experts, n).weight for n in experts}
        self.norm = {}
        for n, e in experts.items():
            cfg = getattr(config.experts, n)
            mean = cfg.mean if cfg.mean is not None else e.default_mean
            std = cfg.std if cfg.std is not None else e.default_std
            self.norm[n] = (mean, std) if config.normalize else (0.0, 1.0)
        # called as on_timing(name, seconds) after each backbone/expert pass; the service's metrics hook in here
        self.on_timing: Callable[[str, float], None] | None = None
        if self.random_weights:
            log.warning("profile %s: at least one expert has RANDOM weights; scores are for testing only", config.profile)

    # ------------------------------------------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        return any(e.random_weights for e in self.experts.values())

    def sources(self) -> dict[str, dict]:
        """Per expert: the checkpoint it was loaded from and whether its weights are random (the `experts`
        part of every result)."""
        return {n: {"checkpoint": e.checkpoint, "random_weights": e.random_weights} for n, e in self.experts.items()}

    def describe(self) -> dict[str, dict]:
        """Per expert: checkpoint, random_weights, CLIP, device, dtype, weight and normalisation."""
        out = {}
        for n, e in self.experts.items():
            mean, std = self.norm[n]
            out[n] = {**e.describe(), "weight": self.weights[n], "mean": mean, "std": std}
        return out

    def _weights(self, override: Mapping[str, float] | None) -> dict[str, float]:
        weights = dict(self.weights)
        for name, w in (override or {}).items():
            if name not in weights:
                raise InvalidRequestError(f"unknown expert {name!r} in weights; configured: {', '.join(weights)}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise InvalidRequestError(f"weight for {name!r} must be a finite number, got {w!r}")
            weights[name] = float(w)
        return weights

    def _check_prompt(self, prompt, max_chars: int | None = None) -> str:
        max_chars = max_chars or self.config.max_prompt_chars
        if not isinstance(prompt, str):
            raise InvalidPromptError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidPromptError("prompt is empty")
        if len(prompt) > max_chars:
            raise InvalidPromptError(f"prompt has {len(prompt)} characters; the limit is {max_chars}")
        return prompt

    def _timed(self, name: str, fn, *args):
        if self.on_timing is None:
            return fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.on_timing(name, time.perf_counter() - t)
        return out

    def _raw_scores(self, pixels_for: Callable[[Preprocess], torch.Tensor], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each expert's raw score for one batch; `pixels_for(spec)` gives the batch preprocessed for `spec`."""
        pixels: dict[Preprocess, torch.Tensor] = {}

        def get(spec: Preprocess) -> torch.Tensor:
            if spec not in pixels:
                pixels[spec] = pixels_for(spec).to(self.device)
            return pixels[spec]

        image_embeds: dict[str, torch.Tensor] = {}
        text_embeds: dict[str, torch.Tensor] = {}
        for e in self.experts.values():
            if e.clip_spec is None or e.clip_spec in image_embeds:
                continue
            clip = self._clip_by_spec[e.clip_spec]
            image_embeds[e.clip_spec] = self._timed(f"clip:{e.clip_spec}", clip.encode_images, get(clip.preprocess))
        for e in self.experts.values():
            if e.needs_text_embeds and e.clip_spec not in text_embeds:
                unique = list(dict.fromkeys(prompts))  # one text pass per distinct prompt
                emb = self._clip_by_spec[e.clip_spec].encode_texts(unique)
                index = torch.tensor([unique.index(p) for p in prompts], device=emb.device)
                text_embeds[e.clip_spec] = emb[index]
        out = {}
        for name, e in self.experts.items():
            out[name] = self._timed(
                name, e, get(e.preprocess), prompts, image_embeds.get(e.clip_spec), text_embeds.get(e.clip_spec)
            ).float()
        return out

    def combine(self, raw: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
        """The total per image from raw expert scores: sum of weight * (score - mean) / std."""
        total = None
        for name, s in raw.items():
            mean, std = self.norm[name]
            term = weights[name] * (s - mean) / std
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------------------------------
    # the differentiable path

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
                *, max_prompt_chars: int | None = None) -> TensorScores:
        """Score a float image tensor (B, 3, H, W) with values in [0, 1], any size, keeping gradients.

        `prompts` is one prompt for all images or one per image. Preprocessing runs in torch, so
        `scores.total.sum().backward()` reaches the pixels. `max_prompt_chars` defaults to the config's.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise InvalidRequestError("images must be a float tensor of shape (B, 3, H, W) with values in [0, 1]")
        if images.shape[0] == 0:
            raise InvalidRequestError("no images to score")
        prompt_list = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != images.shape[0]:
            raise InvalidRequestError(f"{len(prompt_list)} prompts for {images.shape[0]} images")
        prompt_list = [self._check_prompt(p, max_prompt_chars) for p in prompt_list]
        w = self._weights(weights)
        images = images.to(self.device, torch.float32)
        raw = self._raw_scores(lambda spec: spec.tensor(images), prompt_list)
        return TensorScores(self.combine(raw, w), raw)

    score_tensor = forward

    # ------------------------------------------------------------------------------------------
    # scoring images

    def score(self, prompt: str, images: Sequence[ImageLike], weights: Mapping[str, float] | None = None) -> RewardResult:
        """Score images (PIL images, paths or encoded bytes) against one prompt."""
        return self.score_many([(prompt, images, weights)])[0]

    def score_many(self, requests: Iterable[tuple]) -> list[RewardResult]:
        """Score several (prompt, images[, weights]) requests in shared batches.

        The images of all requests are pooled, so many small requests fill a batch; each request
        still gets its own result. Every request is validated before any model runs.
        """
        return self.score_checked([self.check_request(*req) for req in requests])

    def score_checked(self, checked: Sequence[tuple[str, list, dict[str, float]]]) -> list[RewardResult]:
        """Score requests already returned by `check_request` (prompt, decoded images, weights)."""
        flat_images = [im for _, ims, _ in checked for im in ims]
        flat_prompts = [p for p, ims, _ in checked for _ in ims]
        raw = self.raw_scores(flat_images, flat_prompts)
        results, start = [], 0
        sources = self.sources()
        for _, ims, weights in checked:
            part = {n: s[start : start + len(ims)] for n, s in raw.items()}
            start += len(ims)
            total = self.combine(part, weights)
            results.append(
                RewardResult(
                    mean_reward=float(total.mean()),
                    component_rewards={n: float(s.mean()) for n, s in part.items()},
                    images=[
                        ImageScore(float(total[i]), {n: float(s[i]) for n, s in part.items()}) for i in range(len(ims))
                    ],
                    experts=sources,
                )
            )
        return results

    def check_request(
        self,
        prompt,
        images,
        weights: Mapping[str, float] | None = None,
        *,
        max_prompt_chars: int | None = None,
        max_images: int | None = None,
        max_image_pixels: int | None = None,
    ) -> tuple[str, list, dict[str, float]]:
        """Validate one request and decode its images: (prompt, PIL images, effective weights).

        Raises a `RewardError` subclass for bad input. The limits default to the config's; a caller
        with its own (the service) passes them. The service calls this off the event loop before
        queueing, so a bad request never reaches a batch.
        """
        return (
            self._check_prompt(prompt, max_prompt_chars),
            self._load_images(images, max_images or self.config.max_images, max_image_pixels or self.config.max_image_pixels),
            self._weights(weights),
        )

    def raw_scores(self, images: Sequence, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Raw per-expert scores (CPU float32) for decoded PIL images, one prompt per image, in batches."""
        out: dict[str, list[torch.Tensor]] = {n: [] for n in self.experts}
        bs = self.config.max_batch_size
        with torch.inference_mode():
            for i in range(0, len(images), bs):
                batch = images[i : i + bs]
                raw = self._raw_scores(lambda spec: spec.pil(batch), list(prompts[i : i + bs]))
                for n, s in raw.items():
                    out[n].append(s.cpu())
        return {n: torch.cat(v) for n, v in out.items()}

    def _load_images(self, images, max_images: int, max_pixels: int) -> list:
        if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
            raise InvalidRequestError("images must be a list of images (PIL images, paths or bytes)")
        if len(images) == 0:
            raise InvalidRequestError("no images to score")
        if len(images) > max_images:
            raise InvalidRequestError(f"{len(images)} images; the limit is {max_images} per call")
        return [open_image(im, max_pixels) for im in images]


def create_rewarder(config: RewardConfig | str | None = None, *, profile: str | None = None, **overrides) -> Mixture:
    """The one entry point: a `RewardConfig`, a YAML path, or a profile name (`list_profiles()`)."""
    if not isinstance(config, RewardConfig):
        config = load_config(config, profile=profile, **overrides)
    return Mixture(config)

"""The mixture of reward experts: one object that scores (prompt, images). It only scores: the factory
(`factory.create_rewarder`) loads the experts and hands them over.

    from t2i_reward.rewarders import create_rewarder
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
at most `max_batch_size`. Batch-level experts (`batch_level = True`, e.g. diversity) score each image
against the other images of its own request: they run once per request on the pooled CLIP embeddings,
after every batch, so requests sharing a micro-batch never mix. `forward` (alias `score_tensor`) is the
differentiable path for ReFL (the tensor is one request), and
`reward_and_gradient` the whole computation behind the service's `/reward/gradient`.

Limits (`Limits`, declared in limits.py: images per call, pixels per image, prompt length) are checked here, once, before any
model runs; a caller with its own limits (the service) passes them. Every scoring call takes an
optional `on_timing(name, seconds)` callback, called after each backbone and expert pass (the
service's metrics come in that way).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from .advantages import group_advantages
from .config import RewardConfig
from .errors import InvalidImageError, InvalidPromptError, InvalidRequestError, public_message
from .images import ImageLike, Preprocess, check_size, decode_budget, open_image
from .inputs import Checked, PilPixels, Pixels, check_image_tensor, prepare_pil, prepare_tensor
from .invariance import pad_list, pad_rows
from .limits import Limits
from .metadata import check_metadata
from .registry import Expert, ExpertOutput

# Largest |weight| a call may give an expert: weights beyond make totals overflow float32 (and JSON).
MAX_WEIGHT = 1e6
_SURROGATE = re.compile("[\ud800-\udfff]")

log = logging.getLogger(__name__)

Timing = Callable[[str, float], None]


@dataclass
class ImageScore:
    total: Optional[float]  # None: a required expert failed on this pair, or no expert answered
    components: dict[str, Optional[float]]  # None: the expert failed on this pair (see `errors`)
    percentiles: Optional[dict[str, Optional[float]]] = None  # with `explain`: per expert, in [0, 100]
    extras: Optional[dict[str, Optional[float]]] = None  # experts' further outputs, "<expert>.<name>" (not in the total)
    errors: Optional[dict[str, str]] = None  # per expert that failed on this pair: why


@dataclass
class RewardResult:
    mean_reward: float
    component_rewards: dict[str, float]
    images: list[ImageScore]
    experts: dict[str, dict] = field(default_factory=dict)
    # with `group_ids`: {"total": [per image], <expert>: [per image]}, z-scored in each group (advantages.py)
    advantages: Optional[dict[str, list[Optional[float]]]] = None
    summaries: Optional[dict[str, dict]] = None  # per expert with a request-level summary (geneval: per-tag means)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scores:
    """Every expert's scores for a run of pairs: `scores` (per expert, (B,) float32, NaN where it failed),
    `extras` ("<expert>.<name>" -> (B,)) and `errors` (per expert, pair index -> why)."""

    scores: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, dict[int, str]] = field(default_factory=dict)
    # per request of the run (the `groups` it was scored in), each expert's request-level summary (`Expert.summarize`)
    summaries: list[dict[str, dict]] = field(default_factory=list)

    def part(self, a: int, b: int) -> "Scores":
        return Scores({n: s[a:b] for n, s in self.scores.items()}, {n: s[a:b] for n, s in self.extras.items()},
                      {n: {i - a: m for i, m in e.items() if a <= i < b} for n, e in self.errors.items()})

    @staticmethod
    def merge(parts: Sequence["Scores"], order: Sequence[str]) -> "Scores":
        """The scores of disjoint sets of experts on the same run of pairs (each pool's, service/pooled.py) as
        one, the experts in `order`; each request's summaries joined."""
        out = Scores({})
        for p in parts:
            out.scores.update(p.scores)
            out.extras.update(p.extras)
            out.errors.update(p.errors)
        out.scores = {n: out.scores[n] for n in order}
        n = max((len(p.summaries) for p in parts), default=0)
        out.summaries = [{k: v for p in parts if i < len(p.summaries) for k, v in p.summaries[i].items()} for i in range(n)]
        return out


def _nan_to_none(x: float) -> Optional[float]:
    return None if math.isnan(x) else x


@dataclass
class TensorScores:
    """Differentiable scores: `total` (B,) and each expert's raw score (B,)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]


class Mixture(nn.Module):
    differentiable = True  # False: a mixture whose experts run elsewhere (the Ray ingress's, service/pooled.py)

    def __init__(self, config: RewardConfig, experts: Mapping[str, Expert], clips: Sequence[nn.Module],
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        if not experts:
            raise InvalidRequestError("the configuration enables no expert")
        self.config = config
        self.device = device
        self.dtype = dtype
        self.limits = Limits.of(config)
        self.experts = nn.ModuleDict(dict(experts))
        self.batch_invariant = config.batch_invariant
        for e in experts.values():  # each keeps its own internal passes at fixed shapes too (invariance.py)
            e.batch_invariant = config.batch_invariant
        self.clips = nn.ModuleDict({f"clip{i}": c for i, c in enumerate(clips)})
        self._clip_by_spec = {c.spec: c for c in clips}
        self.weights = {n: config.experts[n].weight for n in experts}
        self.required = {n: config.experts[n].required for n in experts}
        self.norm = {n: self._norm(n, e) for n, e in experts.items()}
        # per-expert score quantiles (rewarders/calibration.py), set by the factory when the config names a
        # calibration file: answers can then place each score as a percentile (`explain`)
        self.calibration = None
        if self.random_weights:
            log.warning("profile %s: at least one expert has RANDOM weights; scores are for testing only", config.profile)

    def _norm(self, name: str, e: Expert) -> tuple[float, float]:
        """An expert's (mean, std): the config's, else the expert's defaults; (0, 1) without `normalize`."""
        cfg = self.config.experts[name]
        mean = cfg.mean if cfg.mean is not None else e.default_mean
        std = cfg.std if cfg.std is not None else e.default_std
        return (mean, std) if self.config.normalize else (0.0, 1.0)

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

    def weights_for(self, override: Mapping[str, float] | None = None) -> dict[str, float]:
        """The weights a call with these per-call overrides uses (InvalidRequestError for bad ones)."""
        weights = dict(self.weights)
        for name, w in (override or {}).items():
            if name not in weights:
                raise InvalidRequestError(f"unknown expert {name!r} in weights; configured: {', '.join(weights)}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or abs(w) > MAX_WEIGHT:
                raise InvalidRequestError(f"weight for {name!r} must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {w!r}")
            weights[name] = float(w)
        return weights

    def _check_prompt(self, prompt, limits: Limits) -> str:
        if not isinstance(prompt, str):
            raise InvalidPromptError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidPromptError("prompt is empty")
        if len(prompt) > limits.max_prompt_chars:
            raise InvalidPromptError(f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}")
        if _SURROGATE.search(prompt):  # a lone UTF-16 surrogate from JSON "\ud800": not text, cannot be encoded
            raise InvalidPromptError("prompt holds a lone UTF-16 surrogate: not valid Unicode text")
        if "\x00" in prompt:
            raise InvalidPromptError("prompt holds a NUL character")
        return prompt

    def _prompts_for(self, prompts, n: int, limits: Limits) -> list[str]:
        """One checked prompt per image, from one prompt for all or a list with one per image."""
        prompt_list = [prompts] * n if isinstance(prompts, str) else prompts
        if not isinstance(prompt_list, (list, tuple)):
            raise InvalidPromptError(f"prompt must be a string, or a list with one string per image; got {type(prompts).__name__}")
        if len(prompt_list) != n:
            raise InvalidRequestError(f"{len(prompt_list)} prompts for {n} images")
        return [self._check_prompt(p, limits) for p in prompt_list]

    def _timed(self, on_timing: Timing | None, name: str, fn, *args, **kwargs):
        if on_timing is None:
            return fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        on_timing(name, time.perf_counter() - t)
        return out

    def _passes(self, pixels_for: Callable[[Preprocess, int, int], torch.Tensor], prompts: list[str],
                metadata: Sequence[dict] | None, on_timing: Timing | None,
                size: int | None) -> tuple[list[Scores], list[int], dict[str, torch.Tensor]]:
        """The per-image experts over consecutive passes of `size` pairs (None: one pass), `pixels_for(spec, a, b)`
        giving pairs a..b prepared for `spec`: each pass's Scores, its number of pairs, and the CLIP image
        embeddings of all pairs by spec (on the device). In the batch-invariant mode every pass has exactly
        `max_batch_size` pairs, the last one padded with copies of its last pair, whose scores are dropped."""
        n = len(prompts)
        if self.batch_invariant:
            size = self.config.max_batch_size
        size = size or n
        parts, sizes, embeds = [], [], {}
        for a in range(0, n, size):
            b = min(a + size, n)
            get = lambda spec, a=a, b=b: pixels_for(spec, a, b)  # noqa: E731
            p, m = prompts[a:b], (metadata[a:b] if metadata is not None else None)
            if self.batch_invariant and b - a < size:
                get = lambda spec, g=get: pad_rows(g(spec), size)  # noqa: E731
                p, m = pad_list(p, size), (pad_list(m, size) if m is not None else None)
            raw, emb = self._raw_scores(get, p, m, on_timing, real=b - a)
            parts.append(raw.part(0, b - a) if b - a < len(p) else raw)
            sizes.append(b - a)
            for spec, e in emb.items():
                embeds.setdefault(spec, []).append(e[: b - a])
        return parts, sizes, {spec: torch.cat(v) for spec, v in embeds.items()}

    def _raw_scores(self, pixels_for: Callable[[Preprocess], torch.Tensor], prompts: list[str],
                    metadata: Sequence[dict] | None, on_timing: Timing | None,
                    real: int | None = None) -> tuple[Scores, dict[str, torch.Tensor]]:
        """Each per-image expert's raw score for one batch, and the CLIP image embeddings by spec (which
        the batch-level experts read once all batches have run); `pixels_for(spec)` gives the batch
        preprocessed for `spec`; `metadata` one object per pair (None: none came). `real`: the pairs before
        the batch-invariant mode's padding (the `per_pair` experts score only those)."""
        pixels: dict[Preprocess, torch.Tensor] = {}

        def get(spec: Preprocess) -> torch.Tensor:
            if spec not in pixels:
                pixels[spec] = pixels_for(spec)
            return pixels[spec]

        image_embeds: dict[str, torch.Tensor] = {}
        text_embeds: dict[str, torch.Tensor] = {}
        for e in self.experts.values():
            if e.clip_spec is None or e.clip_spec in image_embeds:
                continue
            clip = self._clip_by_spec[e.clip_spec]
            image_embeds[e.clip_spec] = self._timed(on_timing, f"clip:{e.clip_spec}", clip.encode_images, get(clip.preprocess))
        for e in self.experts.values():
            if e.needs_text_embeds and e.clip_spec not in text_embeds:
                # one text pass per distinct prompt; in the batch-invariant mode one per pair, a fixed shape
                unique = list(prompts) if self.batch_invariant else list(dict.fromkeys(prompts))
                emb = self._timed(on_timing, f"clip-text:{e.clip_spec}", self._clip_by_spec[e.clip_spec].encode_texts, unique)
                if not self.batch_invariant:
                    emb = emb[torch.tensor([unique.index(p) for p in prompts], device=emb.device)]
                text_embeds[e.clip_spec] = emb
        out = Scores({})
        for name, e in self.experts.items():
            if name in self._batch_level:
                continue
            n = real if self.batch_invariant and e.per_pair and real is not None else len(prompts)
            kwargs = {"metadata": list(metadata[:n]) if metadata is not None else [{}] * n} if e.uses_metadata else {}
            emb, txt = image_embeds.get(e.clip_spec), text_embeds.get(e.clip_spec)
            self._collect(out, name, n, lambda: self._timed(
                on_timing, name, e, get(e.preprocess)[:n], prompts[:n], emb[:n] if emb is not None else None,
                txt[:n] if txt is not None else None, **kwargs))
        return out, image_embeds

    def _collect(self, out: Scores, name: str, n: int, run: Callable[[], torch.Tensor | ExpertOutput]) -> None:
        """Run one expert on n pairs into `out`. An expert that is not `required` and raises is recorded as
        failed on every pair of the batch (a judge that timed out), instead of failing the batch; bad input
        (an invalid request, prompt or image) is always the caller's error."""
        try:
            res = run()
        except (InvalidRequestError, InvalidPromptError, InvalidImageError):
            raise
        except Exception as e:
            if self.required[name]:
                raise
            log.warning("expert %s failed on %d pairs: %s: %s", name, n, type(e).__name__, e)
            res = ExpertOutput(torch.full((n,), math.nan), errors=dict.fromkeys(range(n), f"{type(e).__name__}: {e}"[:500]))
        if not isinstance(res, ExpertOutput):
            res = ExpertOutput(res)
        scores = res.scores.float()
        if res.errors:
            res.errors = {i: public_message(m) for i, m in res.errors.items()}  # answers name no server path or URL
            scores = scores.clone()
            scores[list(res.errors)] = math.nan
            out.errors.setdefault(name, {}).update(res.errors)
        out.scores[name] = scores
        for k, v in res.extras.items():
            out.extras[f"{name}.{k}"] = v.float()

    @property
    def _batch_level(self) -> dict[str, Expert]:
        """Experts whose score depends on the other images of the request (`batch_level = True`: diversity)."""
        return {n: e for n, e in self.experts.items() if getattr(e, "batch_level", False)}

    @property
    def input_specs(self) -> list[Preprocess]:
        """The distinct inputs the backbones read (one per preprocessing spec), each prepared once per image."""
        specs = [self._clip_by_spec[e.clip_spec].preprocess for e in self.experts.values() if e.clip_spec is not None]
        # batch-level experts without a CLIP (a pairwise judge) read their own input, per request
        specs += [e.preprocess for n, e in self.experts.items() if n not in self._batch_level or e.clip_spec is None]
        return list(dict.fromkeys(specs))

    def check_group_sizes(self, sizes: Sequence[int]) -> None:
        """Refuse requests with fewer images than a batch-level expert needs (`min_images`), before any model runs."""
        for name, e in self._batch_level.items():
            need = getattr(e, "min_images", 1)
            if sizes and min(sizes) < need:
                raise InvalidRequestError(f"expert {name!r} needs at least {need} images per request, got {min(sizes)}")

    def check_groups(self, prompts: Sequence[str], group_ids: Sequence | None) -> None:
        """Each group of one request (by `group_ids`; without, the request is one group) through the `check_group`
        of every batch-level expert that scores groups (`uses_group_ids`), before any model runs."""
        experts = [e for e in self._batch_level.values() if e.uses_group_ids]
        if not experts:
            return
        for members in _groups(group_ids, len(prompts)).values():
            for e in experts:
                e.check_group([prompts[i] for i in members])

    def _group_scores(self, image_embeds: Mapping[str, torch.Tensor], prompts: Sequence[str], sizes: Sequence[int],
                      metadata: Sequence[dict] | None, on_timing: Timing | None,
                      pixels_for: Callable[[Preprocess, int, int], torch.Tensor] | None = None,
                      group_ids: Sequence[Sequence | None] | None = None) -> Scores:
        """The batch-level experts, called once per request on its images' CLIP embeddings (those with a
        CLIP) and its images prepared for the expert's own input (`pixels_for(spec, a, b)`, those without),
        so requests pooled in one micro-batch never see each other's images. `group_ids`: each request's
        (or None), for the experts that score groups (`uses_group_ids`)."""
        starts = [0, *itertools.accumulate(sizes)]
        parts = []
        for k, (a, b) in enumerate(zip(starts, starts[1:])):
            part = Scores({})
            for name, e in self._batch_level.items():
                embeds = image_embeds[e.clip_spec][a:b] if e.clip_spec is not None else None
                pixels = pixels_for(e.preprocess, a, b) if e.clip_spec is None and pixels_for is not None else None
                kwargs = {"metadata": list(metadata[a:b]) if metadata is not None else [{}] * (b - a)} if e.uses_metadata else {}
                if e.uses_group_ids:
                    kwargs["group_ids"] = group_ids[k] if group_ids is not None else None
                self._collect(part, name, b - a, lambda: self._timed(on_timing, name, e, pixels, list(prompts[a:b]), embeds, **kwargs))
            parts.append(part)
        return _concat(parts, sizes)

    def combine(self, raw: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                required: Mapping[str, bool] | None = None) -> torch.Tensor:
        """The total per image from raw expert scores: sum of weight * (score - mean) / std.

        A NaN score is an expert that failed on that pair: the pair's total is NaN if the expert is
        `required`, else the sum over the experts that answered, scaled by sum |w| / sum of their |w| (the
        weights renormalised to the same total weight). Without NaN this is the plain sum, unchanged.
        `required`: per expert, in place of the config's (the Ray ingress's, for a pool that is down)."""
        required = self.required if required is None else required
        terms = {}
        for name, s in raw.items():
            mean, std = self.norm[name]
            terms[name] = weights[name] * (s - mean) / std
        failed = {n: torch.isnan(s) for n, s in raw.items()}
        if not any(bool(f.any()) for f in failed.values()):
            total = None
            for term in terms.values():
                total = term if total is None else total + term
            return total
        total = sum(torch.where(failed[n], torch.zeros_like(t), t) for n, t in terms.items())
        w_all = sum(abs(weights[n]) for n in terms)
        w_answered = sum(abs(weights[n]) * (~failed[n]).to(total.dtype) for n in terms)
        if w_all > 0:  # (all weights 0: the total is 0 whoever answered)
            total = torch.where(w_answered > 0, total * (w_all / w_answered.clamp_min(1e-30)), torch.full_like(total, math.nan))
        for n, f in failed.items():
            if required[n]:
                total = torch.where(f, torch.full_like(total, math.nan), total)
        return total

    # ------------------------------------------------------------------------------------------
    # the differentiable path

    def forward(self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
                *, metadata: Mapping | Sequence | None = None, limits: Limits | None = None,
                on_timing: Timing | None = None) -> TensorScores:
        """Score a float image tensor (B, 3, H, W) with values in [0, 1], any size, keeping gradients.

        `prompts` is one prompt for all images or one per image. Preprocessing runs in torch, so
        `scores.total.sum().backward()` reaches the pixels. `limits` default to the config's.
        """
        limits = limits or self.limits
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise InvalidRequestError("images must be a float tensor of shape (B, 3, H, W) with values in [0, 1]")
        if images.shape[0] == 0:
            raise InvalidRequestError("no images to score")
        prompt_list = self._prompts_for(prompts, images.shape[0], limits)
        w = self.weights_for(weights)
        meta = self.check_metadata(prompt_list, metadata, limits)
        self.check_groups(prompt_list, None)
        raw = self._tensor_scores(images, prompt_list, [len(prompt_list)], meta, on_timing)  # the tensor is one request
        return TensorScores(self.combine(raw, w), raw)

    score_tensor = forward

    def _tensor_scores(self, images: torch.Tensor, prompts: list[str], sizes: Sequence[int],
                       metadata: Sequence[dict] | None, on_timing: Timing | None) -> dict[str, torch.Tensor]:
        """Raw scores of a float tensor that holds consecutive requests of `sizes` images, differentiably.
        A pair an expert failed on is an error here: a gradient needs every term."""
        self.check_group_sizes(sizes)
        images = images.to(self.device, torch.float32)
        # one pass over the tensor (in the batch-invariant mode: fixed-size passes, on the device, differentiable)
        parts, part_sizes, embeds = self._passes(lambda spec, a, b: spec.tensor(images[a:b]), prompts, metadata, on_timing, None)
        raw = Scores({n: torch.cat([p.scores[n] for p in parts]) for n in parts[0].scores})
        for p, a in zip(parts, itertools.accumulate([0, *part_sizes])):
            for name, errors in p.errors.items():
                raw.errors.setdefault(name, {}).update({a + i: m for i, m in errors.items()})
        grouped = self._group_scores(embeds, prompts, sizes, metadata, on_timing, lambda spec, a, b: spec.tensor(images[a:b]))
        raw.scores.update(grouped.scores)
        for name, errors in {**raw.errors, **grouped.errors}.items():
            i, why = next(iter(errors.items()))
            raise InvalidRequestError(f"expert {name!r} failed on image {i} ({why}); the differentiable path needs every score")
        return {n: raw.scores[n] for n in self.experts}

    def check_tensor(self, images, limits: Limits | None = None) -> None:
        """Refuse an image tensor the gradient path should not run: wrong dtype or shape, empty, too many
        images, too many pixels (ImageTooLargeError), values not finite or outside [0, 1]."""
        limits = limits or self.limits
        if not isinstance(images, torch.Tensor) or images.dtype not in (torch.float16, torch.float32, torch.bfloat16) \
                or images.ndim != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidRequestError(f"'images' must be float16/float32 of shape (B, 3, H, W), got {got}")
        b, h, w = check_image_tensor(images, limits.max_images)
        check_size((w, h), limits.max_image_pixels, limits.max_aspect_ratio, "'images'")
        _check_values(images)

    def reward_and_gradient(self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
                            *, metadata: Mapping | Sequence | None = None, limits: Limits | None = None,
                            on_timing: Timing | None = None) -> dict[str, torch.Tensor]:
        """Rewards and d(sum of totals)/d(images) for a [0, 1] image tensor, after every check.

        Returns CPU tensors: `rewards` (B,), `grad` (B, 3, H, W) and `components.<expert>` (B,).
        """
        return self.reward_and_gradient_many([(images, prompts, weights, metadata)], limits=limits, on_timing=on_timing)[0]

    def reward_and_gradient_many(self, requests: Sequence[tuple], *, limits: Limits | None = None,
                                 on_timing: Timing | None = None) -> list[dict[str, torch.Tensor]]:
        """`reward_and_gradient` for several (images, prompts, weights[, metadata]) requests whose tensors have the same
        (3, H, W), in one forward and one backward pass. Each request keeps its own prompts, weights and
        batch-level groups, so each answer equals that request run alone (within float rounding)."""
        limits = limits or self.limits
        checked, metadata = [], []
        for images, prompts, weights, *meta in requests:
            self.check_tensor(images, limits)
            prompt_list = self._prompts_for(prompts, images.shape[0], limits)
            self.check_groups(prompt_list, None)
            checked.append((images, prompt_list, self.weights_for(weights)))
            m = self.check_metadata(prompt_list, meta[0] if meta else None, limits)
            metadata += m if m is not None else [{}] * len(prompt_list)
        if len({tuple(im.shape[1:]) for im, _, _ in checked}) > 1:
            raise InvalidRequestError("requests pooled into one gradient pass must have tensors of one size")
        sizes = [len(p) for _, p, _ in checked]
        x = torch.cat([im.detach().float() for im, _, _ in checked]).requires_grad_(True)
        raw = self._tensor_scores(x, [p for _, ps, _ in checked for p in ps], sizes, metadata, on_timing)
        starts = [0, *itertools.accumulate(sizes)]
        totals = [self.combine({n: s[a:b] for n, s in raw.items()}, w) for (_, _, w), a, b in zip(checked, starts, starts[1:])]
        torch.cat(totals).sum().backward()  # requests' totals are independent: one backward serves all
        out = []
        for total, a, b in zip(totals, starts, starts[1:]):
            d = {"rewards": total.detach().cpu(), "grad": x.grad[a:b].detach().cpu().contiguous()}
            d.update({f"components.{n}": s[a:b].detach().cpu() for n, s in raw.items()})
            out.append(d)
        return out

    # ------------------------------------------------------------------------------------------
    # scoring images

    def score(self, prompt: str | Sequence[str], images: Sequence[ImageLike], weights: Mapping[str, float] | None = None,
              *, metadata: Mapping | Sequence[Mapping | None] | None = None, on_timing: Timing | None = None) -> RewardResult:
        """Score images (PIL images, paths or encoded bytes) against one prompt (or one prompt per image).

        `metadata`: one JSON object per image (or one for all), for the experts that read it (geneval's
        record, ocr's `text`); see rewarders/metadata.py."""
        return self.score_many([(prompt, images, weights, metadata)], on_timing=on_timing)[0]

    def score_many(self, requests: Iterable[tuple], *, on_timing: Timing | None = None) -> list[RewardResult]:
        """Score several (prompt, images[, weights[, metadata]]) requests in shared batches.

        The images of all requests are pooled, so many small requests fill a batch; each request
        still gets its own result. Every request is validated before any model runs.
        """
        checked = []
        for req in requests:
            prompt, images, *rest = req
            weights = rest[0] if rest else None
            metadata = rest[1] if len(rest) > 1 else None
            checked.append(self.check_request(prompt, images, weights, metadata=metadata))
        return self.score_checked(checked, on_timing=on_timing)

    def score_checked(self, checked: Sequence[Checked], *, on_timing: Timing | None = None) -> list[RewardResult]:
        """Score requests returned by `check_request` / `check_tensor_request`, pooled in shared batches;
        each gets its own result (its own weights, groups, advantages and percentiles)."""
        return self.results(checked, self.score_pairs(checked, on_timing=on_timing))

    def score_pairs(self, checked: Sequence[Checked], *, on_timing: Timing | None = None) -> Scores:
        """The per-pair scoring, without a graph, of requests returned by `check_request` / `check_tensor_request`,
        pooled in shared batches: one pass over the pairs, each expert's raw scores (CPU float32) with NaN, and
        the reason in `errors`, where it failed on a pair (the total of such a pair, `combine`, is NaN when the
        expert is required). What `/reward` answers from (`score_checked`, None for NaN) and a trainer's rewards
        without a graph (finetune/rewards.py: `LocalReward.scores`, NaN as it is)."""
        prompts = [p for c in checked for p in c.prompts]
        metadata = None
        if any(c.metadata is not None for c in checked):
            metadata = [m for c in checked for m in (c.metadata if c.metadata is not None else [{}] * len(c))]
        return self._scores(Pixels(checked, self.device), prompts, [len(c) for c in checked], metadata, on_timing,
                            group_ids=[c.group_ids for c in checked])

    def results(self, checked: Sequence[Checked], raw: Scores, required: Mapping[str, bool] | None = None) -> list[RewardResult]:
        """Each request's answer from the scores of the run that pooled them (`_scores` here, or every pool's
        gathered by the Ray ingress: service/pooled.py), one summary per request in `raw.summaries`;
        `required` as in `combine`."""
        results, start = [], 0
        sources = self.sources()
        for k, c in enumerate(checked):
            got = raw.part(start, start + len(c))
            start += len(c)
            results.append(self._result(c, got, sources, raw.summaries[k] if k < len(raw.summaries) else {}, required))
        return results

    def _summaries(self, got: Scores, groups: Sequence[int], metadata: Sequence[dict] | None) -> list[dict[str, dict]]:
        """Per request of the run (`groups`: their sizes), each expert's request-level summary, where it has one."""
        starts = [0, *itertools.accumulate(groups)]
        out = []
        for a, b in zip(starts, starts[1:]):
            part, summaries = got.part(a, b), {}
            meta = list(metadata[a:b]) if metadata is not None else [{}] * (b - a)
            for name, e in self.experts.items():
                extras = {k.split(".", 1)[1]: v for k, v in part.extras.items() if k.split(".", 1)[0] == name}
                summary = e.summarize(part.scores[name], extras, meta)
                if summary is not None:
                    summaries[name] = summary
            out.append(summaries)
        return out

    def _result(self, c: Checked, got: Scores, sources: dict, summaries: dict[str, dict],
                required: Mapping[str, bool] | None = None) -> RewardResult:
        """One request's answer from its experts' scores: totals, means, percentiles, advantages, and its
        experts' `summaries` (NaN, an expert's failure on a pair, becomes None)."""
        part = got.scores
        total = self.combine(part, c.weights, required)
        pct = self.calibration.percentiles(part) if c.explain else None
        advantages = None
        if c.group_ids is not None:
            advantages = {k: [_nan_to_none(x) for x in v.tolist()] for k, v in group_advantages(total, part, c.group_ids).items()}

        def image(i: int) -> ImageScore:
            components = {n: _nan_to_none(float(s[i])) for n, s in part.items()}
            errors = {n: e[i] for n, e in got.errors.items() if i in e}
            return ImageScore(
                _nan_to_none(float(total[i])), components,
                {n: (v[i] if components[n] is not None else None) for n, v in pct.items()} if pct is not None else None,
                {n: _nan_to_none(float(v[i])) for n, v in got.extras.items()} or None,
                errors or None,
            )

        return RewardResult(
            mean_reward=_nan_mean(total),
            component_rewards={n: _nan_mean(s) for n, s in part.items()},
            images=[image(i) for i in range(len(c))],
            experts=sources,
            advantages=advantages,
            summaries=summaries or None,
        )

    def check_request(self, prompts, images, weights: Mapping[str, float] | None = None, limits: Limits | None = None,
                      *, group_ids: Sequence | None = None, explain: bool = False, prepare: bool = True,
                      metadata: Mapping | Sequence | None = None) -> Checked:
        """Validate one request, decode its images and prepare every backbone's input from them.

        `prompts`: one prompt for all images or a list with one per image. Raises a `RewardError` subclass
        for bad input. `limits` default to the config's; the service passes its own. The service calls
        this in its preprocessing pool, so decoding and resizing never run on the model thread.
        `prepare=False` only validates: the images stay `pending` and the caller fills the pixels in parts
        (`prepare_part`, in parallel), then clears `pending`.
        """
        limits = limits or self.limits
        self._check_image_list(images, limits)
        c = self._checked(prompts, len(images), weights, limits, group_ids, explain, metadata)  # the cheap checks first
        pixels = decode_budget(images, limits)
        if not prepare:
            return self._pending(c, list(images), limits, pixels)
        decoded = [open_image(im, limits.max_image_pixels, limits.max_aspect_ratio) for im in images]
        c.pixels = self._pinned(prepare_pil(decoded, self.input_specs))
        return c

    def check_tensor_request(self, prompts, images: torch.Tensor, weights: Mapping[str, float] | None = None,
                             limits: Limits | None = None, *, group_ids: Sequence | None = None,
                             explain: bool = False, prepare: bool = True,
                             metadata: Mapping | Sequence | None = None) -> Checked:
        """Validate a request whose images are a tensor: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1].

        On a GPU host the tensor stays raw (pinned) and is prepared on the device by the model thread;
        on a CPU host it is prepared here (or, with `prepare=False`, left `pending` as in `check_request`)."""
        limits = limits or self.limits
        b, h, w = check_image_tensor(images, limits.max_images)
        check_size((w, h), limits.max_image_pixels, limits.max_aspect_ratio, "'images'")
        if images.dtype != torch.uint8:
            _check_values(images)
        c = self._checked(prompts, b, weights, limits, group_ids, explain, metadata)
        images = images.contiguous()
        if self.device.type == "cuda":
            c.raw = images.pin_memory()
        elif not prepare:
            self._pending(c, images, limits, [h * w] * b)
        else:
            c.pixels = prepare_tensor(images, self.input_specs)
        return c

    def _pinned(self, pixels: dict[Preprocess, torch.Tensor]) -> dict[Preprocess, torch.Tensor]:
        return {s: t.pin_memory() for s, t in pixels.items()} if self.device.type == "cuda" else pixels

    def _pending(self, c: Checked, images, limits: Limits, pixels: list[int]) -> Checked:
        # the pixels' final tensors, filled part by part (pinned for a fast copy to a GPU)
        c.pending = (images, limits, pixels)
        n, cuda = len(c), self.device.type == "cuda"
        c.pixels = {s: torch.empty((n, 3, s.size, s.size), pin_memory=cuda) for s in self.input_specs}
        return c

    def prepare_part(self, c: Checked, start: int, stop: int, gate: Callable[[int], ContextManager] | None = None) -> None:
        """Fill images `start:stop` of a pending request's pixels (checked with `prepare=False`): decoded and
        prepared with the reference pipeline (encoded images) or prepared in torch (a CPU tensor). Parts
        are disjoint, so several threads can fill one request at once.

        One image at a time: decoded, prepared into its rows and dropped before the next is opened, each
        inside `gate(its decoded pixel count)` when given (the service's pool-wide pixel budget, its
        deadline and the client's presence: the gate may raise to stop the part between images)."""
        images, limits, pixels = c.pending
        rows = {spec: t[start:stop] for spec, t in c.pixels.items()}
        for i in range(start, stop):
            with gate(pixels[i]) if gate is not None else contextlib.nullcontext():
                if isinstance(images, torch.Tensor):
                    prepare_tensor(images[i : i + 1], self.input_specs, out={s: r[i - start : i - start + 1] for s, r in rows.items()})
                    continue
                im = open_image(images[i], limits.max_image_pixels, limits.max_aspect_ratio)
                part = prepare_pil([im], self.input_specs)
                del im
            for spec, t in part.items():
                rows[spec][i - start].copy_(t[0])

    def _checked(self, prompts, n: int, weights, limits: Limits, group_ids, explain: bool, metadata=None) -> Checked:
        prompt_list = self._prompts_for(prompts, n, limits)
        metadata = self.check_metadata(prompt_list, metadata, limits)
        if group_ids is not None:
            if isinstance(group_ids, (str, bytes)) or not isinstance(group_ids, Sequence):
                raise InvalidRequestError("group_ids must be a list with one id (string or integer) per image")
            if len(group_ids) != n:
                raise InvalidRequestError(f"{len(group_ids)} group_ids for {n} images")
            if not all(isinstance(g, (str, int)) and not isinstance(g, bool) for g in group_ids):
                raise InvalidRequestError("each group id must be a string or an integer")
            group_ids = list(group_ids)
        if explain and self.calibration is None:
            raise InvalidRequestError("explain needs a calibration file: set `calibration` in the config "
                                      "(written by `t2i-reward calibrate`)")
        self.check_group_sizes([n])
        self.check_groups(prompt_list, group_ids)
        return Checked(prompt_list, self.weights_for(weights), group_ids=group_ids, explain=bool(explain), metadata=metadata)

    def check_metadata(self, prompts: Sequence[str], metadata, limits: Limits | None = None) -> list[dict] | None:
        """Each pair's metadata checked (rewarders/metadata.py), then against what every expert needs of it:
        its `metadata_fields` and its own `check_pair`. InvalidRequestError names the expert, field and image."""
        limits = limits or self.limits
        checked = check_metadata(metadata, len(prompts), limits)
        pairs = checked if checked is not None else [{}] * len(prompts)
        for name, e in self.experts.items():
            # an expert's own check_pair runs too where it has no metadata (hpsv3 refuses prompts holding its special tokens)
            if not (e.uses_metadata or e.metadata_fields or type(e).check_pair is not Expert.check_pair):
                continue
            for i, (prompt, m) in enumerate(zip(prompts, pairs)):
                missing = [f for f in e.metadata_fields if f not in m]
                if missing:
                    lack = f"image {i}'s metadata lacks it" if m else f"image {i} has no metadata"
                    raise InvalidRequestError(f"expert {name!r} needs the metadata field {missing[0]!r} for every image; {lack}")
                try:
                    e.check_pair(prompt, m)
                except InvalidRequestError as err:
                    raise InvalidRequestError(f"image {i}: {err}") from None
        return checked

    def raw_scores(self, images: Sequence, prompts: Sequence[str], *, groups: Sequence[int] | None = None,
                   metadata: Sequence | None = None, on_timing: Timing | None = None) -> dict[str, torch.Tensor]:
        """Raw per-expert scores (CPU float32) for decoded PIL images, one prompt per image, in batches.

        `groups`: the sizes of the consecutive requests the images belong to, which the batch-level
        experts (diversity) score separately; by default each run of equal consecutive prompts is one.
        """
        if groups is None:
            groups = [len(list(run)) for _, run in itertools.groupby(prompts)]
        if sum(groups) != len(images):
            raise InvalidRequestError(f"groups add up to {sum(groups)} images, not {len(images)}")
        metadata = self.check_metadata(list(prompts), metadata) if metadata is not None else None
        for a, b in zip([0, *itertools.accumulate(groups)], itertools.accumulate(groups)):
            self.check_groups(list(prompts[a:b]), None)
        return self._scores(PilPixels(images, self.device), list(prompts), groups, metadata, on_timing).scores

    def _scores(self, pixels, prompts: list[str], groups: Sequence[int], metadata: Sequence[dict] | None,
                on_timing: Timing | None, group_ids: Sequence[Sequence | None] | None = None) -> Scores:
        """Every expert's raw scores (CPU float32), in batches of `max_batch_size` from `pixels.get(spec, a, b)`;
        `group_ids` per request (`groups` are their sizes), for the experts that score groups."""
        self.check_group_sizes(groups)
        specs = {e.clip_spec for e in self._batch_level.values() if e.clip_spec is not None}
        with torch.inference_mode():
            parts, sizes, embeds = self._passes(pixels.get, prompts, metadata, on_timing, self.config.max_batch_size)
            grouped = self._group_scores({s: embeds[s].cpu() for s in specs}, prompts, groups, metadata, on_timing,
                                         pixels.get, group_ids)
        out = _concat(parts, sizes)
        out.scores.update(grouped.scores)
        out.extras.update(grouped.extras)
        out.errors.update(grouped.errors)
        out = Scores({n: out.scores[n] for n in self.experts}, out.extras, out.errors)
        out.summaries = self._summaries(out, groups, metadata)
        return out

    def _check_image_list(self, images, limits: Limits) -> None:
        if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
            raise InvalidRequestError("images must be a list of images (PIL images, paths or bytes)")
        if len(images) == 0:
            raise InvalidRequestError("no images to score")
        if len(images) > limits.max_images:
            raise InvalidRequestError(f"{len(images)} images; the limit is {limits.max_images} per call")


def _groups(group_ids: Sequence | None, n: int) -> dict:
    """The indices of each group of one request, by group id in order of first appearance (one group without ids)."""
    if group_ids is None:
        return {None: list(range(n))}
    out: dict = {}
    for i, g in enumerate(group_ids):
        out.setdefault(g, []).append(i)
    return out


def _concat(parts: Sequence[Scores], sizes: Sequence[int]) -> Scores:
    """Consecutive runs of pairs' scores as one (CPU tensors; error indices shifted to the whole run)."""
    out = Scores({})
    starts = [0, *itertools.accumulate(sizes)]
    for name in dict.fromkeys(n for p in parts for n in p.scores):
        out.scores[name] = torch.cat([p.scores[name].cpu() for p in parts])
    for name in dict.fromkeys(n for p in parts for n in p.extras):  # NaN where a failed batch gave none
        out.extras[name] = torch.cat([p.extras[name].cpu() if name in p.extras else torch.full((n,), math.nan)
                                      for p, n in zip(parts, sizes)])
    for p, a in zip(parts, starts):
        for name, errors in p.errors.items():
            out.errors.setdefault(name, {}).update({a + i: m for i, m in errors.items()})
    return out


def _nan_mean(x: torch.Tensor) -> Optional[float]:
    """The mean over the values that are not NaN (an expert's failures), or None when all are."""
    keep = ~torch.isnan(x)
    if bool(keep.all()):
        return float(x.mean())
    return float(x[keep].mean()) if bool(keep.any()) else None


def _check_values(images: torch.Tensor) -> None:
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1:
        raise InvalidRequestError("'images' values must be finite and in [0, 1]")

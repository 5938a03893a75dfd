"""Score calibration: where a raw expert score falls in the scores of a reference set of images.

    from t2i_reward.rewarders.calibration import calibrate, load_calibration
    cal = calibrate(rewarder, prompts, images, source="my-prompts.txt")   # or `t2i-reward calibrate`
    cal.save("calibration.json")
    cal = load_calibration("calibration.json")          # or "tiny": the packaged file of the tiny profile
    cal.percentiles({"aesthetic": [5.1, 6.3]})           # {"aesthetic": [41.0, 93.5]}

A calibration holds, per expert, 101 quantiles (0%, 1%, ..., 100%) of its RAW score over the calibration
set, with n, mean and std. A score's percentile is found by linear interpolation in that table, so it
says "better than p% of the calibration images" for any expert, whatever its scale. A config that names
a calibration file (`calibration:`) gives the mixture one (`Mixture.calibration`), which `"explain": true`
answers use.

File format (JSON):
    {"version": 1, "profile": "tiny", "created": "2025-01-31", "n_images": 200, "source": "prompts.txt",
     "experts": {"aesthetic": {"checkpoint": "...", "n": 200, "mean": 5.3, "std": 0.6, "quantiles": [101 numbers]}}}
"""

from __future__ import annotations

import bisect
import datetime
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .errors import InvalidPromptError, InvalidRequestError, ModelLoadError
from .images import open_image

log = logging.getLogger(__name__)

VERSION = 1
N_QUANTILES = 101  # 0%, 1%, ..., 100%
PACKAGED = {"tiny": "calibration-tiny.json"}  # spec -> file in rewarders/data/


@dataclass
class ExpertCalibration:
    """One expert's raw-score distribution over the calibration set."""

    quantiles: list[float]  # N_QUANTILES values, non-decreasing: quantiles[k] is the k-th percentile
    n: int
    mean: float
    std: float
    checkpoint: str = ""

    @classmethod
    def from_scores(cls, scores: Sequence[float], checkpoint: str = "") -> "ExpertCalibration":
        x = np.asarray(scores, dtype=np.float64)
        q = np.quantile(x, np.linspace(0.0, 1.0, N_QUANTILES))  # linear interpolation between order statistics
        q = np.maximum.accumulate(q)  # float rounding must never make the table decrease
        return cls([float(v) for v in q], int(x.size), float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, checkpoint)

    def percentile(self, score: float) -> float | None:
        """The score's percentile in [0, 100]; None for NaN. A score equal to a run of equal quantiles
        (a flat segment: many tied scores) gets the middle of the run, so a constant expert gives 50."""
        if math.isnan(score):
            return None
        q = self.quantiles
        lo, hi = bisect.bisect_left(q, score), bisect.bisect_right(q, score)
        if lo < hi:  # equal to q[lo] .. q[hi - 1]
            return (lo + hi - 1) / 2 * 100 / (N_QUANTILES - 1)
        if lo == 0:
            return 0.0
        if lo == len(q):
            return 100.0
        k = lo - 1 + (score - q[lo - 1]) / (q[lo] - q[lo - 1])  # q[lo - 1] < score < q[lo]
        return k * 100 / (N_QUANTILES - 1)


@dataclass
class Calibration:
    """Per-expert quantile tables and the metadata of the set they were measured on."""

    experts: dict[str, ExpertCalibration]
    profile: str = ""
    created: str = ""  # ISO date
    n_images: int = 0
    source: str = ""  # free text: where the prompts and images came from
    version: int = VERSION

    def percentiles(self, raw: Mapping[str, torch.Tensor | Sequence[float]]) -> dict[str, list[float | None]]:
        """Each raw score's percentile in [0, 100] for every expert in `raw`; None for each image of an
        expert this calibration does not cover."""
        out = {}
        for name, scores in raw.items():
            values = scores.detach().float().cpu().reshape(-1).tolist() if isinstance(scores, torch.Tensor) else [float(s) for s in scores]
            cal = self.experts.get(name)
            out[name] = [None] * len(values) if cal is None else [cal.percentile(v) for v in values]
        return out

    def check(self, expert_names) -> list[str]:
        """The experts among `expert_names` that this calibration does not cover."""
        return [n for n in expert_names if n not in self.experts]

    def to_dict(self) -> dict:
        d = asdict(self)
        experts = {n: {k: e[k] for k in ("checkpoint", "n", "mean", "std", "quantiles")} for n, e in d.pop("experts").items()}
        return {"version": d.pop("version"), **d, "experts": experts}

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file: one line per metadata key and one per expert, so diffs stay readable."""
        d = self.to_dict()
        experts = d.pop("experts")
        lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()]
        lines += [' "experts": {', ",\n".join(f"  {json.dumps(n)}: {json.dumps(e)}" for n, e in experts.items()), " }"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{\n" + "\n".join(lines) + "\n}\n")

    @classmethod
    def from_dict(cls, data, name: str = "calibration") -> "Calibration":
        """Validate a parsed file; every problem is a `ModelLoadError` that names `name`."""
        def bad(why: str):
            return ModelLoadError(f"{name}: {why}")

        def number(v, what: str) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(f"{what} must be a finite number, got {v!r}")
            return float(v)

        if not isinstance(data, dict):
            raise bad("not a calibration file (expected a JSON object)")
        if data.get("version") != VERSION:
            raise bad(f"unsupported calibration version {data.get('version')!r} (this version of t2i-reward reads {VERSION}); "
                      "write it again with `t2i-reward calibrate`")
        experts = data.get("experts")
        if not isinstance(experts, dict) or not experts:
            raise bad("'experts' must be a non-empty object")
        out = {}
        for expert, e in experts.items():
            if not isinstance(e, dict):
                raise bad(f"experts.{expert} must be an object")
            q = e.get("quantiles")
            if not isinstance(q, list) or len(q) != N_QUANTILES:
                raise bad(f"experts.{expert}.quantiles must be a list of {N_QUANTILES} numbers")
            q = [number(v, f"experts.{expert}.quantiles[{i}]") for i, v in enumerate(q)]
            if any(b < a for a, b in zip(q, q[1:])):
                raise bad(f"experts.{expert}.quantiles must be non-decreasing")
            n = e.get("n")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise bad(f"experts.{expert}.n must be a positive integer, got {n!r}")
            std = number(e.get("std"), f"experts.{expert}.std")
            if std < 0:
                raise bad(f"experts.{expert}.std must not be negative")
            out[expert] = ExpertCalibration(q, n, number(e.get("mean"), f"experts.{expert}.mean"), std, str(e.get("checkpoint", "")))
        n_images = data.get("n_images", 0)
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
            raise bad(f"n_images must be a non-negative integer, got {n_images!r}")
        return cls(out, str(data.get("profile", "")), str(data.get("created", "")), n_images, str(data.get("source", "")))


def load_calibration(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Calibration:
    """A calibration from `spec`: a JSON file written by `Calibration.save` / `t2i-reward calibrate`, or
    `tiny` (the packaged file of the tiny profile). Raises `ModelLoadError` for a missing or bad file.

    `cache_dir` is the config's: accepted so the factory passes every spec the same way as checkpoint specs
    (a calibration is never downloaded today, so it is not read).
    """
    spec = str(spec)
    if spec in PACKAGED:
        name = f"packaged calibration {spec!r}"
        try:
            text = resources.files("t2i_reward.rewarders").joinpath("data", PACKAGED[spec]).read_text()
        except OSError as e:
            raise ModelLoadError(f"{name}: cannot read it ({e}); reinstall t2i-reward") from None
    else:
        path = Path(spec).expanduser()
        name = f"calibration file {path}"
        if not path.is_file():
            raise ModelLoadError(f"{name}: no such file (write one with `t2i-reward calibrate`, or use 'tiny')")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{name}: cannot read it ({e})") from None
    try:
        # Python's json accepts NaN and Infinity; they reach `from_dict`, which refuses non-finite numbers
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{name}: not valid JSON ({e})") from None
    return Calibration.from_dict(data, name)


# ----------------------------------------------------------------------------------------------
# measuring

def _batch_level(rewarder) -> dict[str, int]:
    """Batch-level experts (diversity) and the fewest images per request each needs."""
    # min_images defaults to 1, as in Mixture.check_group_sizes
    return {n: getattr(e, "min_images", 1) for n, e in rewarder.experts.items() if getattr(e, "batch_level", False)}


def calibrate(rewarder, prompts: list[str], images: list, batch_size: int | None = None, source: str = "") -> Calibration:
    """Score (prompt, image) pairs with `rewarder` and return each expert's raw-score distribution.

    `images`: paths, bytes or PIL images, one per prompt, refused as in a scoring call when they are not
    images or exceed the config's pixel and aspect-ratio limits. `batch_size`: images decoded and scored
    per call (default: the config's `max_batch_size`).

    Batch-level experts (diversity) score an image against the other images of its request: here the
    requests are the images that share a prompt. Only prompts with enough images (2 for diversity) count
    for them; with none, they are left out of the calibration, with a warning.
    """
    if len(prompts) != len(images):
        raise InvalidRequestError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image")
    if len(prompts) < 2:
        raise InvalidRequestError(f"calibration needs at least 2 (prompt, image) pairs, got {len(prompts)}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InvalidPromptError(f"prompt {i + 1} is empty or not a string: {p!r}")
    batch_size = batch_size or rewarder.config.max_batch_size
    level = _batch_level(rewarder)
    need = max(level.values(), default=1)

    # requests: the images of each prompt that has enough of them for the batch-level experts
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    groups = [idx for idx in by_prompt.values() if level and len(idx) >= need]
    grouped = {i for idx in groups for i in idx}
    loose = [i for i in range(len(prompts)) if i not in grouped]

    scores: dict[str, list[float]] = {n: [] for n in rewarder.experts}

    # whole requests, packed into chunks of about batch_size images (a larger request is one chunk)
    chunk: list[list[int]] = []
    for g in groups:
        if chunk and sum(map(len, chunk)) + len(g) > batch_size:
            _score(rewarder, prompts, images, chunk, 0, scores, level, keep_batch_level=True)
            chunk = []
        chunk.append(g)
    if chunk:
        _score(rewarder, prompts, images, chunk, 0, scores, level, keep_batch_level=True)
    # the other images, per-image experts only; with batch-level experts configured, each chunk is scored as
    # one throwaway request (mixture.raw_scores scores every expert), padded with repeats up to its minimum
    for start in range(0, len(loose), batch_size):
        part = loose[start : start + batch_size]
        pad = [part[k % len(part)] for k in range(max(0, need - len(part)))] if level else []
        _score(rewarder, prompts, images, [part + pad], len(pad), scores, level, keep_batch_level=False)

    if level and loose:
        log.warning("calibration: %s scored on the %d images whose prompt has at least %d images; the other %d "
                    "images do not count for it", ", ".join(level), len(grouped), need, len(loose))
    sources = rewarder.sources()
    experts = {}
    for name, values in scores.items():
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < len(values):
            log.warning("calibration: %s gave %d non-finite scores; left out", name, len(values) - len(finite))
        if len(finite) < 2:
            log.warning("calibration: %s left out: it scored %d images (it needs at least 2%s)", name, len(finite),
                        f", in groups of {need} sharing a prompt" if name in level else "")
            continue
        experts[name] = ExpertCalibration.from_scores(finite, str(sources.get(name, {}).get("checkpoint", "")))
    if not experts:
        raise InvalidRequestError("no expert could be calibrated on these images")
    return Calibration(experts, rewarder.config.profile, datetime.date.today().isoformat(), len(prompts), source)


def _score(rewarder, prompts, images, chunk: list[list[int]], n_pad: int, scores: dict[str, list[float]],
           level: Mapping[str, int], keep_batch_level: bool) -> None:
    """Score one chunk of requests (lists of indices; the last `n_pad` images are padding) into `scores`."""
    flat = [i for g in chunk for i in g]
    limits = rewarder.limits  # the config's: pixels and aspect ratio checked from the header before decoding
    decoded = [open_image(images[i], limits.max_image_pixels, limits.max_aspect_ratio) for i in flat]
    raw = rewarder.raw_scores(decoded, [prompts[i] for i in flat], groups=[len(g) for g in chunk])
    keep = len(flat) - n_pad
    for name, s in raw.items():
        if keep_batch_level or name not in level:
            scores[name].extend(s[:keep].tolist())

"""The reward-hacking sentinel: every evaluation scores the held-out prompts with *all* experts (those the
job optimises and those it does not) plus cheap image statistics, and records each one's drift from the
base model in standard errors. A held-out expert falling far while the optimised reward rises is the
signature of reward hacking (the model found what the optimised experts like, not what people like).

Hacking seen in the field, and what reveals it:
- grid/checkerboard artefacts: `high_freq` up, `jpeg_bpp` up;
- collapse (flat or identical images): `contrast`, `jpeg_bpp` down;
- blur: `high_freq`, `jpeg_bpp` down;
- over-saturation: `saturation` up;
- corrupted images (noise): `high_freq`, `jpeg_bpp` up; held-out experts down.

Only held-out *experts* can stop a job: the image statistics move legitimately when a reward asks for,
say, more colourful images, so they are recorded for the report and for a human to judge, never a trigger.

Record (one per evaluation): {metric: {"mean", "se", "drift_se"}} for "total", every expert and every
image statistic (keyed `image.<stat>` so that an expert cannot shadow a statistic).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch

STAT_PREFIX = "image."  # record keys of the image statistics: image.saturation, image.high_freq, ...
_EPS = 1e-8  # floor of the drift's denominator: two identical, zero-variance evaluations drift 0, not NaN


def _luminance(images: torch.Tensor) -> torch.Tensor:
    # Rec. 601 weights, the ones JPEG uses for its Y channel
    return 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]


def _high_freq(lum: torch.Tensor) -> torch.Tensor:
    """Share of spectral energy above half the Nyquist radius, per image (B, H, W) -> (B,)."""
    b, h, w = lum.shape
    x = lum - lum.mean(dim=(1, 2), keepdim=True)
    # why the Hann window: the FFT treats the image as periodic, so the seam between opposite borders of
    # any non-tiling image would count as a sharp edge (high frequency) that is not in the picture
    win = torch.outer(torch.hann_window(h, periodic=False, dtype=x.dtype),
                      torch.hann_window(w, periodic=False, dtype=x.dtype)) if min(h, w) > 2 else 1.0
    power = torch.fft.fft2(x * win).abs().pow(2)
    power[:, 0, 0] = 0  # the window brings a little DC back; the mean is not "frequency energy"
    fy = torch.fft.fftfreq(h, dtype=x.dtype).view(h, 1)
    fx = torch.fft.fftfreq(w, dtype=x.dtype).view(1, w)
    high = (fy.pow(2) + fx.pow(2)).sqrt() > 0.25  # Nyquist is 0.5 cycles/pixel
    total = power.sum(dim=(1, 2))
    # a flat image has no spectral energy at all: call its share 0 (it is as blurred as can be)
    return torch.where(total > 0, (power * high).sum(dim=(1, 2)) / total.clamp_min(1e-30), torch.zeros_like(total))


def _jpeg_bpp(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    from PIL import Image

    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    h, w = u8.shape[1:3]
    out = []
    for arr in u8:
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
        out.append(8 * buf.tell() / (h * w))  # headers included: a constant offset that cancels in the drift
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def image_stats(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cheap statistics of (B, 3, H, W) images in [0, 1], each (B,); no model."""
    x = images.detach().to("cpu", torch.float64).clamp(0, 1)
    lum = _luminance(x)
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx))  # HSV S; 0 for black
    return {
        "saturation": sat.mean(dim=(1, 2)),       # over-saturation hacking (aesthetic/preference rewards love colour)
        "high_freq": _high_freq(lum),             # up: grid/checkerboard artefacts, noise; down: blur
        "jpeg_bpp": _jpeg_bpp(x),                 # information content: up with noise/artefacts, down with collapse
        "brightness": lum.mean(dim=(1, 2)),       # washed-out or dark drift
        "contrast": lum.std(dim=(1, 2), correction=0),  # collapse to flat images; harsh contrast
    }


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the values that are not NaN (pairs without a
    score); one value has no standard error (0), none has mean NaN. The job's evaluation
    (`artifacts.summarise`) uses it too."""
    v = values.detach().to("cpu", torch.float64).flatten()
    v = v[~torch.isnan(v)]
    if len(v) == 0:
        return math.nan, 0.0
    se = float(v.std(correction=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


class Sentinel:
    """State across evaluations; the first `observe` is the base model (the baseline)."""

    def __init__(self, optimised: Iterable[str], threshold_se: float = 3.0, stop_on_hacking: bool = False):
        self.optimised = set(optimised)
        self.threshold_se = float(threshold_se)
        self.stop_on_hacking = bool(stop_on_hacking)
        self.history: list[dict] = []  # [{"step": int, "metrics": record}], history[0] is the base model

    @property
    def baseline(self) -> Optional[dict]:
        return self.history[0]["metrics"] if self.history else None

    def observe(self, step: int, total: torch.Tensor, components: dict[str, torch.Tensor],
                images: torch.Tensor) -> dict:
        values = {"total": total, **components,
                  **{STAT_PREFIX + k: v for k, v in image_stats(images).items()}}
        base = self.baseline
        record = {}
        for name, v in values.items():
            mean, se = mean_se(v)
            if math.isnan(mean):  # no image got this score: nothing to record (JSON has no NaN)
                continue
            b = (base or {}).get(name)
            # a metric the baseline lacks (an expert added on resume) has nothing to drift from
            drift = 0.0 if b is None else (mean - b["mean"]) / max(math.sqrt(se ** 2 + b["se"] ** 2), _EPS)
            record[name] = {"mean": mean, "se": se, "drift_se": drift}
        self.history.append({"step": int(step), "metrics": record})
        return record

    def held_out(self, record: dict) -> list[str]:
        """Experts in the record that the job does not optimise (image statistics and the total excluded)."""
        return [n for n in record if n != "total" and not n.startswith(STAT_PREFIX) and n not in self.optimised]

    def hacking(self, record: dict) -> Optional[str]:
        """Why this record looks like reward hacking, or None: the optimised total rises (drift > 0) while a
        held-out expert falls more than `threshold_se` standard errors below the base model."""
        rise = record.get("total", {}).get("drift_se", 0.0)
        if not rise > 0:  # both falling is a bad run, not hacking
            return None
        fallen = [n for n in self.held_out(record) if record[n]["drift_se"] < -self.threshold_se]
        if not fallen:
            return None
        worst = min(fallen, key=lambda n: record[n]["drift_se"])  # name the worst; the others are in the record
        r, base = record[worst], (self.baseline or {}).get(worst, {"mean": float("nan")})
        others = f" (and {len(fallen) - 1} more held-out expert(s))" if len(fallen) > 1 else ""
        return (f"held-out expert {worst!r} fell {-r['drift_se']:.1f} standard errors below the base model "
                f"(mean {base['mean']:.4g} -> {r['mean']:.4g}){others} while the optimised reward rose "
                f"{rise:.1f} standard errors")

    def should_stop(self, record: dict) -> Optional[str]:
        return self.hacking(record) if self.stop_on_hacking else None

    @property
    def best_step(self) -> Optional[int]:
        """The evaluated step (base excluded) with the highest optimised total among those without hacking;
        None before any such step. Ties go to the earliest step."""
        best = None
        for entry in self.history[1:]:
            m = entry["metrics"]
            if "total" in m and self.hacking(m) is None and (best is None or m["total"]["mean"] > best[1]):
                best = (entry["step"], m["total"]["mean"])
        return None if best is None else best[0]

    def to_dict(self) -> dict:
        return {"optimised": sorted(self.optimised), "threshold_se": self.threshold_se,
                "stop_on_hacking": self.stop_on_hacking, "history": self.history}

    @classmethod
    def from_dict(cls, data: dict) -> "Sentinel":
        s = cls(data["optimised"], data.get("threshold_se", 3.0), data.get("stop_on_hacking", False))
        s.history = [{"step": int(e["step"]), "metrics": e["metrics"]} for e in data.get("history", [])]
        return s


def draw_sentinel(axes: Sequence, history: list[dict], optimised: Iterable[str] = (),
                  threshold_se: float = 3.0) -> None:
    """Two panels on `axes` (experts, image statistics): each metric's drift from the base model in
    standard errors per evaluated step, with the ±threshold band. Optimised experts and the total are
    solid, held-out experts dashed."""
    optimised = set(optimised)
    steps = [e["step"] for e in history]
    names = list(dict.fromkeys(n for e in history for n in e["metrics"]))  # first-seen order
    experts = [n for n in names if not n.startswith(STAT_PREFIX)]
    stats = [n for n in names if n.startswith(STAT_PREFIX)]

    def curve(n):
        return [e["metrics"].get(n, {}).get("drift_se", float("nan")) for e in history]

    ax_e, ax_s = axes[0], axes[1]
    for n in experts:
        solid = n == "total" or n in optimised
        ax_e.plot(steps, curve(n), "-" if solid else "--", marker="o", markersize=3, lw=2 if n == "total" else 1.2,
                  label=n if solid else f"{n} (held out)")
    for n in stats:
        ax_s.plot(steps, curve(n), "-", marker="o", markersize=3, label=n.removeprefix(STAT_PREFIX))
    for ax, title in ((ax_e, "experts: drift from the base model"), (ax_s, "image statistics: drift from the base model")):
        ax.axhspan(-threshold_se, threshold_se, color="0.9", zorder=0)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("drift (standard errors)")
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")


def plot_sentinel(history: list[dict], path_or_axes: Union[str, Path, Sequence], optimised: Iterable[str] = (),
                  threshold_se: float = 3.0) -> None:
    """Write the two drift panels to a PNG at `path_or_axes`, or draw them on a pair of axes."""
    if not isinstance(path_or_axes, (str, Path)):
        draw_sentinel(path_or_axes, history, optimised, threshold_se)
        return
    import matplotlib

    matplotlib.use("Agg")  # as report.py: headless workers have no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    draw_sentinel(axes, history, optimised, threshold_se)
    fig.tight_layout()
    fig.savefig(path_or_axes, dpi=80, format="png")
    plt.close(fig)

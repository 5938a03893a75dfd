"""Preference accuracy of every expert, CLIP score and the mixture (`t2i-reward eval-preference`), and
the pieces of the mixture-weight fit (`fit.py`, `t2i-reward fit-mixture`).

Preference accuracy: over every pair of images of a prompt with different human ranks (ties
excluded), the share where the scorer gives the preferred image the higher score; equal scores count
half. 95% intervals: percentile bootstrap over prompts (pairs of one prompt are resampled together).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..images import open_image
from ..mixture import Mixture
from .data import PreferenceRecord, preference_pairs

CLIP_SCORE = "clip_score"
MIXTURE = "mixture"


def score_records(records: Sequence[PreferenceRecord], rewarder: Mixture, chunk_images: int = 64, progress: bool = True) -> dict[str, list[np.ndarray]]:
    """Per scorer, one array of scores per record: every expert (raw), the mixture total, and CLIP score
    (100 x cosine of the CLIP image and text embeddings, with the mixture's first CLIP backbone)."""
    from tqdm.auto import tqdm

    clip = next(iter(rewarder.clips.values()), None)
    names = list(rewarder.experts) + [MIXTURE] + ([CLIP_SCORE] if clip is not None else [])
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    chunk: list[PreferenceRecord] = []

    def flush():
        images = [open_image(im, rewarder.config.max_image_pixels) for r in chunk for im in r.images]
        prompts = [r.prompt for r in chunk for _ in r.images]
        raw = rewarder.raw_scores(images, prompts)
        total = rewarder.combine(raw, rewarder.weights)
        per = {**{n: s.numpy() for n, s in raw.items()}, MIXTURE: total.numpy()}
        if clip is not None:
            with torch.inference_mode():
                sims = []
                for s in range(0, len(images), rewarder.config.max_batch_size):
                    px = clip.preprocess.pil(images[s : s + rewarder.config.max_batch_size]).to(rewarder.device)
                    sims.append((clip.encode_images(px) * clip.encode_texts(prompts[s : s + len(px)])).sum(-1).cpu())
            per[CLIP_SCORE] = 100 * torch.cat(sims).numpy()
        start = 0
        for r in chunk:
            for n in names:
                out[n].append(per[n][start : start + len(r.images)])
            start += len(r.images)
        chunk.clear()

    pending = 0
    for rec in tqdm(records, desc="scoring", disable=not progress):
        chunk.append(rec)
        pending += len(rec.images)
        if pending >= chunk_images:
            flush()
            pending = 0
    if chunk:
        flush()
    return out


def per_record_correct(scores: Sequence[np.ndarray], records: Sequence[PreferenceRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Per record: (correct pairs, with equal scores as half; number of pairs)."""
    correct = np.zeros(len(records))
    count = np.zeros(len(records))
    for r, i, j in preference_pairs(records):
        s = scores[r]
        correct[r] += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
        count[r] += 1
    return correct, count


def preference_accuracy(scores: Sequence[np.ndarray], records: Sequence[PreferenceRecord],
                        n_boot: int = 1000, seed: int = 0) -> dict:
    """{"accuracy", "ci_low", "ci_high", "pairs"} with a bootstrap over prompts."""
    correct, count = per_record_correct(scores, records)
    total = count.sum()
    if total == 0:
        return {"accuracy": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "pairs": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(records), size=(n_boot, len(records)))
    boot = correct[idx].sum(1) / np.maximum(count[idx].sum(1), 1)
    return {"accuracy": float(correct.sum() / total), "ci_low": float(np.percentile(boot, 2.5)),
            "ci_high": float(np.percentile(boot, 97.5)), "pairs": int(total)}


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| scorer | preference accuracy | 95% CI | pairs |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['accuracy']:.2f} | {100 * r['ci_low']:.2f}–{100 * r['ci_high']:.2f} | {r['pairs']} |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    acc = np.array([100 * results[n]["accuracy"] for n in names])
    err = np.array([[acc[k] - 100 * results[n]["ci_low"], 100 * results[n]["ci_high"] - acc[k]] for k, n in enumerate(names)]).T
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    ax.bar(names, acc, yerr=err, capsize=4, color="tab:blue")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("preference accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_preferences(records: Sequence[PreferenceRecord], rewarder: Mixture, out_dir: str | Path,
                         n_boot: int = 1000, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Preference accuracy of every scorer on `records`, written to `out_dir` as
    `preference_accuracy.md` (table), `.json` and `.png` (bar chart); returns the results by scorer."""
    scores = score_records(records, rewarder, progress=progress)
    results = {name: preference_accuracy(s, records, n_boot=n_boot, seed=seed) for name, s in scores.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preference_accuracy.md").write_text(markdown_table(results))
    (out / "preference_accuracy.json").write_text(json.dumps(results, indent=2))
    bar_chart(results, out / "preference_accuracy.png")
    return results


def pair_differences(scores: dict[str, Sequence[np.ndarray]], records: Sequence[PreferenceRecord],
                     scale: dict[str, float]) -> np.ndarray:
    """(pairs, experts): s_e(preferred) - s_e(other), each expert divided by its scale (its std)."""
    names = list(scale)
    return np.array([[(scores[n][r][i] - scores[n][r][j]) / scale[n] for n in names]
                     for r, i, j in preference_pairs(records)])


def fit_weights(diffs: np.ndarray, names: Sequence[str], c: float = 1e4) -> dict[str, float]:
    """Logistic regression without intercept on preference differences: P(prefer) = sigmoid(w . d).

    Each pair is used in both orders (d with label 1, -d with label 0), so the fit has no bias towards
    either side; `c` is sklearn's inverse regularisation strength (large: nearly unregularised)."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([diffs, -diffs])
    y = np.concatenate([np.ones(len(diffs)), np.zeros(len(diffs))])
    clf = LogisticRegression(fit_intercept=False, C=c, max_iter=1000).fit(x, y)
    return {n: float(w) for n, w in zip(names, clf.coef_[0])}


def weighted_accuracy(diffs: np.ndarray, weights: Sequence[float]) -> float:
    d = diffs @ np.asarray(weights)
    return float(((d > 0) + 0.5 * (d == 0)).mean()) if len(d) else float("nan")

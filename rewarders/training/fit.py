"""Mixture weights learned from human preferences (`t2i-reward fit-mixture`).

A logistic regression without intercept on the per-expert differences of normalised scores,
(s_e(preferred) - s_e(other)) / std_e, fitted on a train split of the prompts; the held-out prompts
measure the accuracy of the fitted weights and of the configured ones. The result is the rewarder's
config with the fitted weights, ready for `--config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from ..mixture import Mixture
from .data import PreferenceRecord, split_by_prompt
from .evaluate import fit_weights, pair_differences, score_records, weighted_accuracy


def fit_mixture(records: Sequence[PreferenceRecord], rewarder: Mixture, val_fraction: float = 0.2, seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """{"weights", "train_pairs"[, "val_accuracy_fitted", "val_accuracy_configured"]} for the rewarder's experts."""
    train, val = split_by_prompt(records, val_fraction, seed)
    names = list(rewarder.experts)
    scale = {n: rewarder.norm[n][1] for n in names}
    scores = score_records(list(train) + list(val), rewarder, progress=progress)
    d_train = pair_differences({n: scores[n][: len(train)] for n in names}, train, scale)
    weights = fit_weights(d_train, names)
    report: dict[str, Any] = {"weights": weights, "train_pairs": len(d_train)}
    if val:
        d_val = pair_differences({n: scores[n][len(train):] for n in names}, val, scale)
        report["val_accuracy_fitted"] = weighted_accuracy(d_val, [weights[n] for n in names])
        report["val_accuracy_configured"] = weighted_accuracy(d_val, [rewarder.weights[n] for n in names])
    return report


def write_fitted_config(weights: dict[str, float], out: str | Path, config_path: str | Path | None, profile: str) -> Path:
    """The config file at `config_path` (or just the profile) with each expert's weight set to the fitted one.
    The file lists every fitted expert, so it enables exactly those."""
    base = (yaml.safe_load(Path(config_path).read_text()) if config_path else None) or {"profile": profile}
    experts = base.get("experts") if isinstance(base.get("experts"), dict) else {}
    for n, w in weights.items():
        entry = experts.get(n) if isinstance(experts.get(n), dict) else {}
        experts[n] = {**entry, "weight": round(w, 6)}
    base["experts"] = experts
    Path(out).write_text(yaml.safe_dump(base, sort_keys=False))
    return Path(out)

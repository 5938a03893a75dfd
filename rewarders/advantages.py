"""Group-relative advantages for GRPO-style trainers: each score z-scored within its group of images.

For the images of one group g (e.g. the samples of one prompt) and a value x (the total, or one expert's
raw score):

    advantage_i = (x_i - mean_g(x)) / (std_g(x) + EPS)

- `std_g` is the population standard deviation (divided by the group size, not size - 1), as Flow-GRPO's
  per-prompt statistics compute it; `EPS` = 1e-4 (Flow-GRPO's) keeps groups of equal scores finite.
- A group with one image has advantage 0 (nothing to compare it with); so does a group whose scores are
  all equal.
- A NaN value (a pair an expert failed on, whose total is null) is left out of its group's statistics
  and has a NaN advantage itself: the rest of the group is normalised over the pairs that were scored.
- The total's advantage is the z-score of the weighted total; each expert's is the z-score of its raw
  score (UniRL's per-component group normalisation), so a trainer can weight them itself:
  sum_e w_e * advantage_e is the "per expert" normalisation of multi-reward GRPO.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import torch

EPS = 1e-4


def group_index(group_ids: Sequence[Hashable]) -> torch.Tensor:
    """Each image's group as 0..G-1, in order of first appearance."""
    seen: dict = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.long)


def zscore_in_groups(values: torch.Tensor, groups: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(values - group mean) / (group population std + eps), per element, in float64.
    NaN values are left out of the statistics and stay NaN.

    The sums are exact (`math.fsum`, correctly rounded), so a group's statistics do not depend on the order
    of its members nor on the other groups of the request: the same scores give the same advantages, bit
    for bit (the batch-invariant mode's promise, docs/scores.md)."""
    v = values.detach().double().cpu()
    members: dict[int, list[float]] = {}
    for x, g in zip(v.tolist(), groups.tolist()):
        if not math.isnan(x):
            members.setdefault(g, []).append(x)
    stats = {}
    for g, xs in members.items():
        mean = math.fsum(xs) / len(xs)
        stats[g] = (mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / len(xs)) + eps)
    mean = torch.tensor([stats.get(g, (0.0, 1.0))[0] for g in groups.tolist()], dtype=torch.float64)
    scale = torch.tensor([stats.get(g, (0.0, 1.0))[1] for g in groups.tolist()], dtype=torch.float64)
    return ((v - mean) / scale).float()  # NaN stays NaN


def group_advantages(total: torch.Tensor, components: Mapping[str, torch.Tensor], group_ids: Sequence[Hashable],
                     eps: float = EPS) -> dict[str, torch.Tensor]:
    """`{"total": (B,), <expert>: (B,) ...}`: the total and every expert z-scored within each group."""
    groups = group_index(group_ids)
    out = {"total": zscore_in_groups(total, groups, eps)}
    out.update({name: zscore_in_groups(s, groups, eps) for name, s in components.items()})
    return out

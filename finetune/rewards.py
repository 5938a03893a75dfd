"""Where a job's rewards come from: the mixture in this process, or the reward service.

Both satisfy `Reward`, the one interface the trainer calls (a `typing.Protocol`: no base class to inherit):
`reward(images, prompts, metadata) -> (total, components)` on [0, 1] image tensors, where `total` (B,) is
differentiable and `components` maps each expert to its raw scores (B,), detached; `scores` gives the same
numbers without a graph; `expert_weights` each expert's weight in the total. `metadata` is one JSON object
per image (its prompt's: GenEval's record, an OCR target; `prompts.PromptMetadata`), or None.
- `LocalReward`: `rewarders` in-process (the embedded default);
- `RemoteReward`: `POST /reward/gradient`, so the worker keeps only the diffusion model on its GPU. The
  chain rule crosses the network: forward sends pixels and gets rewards, d(rewards)/d(pixels) and every
  expert's score; backward multiplies the gradient by the incoming one.

`scores` (the policy-gradient methods, reward-weighted likelihood and every evaluation) answers per pair: a
pair an expert failed on has the score NaN, and its total is NaN when the expert is required (the service's
null; `Mixture.combine`), so one failed pair never fails the step. The differentiable call needs every score
and raises instead.
"""

from __future__ import annotations

from typing import Mapping, Optional, Protocol, Sequence

import torch
from t2i_reward.rewarders import Mixture
from t2i_reward.rewarders.client import RewardClient

Metadata = Optional[Sequence[dict]]  # one JSON object per image, or None: no metadata


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total (B,), differentiable in `images`; {expert: raw scores (B,)}, detached) of (B, 3, H, W) images in [0, 1]."""
        ...

    def scores(self, images: torch.Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same numbers without a graph, on the CPU, NaN where a pair has no score (the policy-gradient
        methods score their samples only)."""
        ...

    def expert_weights(self) -> dict[str, float]:
        """Each expert's weight in the total: which experts the job optimises (the sentinel holds out the
        zero-weight ones) and how GRPO's `per_expert` advantages are weighted."""
        ...


class LocalReward:
    def __init__(self, mixture: Mixture, weights: Mapping[str, float] | None = None):
        self.mixture = mixture
        self.weights = dict(weights) if weights else None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = self.mixture(images.float(), list(prompts), self.weights, metadata=metadata)
        return scores.total.to(images.device), {n: s.detach().cpu() for n, s in scores.components.items()}

    def scores(self, images: torch.Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar rewards only: the same numbers, without a graph, per pair, in one pass over the batch: the
        mixture's raw-tensor scoring (`Mixture.score_pairs`, the service's `/reward`), NaN where an expert failed
        on a pair (and in the total where that expert is required); input it cannot score at all raises."""
        x = images.detach().float().clamp(0, 1).cpu().contiguous()  # the CPU tensor the service would get
        # why the limit: the trainer's batch is one call, however many images the config lets a caller send
        limits = self.mixture.limits.model_copy(update={"max_images": max(self.mixture.limits.max_images, len(x))})
        checked = self.mixture.check_tensor_request(list(prompts), x, self.weights, limits, metadata=metadata)
        raw = self.mixture.score_pairs([checked]).scores
        return self.mixture.combine(raw, checked.weights), raw

    def expert_weights(self) -> dict[str, float]:
        return self.mixture.weights_for(self.weights)


class _ChainRule(torch.autograd.Function):
    """rewards = f(images) computed elsewhere; backward: grad_output * d(rewards)/d(images)."""

    @staticmethod
    def forward(ctx, images, rewards, grad):
        ctx.save_for_backward(grad.to(images.dtype))
        return rewards.to(images.device)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output.view(-1, 1, 1, 1).to(grad.dtype) * grad, None, None


class RemoteReward:
    def __init__(self, base_url: str, api_key: str | None = None, weights: Mapping[str, float] | None = None,
                 client: RewardClient | None = None):
        # a worker rides out a replica restart: 5 retries back off 0.5 + 1 + 2 + 4 + 8 s, then the job fails
        # with the service's last answer (`RewardServiceError`)
        self.client = client or RewardClient(base_url, api_key=api_key, retries=5)
        self.weights = dict(weights) if weights else None
        self._limits: dict | None = None

    def request_size(self, images: torch.Tensor) -> int:
        """Images per `/reward` request for this batch: as few requests as the service's limits allow
        (GET /models: images per request, body bytes, with room for the metadata), of balanced sizes, so a
        batch-level expert (diversity) sees the whole batch when it fits, as in-process, and never a
        request of one image when it does not."""
        if self._limits is None:  # a service older than its "limits" answer: 16, the former fixed size
            self._limits = self.client.models().get("limits") or {"max_images": 16, "max_body_bytes": 64 << 20}
        per_image = max(1, images[0].numel() * 4)  # float32 pixels
        cap = max(1, min(int(self._limits["max_images"]), (int(self._limits["max_body_bytes"]) * 3 // 4) // per_image))
        n = len(images)
        requests = -(-n // cap)
        return -(-n // requests)

    def scores(self, images: torch.Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar rewards only, on `/reward`'s raw-tensor path (float32 pixels, so the numbers equal the
        in-process ones; null answers are NaN), in as few requests as the service allows (`request_size`)."""
        x = images.detach().float().clamp(0, 1).cpu().contiguous()
        out = self.client.score_batch(list(prompts), x, weights=self.weights, chunk_size=self.request_size(x),
                                      metadata=list(metadata) if metadata is not None else None)
        return out.rewards, dict(out.components)

    def expert_weights(self) -> dict[str, float]:
        """The service's weights (GET /models) with this job's overrides."""
        served = {n: float(e["weight"]) for n, e in self.client.models()["experts"].items()}
        return {**served, **(self.weights or {})}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Metadata = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.client.reward_tensors(images.detach().float().clamp(0, 1), list(prompts), self.weights,
                                         list(metadata) if metadata is not None else None)
        total = _ChainRule.apply(images, out["rewards"], out["grad"].to(images.device))
        return total, {k.removeprefix("components."): v for k, v in out.items() if k.startswith("components.")}

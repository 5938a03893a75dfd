"""Where a job's rewards come from: the mixture in this process, or the reward service.

Both are plain callables `reward(images, prompts) -> (B,)` on [0, 1] image tensors:
- `LocalReward`: `rewarders` in-process (the embedded default), differentiable;
- `RemoteReward`: `POST /reward/gradient` for ReFL, so the worker keeps only the diffusion model on its
  GPU. The chain rule crosses the network: forward sends pixels and gets rewards and d(rewards)/d(pixels);
  backward multiplies that by the incoming gradient.
Both also score every expert without gradients (`components`), for the evaluation report.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from rewarders import Mixture


class LocalReward:
    def __init__(self, mixture: Mixture, weights: Mapping[str, float] | None = None):
        self.mixture = mixture
        self.weights = dict(weights) if weights else None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = self.mixture(images.float(), list(prompts), self.weights).total
        return out.to(images.device)

    def components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            scores = self.mixture(images.float(), list(prompts), self.weights)
        return {"total": scores.total.cpu(), **{n: s.cpu() for n, s in scores.components.items()}}


class _RemoteRewardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, client, prompts, weights):
        rewards, grad = client.reward_gradient(images.detach().float().clamp(0, 1), prompts, weights)
        ctx.save_for_backward(grad.to(images.dtype))
        return rewards.to(images.device)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output.view(-1, 1, 1, 1).to(grad.dtype) * grad, None, None, None


class RemoteReward:
    def __init__(self, base_url: str, api_key: str | None = None, weights: Mapping[str, float] | None = None):
        from service.client import RewardClient

        self.client = RewardClient(base_url, api_key=api_key)
        self.weights = dict(weights) if weights else None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return _RemoteRewardFn.apply(images, self.client, list(prompts), self.weights)

    def components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        from service.client import image_bytes
        from torchvision.transforms.functional import to_pil_image

        totals: dict[str, list[float]] = {}
        for img, prompt in zip(images.detach().float().clamp(0, 1).cpu(), prompts):
            out = self.client.reward(prompt, [image_bytes(to_pil_image(img))], self.weights)
            totals.setdefault("total", []).append(out["images"][0]["total"])
            for n, v in out["images"][0]["components"].items():
                totals.setdefault(n, []).append(v)
        return {n: torch.tensor(v) for n, v in totals.items()}

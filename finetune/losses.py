"""One loss per method, each a plain function of the sampler, a batch and the spec.

- `refl_loss` (thesis, seed 001): sample with DDIM without gradients down to a step index drawn from
  `refl_step_range`, take that one step with gradients, predict x0, decode, score with the
  differentiable reward; loss = alpha * (-reward | relu(2 - reward)) + beta * KL(LoRA step || base step).
- `reward_weighted_loss` (Lee et al., seed 002): sample images with the current model, score them,
  and minimise the denoising loss on them weighted by sigmoid(reward), plus the KL regulariser.
- `pretrain_loss`: the denoising loss on user-supplied image-text pairs (keeps the model's skills);
  either method adds it when the spec has `pretrain_data`.
Each returns a `StepLoss`: the loss to minimise, the batch's rewards, the KL term and each expert's
scores (for the job's per-expert curves).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .pipeline import adapters_disabled
from .sampler import MIN_STD, Sampler, ddim_x0, transition_kl
from .spec import JobSpec

# reward(images (B,3,H,W) in [0,1], prompts) -> (total (B,), {expert: (B,)}): differentiable total
RewardFn = Callable[[torch.Tensor, list[str]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepLoss:
    loss: torch.Tensor
    reward: torch.Tensor  # (B,), detached
    kl: torch.Tensor  # scalar, detached
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def step_kl(s: Sampler, latents, k: int, cond, uncond, e: torch.Tensor) -> torch.Tensor:
    """KL between the LoRA's and the base's Gaussian steps x_t -> x_prev from schedule step k (DDIM with
    eta = 1 variance), per element. A step without noise (SDXL's last) has no Gaussian to compare, and the KL
    would divide by zero: there the term is the predictions' squared distance, as in reward-weighted
    likelihood's regulariser."""
    with torch.no_grad(), adapters_disabled(s.m.denoiser, True):
        e_base = s.predict(latents, k, cond, uncond)
    mean, std = s.transition(e, latents, k, 1.0)
    if float(std) <= MIN_STD:
        return ((e - e_base) ** 2).mean()
    base_mean, _ = s.transition(e_base, latents, k, 1.0)
    return transition_kl(mean, base_mean, std)


def step_generator(rng: random.Random) -> torch.Generator:
    """A CPU generator seeded from the step's `rng`: a step's random draws depend on its seed alone, not on
    what ran before it in the process (so a resumed job takes the uninterrupted job's steps), and are the
    same numbers on any device (drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(rng.getrandbits(63))


def denoising_loss(s: Sampler, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator):
    """Per-image epsilon-prediction loss at random timesteps; also (noisy, t, pred) for a regulariser."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.randint(0, s.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(s.device)
    noisy = s.scheduler.add_noise(latents, noise, t)
    pred = s.model(noisy, t, cond)
    return ((pred - noise) ** 2).mean(dim=(1, 2, 3)), (noisy, t, pred)


def refl_loss(s: Sampler, spec: JobSpec, reward: RewardFn, prompts: list[str], seeds: list[int], cond, uncond,
              rng: random.Random) -> StepLoss:
    stop = rng.randrange(*spec.refl_step_range)
    latents = s.denoise(s.initial_latents(seeds), cond, uncond, steps=stop)
    e = s.predict(latents, stop, cond, uncond)  # the one step with gradients
    x0 = ddim_x0(s.scheduler, e, latents, stop)
    total, components = reward(s.decode(x0), prompts)
    reward_term = F.relu(2 - total).mean() if spec.reward_loss == "hinge" else -total.mean()
    kl = step_kl(s, latents, stop, cond, uncond, e) if spec.kl_weight > 0 else torch.zeros((), device=s.device)
    loss = spec.reward_weight * reward_term + spec.kl_weight * kl
    return StepLoss(loss, total.detach(), kl.detach(), components)


def reward_weighted_loss(s: Sampler, spec: JobSpec, reward: RewardFn, prompts: list[str], seeds: list[int], cond, uncond,
                         rng: random.Random) -> StepLoss:
    with torch.no_grad():
        images = s.sample(prompts, seeds, cond=cond, uncond=uncond)
        total, components = reward(images, prompts)
        total = total.detach().to(s.device)
    latents0 = s.encode_images(images, sample=False)
    per_image, (noisy, t, pred) = denoising_loss(s, latents0, cond, step_generator(rng))
    loss = spec.reward_weight * (torch.sigmoid(total) * per_image).mean()
    kl = torch.zeros((), device=s.device)
    if spec.regularizer == "kl" and spec.kl_weight > 0:
        with torch.no_grad(), adapters_disabled(s.m.denoiser, True):
            base_pred = s.model(noisy, t, cond)
        kl = ((pred - base_pred) ** 2).mean()
        loss = loss + spec.kl_weight * kl
    return StepLoss(loss, total, kl.detach(), components)


def pretrain_loss(s: Sampler, pairs: list[tuple[Path, str]], step: int, batch_size: int, resolution: int,
                  rng: random.Random) -> torch.Tensor:
    """The pre-training denoising loss on the pairs of this step (cycled); the VAE's posterior sample, the
    noise and the timesteps drawn from `rng`."""
    batch = [pairs[(step * batch_size + k) % len(pairs)] for k in range(batch_size)]
    images = torch.stack([image_tensor(p, resolution) for p, _ in batch]).to(s.device)
    generator = step_generator(rng)
    latents = s.encode_images(images, sample=True, generator=generator)
    return denoising_loss(s, latents, s.encode([c for _, c in batch]), generator)[0].mean()


def load_pretrain_pairs(folder: Path) -> list[tuple[Path, str]]:
    """x.png + x.txt pairs of a folder (any of png, jpg, jpeg, webp)."""
    pairs = []
    for img in sorted(folder.iterdir()):
        if img.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and img.with_suffix(".txt").is_file():
            pairs.append((img, img.with_suffix(".txt").read_text().strip()))
    if not pairs:
        raise ValueError(f"pretrain_data {folder}: no image with a caption file (x.png + x.txt)")
    return pairs


def image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """An image file -> (3, resolution, resolution) in [0, 1]: resize of the short side, center crop."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as im:
        im = TF.center_crop(TF.resize(im.convert("RGB"), resolution), resolution)
        return TF.to_tensor(im)

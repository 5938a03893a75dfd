"""The steps of ReFL and reward-weighted likelihood: each a function of the job's `TrainState` and the step's
`Batch` that takes one optimiser step and returns the step's `StepLoss`.

- `refl_step` (thesis, seed 001): sample with DDIM without gradients down to a step index drawn from
  `refl_step_range`, take that one step with gradients, predict x0, decode, score with the
  differentiable reward; loss = alpha * (-reward | relu(2 - reward)) + beta * KL(LoRA step || base step).
- `reward_weighted_step` (Lee et al., seed 002): sample images with the current model, score them,
  and minimise the denoising loss on them weighted by sigmoid(reward), plus the KL regulariser.
- `pretrain_loss`: the denoising loss on user-supplied image-text pairs (keeps the model's skills);
  ReFL adds it when the spec has `pretrain_data`, reward-weighted likelihood when its regulariser is `pretrain`.
A `StepLoss` holds the loss minimised, the batch's rewards, the KL term and each expert's scores (for the
job's per-expert curves).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .context import Batch, TrainState, require_rewards
from .pipeline import adapters_disabled
from .sampler import MIN_STD, Sampler, ddim_x0, transition_kl


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


def refl_step(state: TrainState, batch: Batch) -> StepLoss:
    s, spec, cond, uncond = state.train_sampler, state.spec, batch.cond, batch.uncond
    stop = batch.rng.randrange(*spec.refl_step_range)
    latents = s.denoise(s.initial_latents(batch.seeds), cond, uncond, steps=stop)
    e = s.predict(latents, stop, cond, uncond)  # the one step with gradients
    x0 = ddim_x0(s.scheduler, e, latents, stop)
    total, components = state.reward(s.decode(x0), batch.prompts, batch.metadata)
    reward_term = F.relu(2 - total).mean() if spec.reward_loss == "hinge" else -total.mean()
    kl = step_kl(s, latents, stop, cond, uncond, e) if spec.kl_weight > 0 else torch.zeros((), device=s.device)
    loss = spec.reward_weight * reward_term + spec.kl_weight * kl
    if state.pairs:
        loss = loss + spec.pretrain_weight * pretrain_loss(state, batch)
    state.minimise(loss)
    return StepLoss(loss, total.detach(), kl.detach(), components)


def reward_weighted_step(state: TrainState, batch: Batch) -> StepLoss:
    s, spec, cond = state.train_sampler, state.spec, batch.cond
    with torch.no_grad():
        images = s.sample(batch.prompts, batch.seeds, cond=cond, uncond=batch.uncond)
        total, components = state.reward.scores(images, batch.prompts, batch.metadata)
        total = total.detach().to(s.device)
    require_rewards(total, batch.step)
    latents0 = s.encode_images(images, sample=False)
    per_image, (noisy, t, pred) = denoising_loss(s, latents0, cond, step_generator(batch.rng))
    # an image without a reward (NaN total: a required expert failed on it) weighs 0
    weight = torch.nan_to_num(torch.sigmoid(total), nan=0.0)
    loss = spec.reward_weight * (weight * per_image).mean()
    kl = torch.zeros((), device=s.device)
    if spec.regularizer == "kl" and spec.kl_weight > 0:
        with torch.no_grad(), adapters_disabled(s.m.denoiser, True):
            base_pred = s.model(noisy, t, cond)
        kl = ((pred - base_pred) ** 2).mean()
        loss = loss + spec.kl_weight * kl
    if spec.regularizer == "pretrain" and state.pairs:
        loss = loss + spec.pretrain_weight * pretrain_loss(state, batch)
    state.minimise(loss)
    return StepLoss(loss, total, kl.detach(), components)


def pretrain_loss(state: TrainState, batch: Batch) -> torch.Tensor:
    """The pre-training denoising loss on the pairs of this step (cycled); the VAE's posterior sample, the
    noise and the timesteps drawn from the step's `rng`."""
    s, pairs, n = state.train_sampler, state.pairs, state.spec.batch_size
    chosen = [pairs[(batch.step * n + k) % len(pairs)] for k in range(n)]
    images = torch.stack([image_tensor(p, state.spec.resolution) for p, _ in chosen]).to(s.device)
    generator = step_generator(batch.rng)
    latents = s.encode_images(images, sample=True, generator=generator)
    return denoising_loss(s, latents, s.encode([c for _, c in chosen]), generator)[0].mean()


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

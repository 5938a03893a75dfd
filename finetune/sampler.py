"""Sampling with the job's UNet: text encoding, guided noise prediction, DDIM denoising, VAE decoding.

One `Sampler` per job; the losses and the evaluation call it. Nothing here keeps gradients except
`eps` and `decode`, which the ReFL step differentiates through.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from .pipeline import Models, adapters_disabled


class Sampler:
    def __init__(self, models: Models, guidance_scale: float, device: torch.device, autocast: Callable[[], AbstractContextManager]):
        self.m = models
        self.guidance_scale = guidance_scale
        self.device = device
        self.autocast = autocast  # accelerator.autocast: mixed precision on a GPU, a no-op otherwise

    @property
    def scheduler(self):
        return self.m.scheduler

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.m.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.m.text_encoder(ids.to(self.device))[0]

    def conditions(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) text embeddings for classifier-free guidance."""
        return self.encode_text(prompts), self.encode_text([""] * len(prompts))

    def unet(self, latents, t, cond) -> torch.Tensor:
        """One UNet noise prediction, in float32 whatever the weight dtype."""
        with self.autocast():
            return self.m.unet(latents, t, encoder_hidden_states=cond).sample.float()

    def eps(self, latents, t, cond, uncond) -> torch.Tensor:
        """Noise prediction with classifier-free guidance."""
        if self.guidance_scale == 1.0:
            return self.unet(latents, t, cond)
        u, c = self.unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond])).chunk(2)
        return u + self.guidance_scale * (c - u)

    def decode(self, latents) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable)."""
        vae = self.m.vae
        with self.autocast():
            images = vae.decode(latents / vae.config.scaling_factor).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, sample: bool) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (a sample of the posterior, or its mode)."""
        vae = self.m.vae
        with torch.no_grad(), self.autocast():
            dist = vae.encode(images * 2 - 1).latent_dist
            latents = dist.sample() if sample else dist.mode()
        return latents.float() * vae.config.scaling_factor

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """One seeded noise tensor per image (the same seeds give the same images, base or fine-tuned)."""
        noise = [torch.randn(self.m.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device) * self.scheduler.init_noise_sigma

    def denoise(self, latents, timesteps, cond, uncond) -> torch.Tensor:
        """DDIM steps over `timesteps`, without gradients."""
        with torch.no_grad():
            for t in timesteps:
                latents = self.scheduler.step(self.eps(latents, t, cond, uncond), t, latents).prev_sample
        return latents

    def sample(self, prompts: list[str], seeds: list[int], base: bool = False, cond=None, uncond=None) -> torch.Tensor:
        """The full chain without gradients -> images in [0, 1]; `base`: the frozen model (adapters off)."""
        if cond is None:
            cond, uncond = self.conditions(prompts)
        with torch.no_grad(), adapters_disabled(self.m.unet, base):
            return self.decode(self.denoise(self.initial_latents(seeds), self.scheduler.timesteps, cond, uncond))

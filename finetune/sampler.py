"""Sampling with the job's denoiser, for every pipeline layout: text conditioning, guided predictions, the
Gaussian transition x_t -> x_prev of each step, VAE decoding.

One `Sampler` per job; the losses, GRPO and the evaluation call it. The layouts differ in three places only:
- **conditioning** (`Cond`, from the pipeline's own `encode_prompt`): SD 1.x/2.x take the token embeddings;
  SDXL also the pooled embeddings of its second text encoder and the size/crop ids; SD3 the joint CLIP + T5
  context and the pooled CLIP projections;
- **the prediction**: noise (epsilon) for SD and SDXL, velocity (noise - x0) for SD3's flow matching;
- **the transition**: DDIM (Song et al. 2021, eq. 12) for SD and SDXL, where eta = 0 is deterministic and
  eta = 1 has the DDPM posterior's variance; for flow matching, the SDE with the ODE's marginals that
  Flow-GRPO samples with (eta is its noise level a, sigma_t = a sqrt(t / (1 - t))), where eta = 0 is the
  pipeline's Euler step.
Evaluation sampling is the eta = 0 chain of the same `transition`, so a trajectory and an evaluation never
disagree about the schedule. Nothing here keeps gradients except `model`/`predict` and `decode`, which the
losses differentiate through.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .pipeline import Models, adapters_disabled

T5_MAX_TOKENS = 128  # SD3's T5 context while training (Flow-GRPO's setting; the pipeline's default is 256)


@dataclass
class Cond:
    """A batch's text conditioning as the layout's denoiser takes it; indexable like a tensor (`cond[idx]`)."""

    embeds: torch.Tensor  # (B, tokens, width)
    pooled: Optional[torch.Tensor] = None  # SDXL, SD3: (B, width)
    time_ids: Optional[torch.Tensor] = None  # SDXL: (B, 6), original size, crop corner, target size

    def __getitem__(self, idx) -> "Cond":
        return Cond(*(None if v is None else v[idx] for v in (self.embeds, self.pooled, self.time_ids)))

    def __len__(self) -> int:
        return len(self.embeds)

    @staticmethod
    def cat(parts: list["Cond"]) -> "Cond":
        def join(vs):
            return None if vs[0] is None else torch.cat(vs)

        return Cond(join([p.embeds for p in parts]), join([p.pooled for p in parts]), join([p.time_ids for p in parts]))


# why: a step without noise (DDIM's last step when the schedule ends at alpha = 1, as SDXL's does) has no
# Gaussian density: GRPO does not train on it, and ReFL's KL there is measured on the predictions instead
MIN_STD = 1e-6


def ddim_x0(scheduler, eps: torch.Tensor, latents: torch.Tensor, k: int) -> torch.Tensor:
    """The clean latents a noise prediction at schedule step k implies (differentiable in `eps`)."""
    a_t = scheduler.alphas_cumprod[int(scheduler.timesteps[k])].to(latents.device)
    return (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def ddim_transition(scheduler, eps: torch.Tensor, latents: torch.Tensor, k: int, eta: float):
    """DDIM's Gaussian step from schedule index k for a noise prediction: (mean, std)."""
    t = int(scheduler.timesteps[k])
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t].to(latents.device)
    a_prev = scheduler.alphas_cumprod[prev_t].to(latents.device) if prev_t >= 0 else scheduler.final_alpha_cumprod.to(latents.device)
    x0 = ddim_x0(scheduler, eps, latents, k)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
    return mean, std


def flow_transition(scheduler, v: torch.Tensor, latents: torch.Tensor, k: int, eta: float):
    """The flow-matching SDE's Euler-Maruyama step from sigma_k to sigma_{k+1} for a velocity prediction:
    (mean, std). With x = (1 - t) x0 + t noise, the noise estimate is x + (1 - t) v and the score -(x + (1 - t) v) / t;
    the reverse SDE dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dW has the ODE's marginals.
    sigma_t = eta sqrt(t / (1 - t)), with t = 1 (pure noise) read as the next sigma of the schedule."""
    sigmas = scheduler.sigmas
    t, t_next = float(sigmas[k]), float(sigmas[k + 1])
    dt = t_next - t  # negative: towards the data
    t_noise = t if t < 1 else float(sigmas[1])
    sigma = eta * math.sqrt(t_noise / (1 - t_noise))
    mean = latents * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    return mean, torch.tensor(sigma * math.sqrt(-dt), device=latents.device)


def transition_kl(mean: torch.Tensor, base_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian transitions of one std (the policy's and the frozen base's), per element."""
    return (((mean - base_mean) ** 2) / (2 * std.clamp_min(1e-6) ** 2)).mean()


class Sampler:
    """The job's models with one chain: the evaluation chain (`num_inference_steps`, the models' scheduler) or,
    from `with_steps`, the training chain (`train_inference_steps`). `forward_passes` counts the images the
    denoiser has run on (classifier-free guidance's two branches count two): the steps' exact cost."""

    def __init__(self, models: Models, guidance_scale: float, device: torch.device, autocast: Callable[[], AbstractContextManager],
                 scheduler=None):
        self.m = models
        self.layout = models.layout
        self.guidance_scale = guidance_scale
        self.device = device
        self.autocast = autocast  # accelerator.autocast: mixed precision on a GPU, a no-op otherwise
        self.resolution = models.latent_shape[-1] * models.pipe.vae_scale_factor  # image side in pixels
        self.scheduler = scheduler if scheduler is not None else models.scheduler
        self.forward_passes = 0

    def with_steps(self, steps: int) -> "Sampler":
        """This sampler with a chain of `steps` steps (the same noise schedule, its own timesteps); itself when
        its chain has that many already."""
        if steps == self.num_steps:
            return self
        import copy

        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        return Sampler(self.m, self.guidance_scale, self.device, self.autocast, scheduler)

    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps)

    # ---- conditioning
    def conditions(self, prompts: list[str]) -> tuple[Cond, Cond]:
        """(cond, uncond) for classifier-free guidance, as the pipeline encodes them (SDXL's empty negative
        prompt is zeros when its config says so)."""
        pipe, n = self.m.pipe, len(prompts)
        with torch.no_grad():
            if self.layout == "sd":
                c, u = pipe.encode_prompt(prompts, self.device, 1, True)
                return Cond(c), Cond(u)
            extra = {"max_sequence_length": T5_MAX_TOKENS, "prompt_3": None} if self.layout == "sd3" else {}
            c, u, pc, pu = pipe.encode_prompt(prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, **extra)
        if self.layout == "sd3":
            return Cond(c, pc), Cond(u, pu)
        r = self.resolution  # SDXL's micro-conditioning: no crop, the original size is the target size
        ids = torch.tensor([[r, r, 0, 0, r, r]] * n, dtype=c.dtype, device=self.device)
        return Cond(c, pc, ids), Cond(u, pu, ids)

    def encode(self, prompts: list[str]) -> Cond:
        """The conditioning of `prompts` alone (no guidance)."""
        return self.conditions(prompts)[0]

    # ---- predictions
    def model(self, latents: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        """One denoiser forward at timestep(s) `t`, in float32 whatever the weight dtype: noise for SD/SDXL,
        velocity for SD3."""
        net = self.m.denoiser
        self.forward_passes += latents.shape[0]
        with self.autocast():
            if self.layout == "sd3":
                t = torch.as_tensor(t, device=self.device).expand(latents.shape[0])
                return net(hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled).sample.float()
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if self.layout == "sdxl" else None
            return net(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample.float()

    def predict(self, latents: torch.Tensor, k: int, cond: Cond, uncond: Cond) -> torch.Tensor:
        """The prediction at schedule step k, with classifier-free guidance."""
        t = self.scheduler.timesteps[k]
        if self.guidance_scale == 1.0:
            return self.model(latents, t, cond)
        u, c = self.model(torch.cat([latents] * 2), t, Cond.cat([uncond, cond])).chunk(2)
        return u + self.guidance_scale * (c - u)

    def transition(self, pred: torch.Tensor, latents: torch.Tensor, k: int, eta: float):
        """The Gaussian step x_t -> x_prev from schedule step k: (mean, std); std is 0 for eta = 0."""
        step = flow_transition if self.layout == "sd3" else ddim_transition
        return step(self.scheduler, pred, latents, k, eta)

    # ---- latents and images
    def decode(self, latents) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable)."""
        vae = self.m.vae
        with self.autocast():
            images = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, sample: bool, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (a sample of the posterior, drawn with `generator`, or its mode)."""
        vae = self.m.vae
        with torch.no_grad(), self.autocast():
            dist = vae.encode(images * 2 - 1).latent_dist
            latents = dist.sample(generator) if sample else dist.mode()
        return (latents.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        """One seeded noise tensor per image (the same seeds give the same images, base or fine-tuned)."""
        noise = [torch.randn(self.m.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def denoise(self, latents, cond, uncond, steps: Optional[int] = None) -> torch.Tensor:
        """The deterministic chain (eta = 0) over the first `steps` steps (default all), without gradients."""
        with torch.no_grad():
            for k in range(self.num_steps if steps is None else steps):
                latents, _ = self.transition(self.predict(latents, k, cond, uncond), latents, k, 0.0)
        return latents

    def sample(self, prompts: list[str], seeds: list[int], base: bool = False, cond=None, uncond=None) -> torch.Tensor:
        """The full chain without gradients -> images in [0, 1]; `base`: the frozen model (adapters off)."""
        if cond is None:
            cond, uncond = self.conditions(prompts)
        with torch.no_grad(), adapters_disabled(self.m.denoiser, base):
            return self.decode(self.denoise(self.initial_latents(seeds), cond, uncond))

"""One fine-tuning job, start to finish: spec -> models -> (resume) -> base evaluation -> loop -> save.

Methods (see README: Fine-tuning):
- `refl` (thesis, seed 001): sample with DDIM without gradients down to a random step index in
  `refl_step_range`, take that one step with gradients, predict x0, decode with the VAE, score with the
  differentiable reward; loss = alpha * (-reward | relu(2 - reward)) + beta * KL, where KL is between the
  LoRA model's and the frozen base model's Gaussian step at that t (the base is the same UNet with its
  adapter disabled, on the same input).
- `reward_weighted` (Lee et al., seed 002): sample images with the current model, score them, then
  minimise the denoising loss on them weighted by sigmoid(reward), plus a regulariser: the KL term, or the
  pre-training denoising loss on a folder of image-text pairs.
Checkpoints (LoRA + optimiser + metrics) every `checkpoint_every` steps make a killed job resumable.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .spec import JobSpec

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"


class JobCancelled(Exception):
    """Raised inside the loop when `should_stop` says so; the last state is checkpointed first."""


@dataclass
class JobContext:
    out_dir: Path
    reward: Callable  # reward(images (B,3,H,W) in [0,1], prompts) -> (B,), with .components(...)
    prompts: list[str]
    base_model: str  # 'tiny', a hub id, or a local pipeline directory (already checked by the caller)
    cache_dir: Path
    pretrain_dir: Optional[Path] = None
    device: str = "auto"
    on_progress: Optional[Callable[[dict], None]] = None
    should_stop: Optional[Callable[[], bool]] = None
    metrics: dict = field(default_factory=lambda: {"reward": [], "loss": [], "kl": []})


def load_pipeline(base_model: str, cache_dir: Path):
    from diffusers import StableDiffusionPipeline

    from .tiny import ensure_tiny_sd

    path = str(ensure_tiny_sd(cache_dir)) if base_model == "tiny" else base_model
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def run_job(spec: JobSpec, ctx: JobContext) -> dict:
    """Run (or resume) the job; returns {"status", "metrics", "artifacts"}. Raises JobCancelled."""
    from diffusers import DDIMScheduler
    from peft import LoraConfig
    from tqdm.auto import tqdm

    from accelerate import Accelerator

    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Under `accelerate launch` every process takes its own GPU and its own share of the prompts, and the
    # LoRA gradients are averaged across processes after each backward; one process alone is the plain case.
    accelerator = Accelerator(cpu=ctx.device == "cpu")
    device = accelerator.device if ctx.device in ("auto", "cpu") else torch.device(ctx.device)
    main = accelerator.is_main_process
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.mixed_precision) if device.type == "cuda" else None

    # ---- models: frozen pipeline, LoRA adapters on the UNet attention projections
    pipe = load_pipeline(ctx.base_model, ctx.cache_dir)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).to(device)
    torch.manual_seed(spec.seed)
    unet.add_adapter(LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, init_lora_weights="gaussian",
                                target_modules=spec.target_modules))
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(spec.num_inference_steps, device=device)
    scale = pipe.vae_scale_factor
    if spec.resolution % scale:
        raise ValueError(f"resolution {spec.resolution} is not a multiple of the VAE scale factor {scale}")
    latent_shape = (unet.config.in_channels, spec.resolution // scale, spec.resolution // scale)

    def encode_text(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            return text_encoder(ids)[0]

    def eps(latents, t, cond, uncond):
        """Noise prediction with classifier-free guidance."""
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if spec.guidance_scale == 1.0:
                return unet(latents, t, encoder_hidden_states=cond).sample.float()
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
        u, c = out.chunk(2)
        return u + spec.guidance_scale * (c - u)

    def decode(latents):
        return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    def initial_latents(seeds: list[int]) -> torch.Tensor:
        """One seeded noise tensor per image (the same seeds give the same images, base or fine-tuned)."""
        noise = [torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(device) * scheduler.init_noise_sigma

    def denoise(latents, timesteps, cond, uncond) -> torch.Tensor:
        """DDIM steps over `timesteps`, without gradients."""
        with torch.no_grad():
            for t in timesteps:
                latents = scheduler.step(eps(latents, t, cond, uncond), t, latents).prev_sample
        return latents

    def sample(prompts: list[str], seeds: list[int], base: bool = False, cond=None, uncond=None) -> torch.Tensor:
        """The full chain without gradients -> images in [0, 1]; pass `cond`/`uncond` when already encoded."""
        if cond is None:
            cond, uncond = encode_text(prompts), encode_text([""] * len(prompts))
        with torch.no_grad(), adapters_disabled(unet, base):
            return decode(denoise(initial_latents(seeds), scheduler.timesteps, cond, uncond))

    def step_kl(latents, t, cond, uncond, e):
        """KL between the LoRA and base Gaussian steps x_t -> x_prev (DDIM with eta = 1 variance); both
        means are linear in the noise prediction, so KL = c^2 |e - e_base|^2 / (2 sigma^2), per element."""
        with torch.no_grad(), adapters_disabled(unet, True):
            e_base = eps(latents, t, cond, uncond)
        prev_t = int(t) - scheduler.config.num_train_timesteps // spec.num_inference_steps
        a_t = scheduler.alphas_cumprod[int(t)].to(device)
        a_prev = scheduler.alphas_cumprod[prev_t].to(device) if prev_t >= 0 else scheduler.final_alpha_cumprod.to(device)
        sigma2 = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(1e-12)
        c = -a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt() + (1 - a_prev - sigma2).clamp_min(0).sqrt()
        return (c**2 / (2 * sigma2)) * ((e - e_base) ** 2).mean()

    pretrain = _load_pretrain_pairs(ctx.pretrain_dir) if ctx.pretrain_dir is not None else []

    def pretrain_loss(step: int) -> torch.Tensor:
        """The pre-training denoising loss on user-supplied image-text pairs (keeps the model's skills)."""
        batch = [pretrain[(step * spec.batch_size + k) % len(pretrain)] for k in range(spec.batch_size)]
        images = torch.stack([_image_tensor(p, spec.resolution) for p, _ in batch]).to(device)
        with torch.no_grad():
            latents = vae.encode(images * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
        return denoising_loss(latents, encode_text([c for _, c in batch]))[0].mean()

    def denoising_loss(latents, cond):
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = unet(noisy, t, encoder_hidden_states=cond).sample.float()
        return ((pred - noise) ** 2).mean(dim=(1, 2, 3)), (noisy, t, pred)

    # ---- resume from the last checkpoint, if any
    start, base_eval = _resume(out, unet, optimizer, ctx.metrics)
    ctx.metrics["processes"] = accelerator.num_processes
    eval_prompts = spec.eval_prompts or ctx.prompts[:4]
    eval_p = [p for p in eval_prompts for _ in range(spec.eval_images_per_prompt)]
    eval_seeds = [10_000 + k for k in range(len(eval_p))]
    if base_eval is None and main:  # the base model's evaluation, once, before any update
        base_images = sample(eval_p, eval_seeds, base=True)
        base_eval = _summarise(ctx.reward.components(base_images, eval_p))
        _save_images(base_images, out / "samples", "base")

    # ---- loop
    t0, first = time.perf_counter(), start
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc=f"{spec.method} job", mininterval=1.0,
               disable=not main)
    for step in bar:
        if ctx.should_stop is not None and ctx.should_stop():
            if main:
                _checkpoint(out, step, unet, optimizer, ctx.metrics, base_eval)
            raise JobCancelled(f"cancelled at step {step}")
        rng = random.Random(spec.seed * 1_000_003 + step + 7_919 * accelerator.process_index)
        first_prompt = (step * accelerator.num_processes + accelerator.process_index) * spec.batch_size
        prompts = [ctx.prompts[(first_prompt + k) % len(ctx.prompts)] for k in range(spec.batch_size)]
        seeds = [rng.randrange(2**31) for _ in prompts]
        cond, uncond = encode_text(prompts), encode_text([""] * len(prompts))
        unet.train()
        if spec.method == "refl":
            stop = rng.randrange(*spec.refl_step_range)
            latents = denoise(initial_latents(seeds), scheduler.timesteps[:stop], cond, uncond)
            t = scheduler.timesteps[stop]
            e = eps(latents, t, cond, uncond)  # the one step with gradients
            a_t = scheduler.alphas_cumprod[int(t)].to(device)
            x0 = (latents - (1 - a_t).sqrt() * e) / a_t.sqrt()
            reward = ctx.reward(decode(x0), prompts)
            reward_term = F.relu(2 - reward).mean() if spec.reward_loss == "hinge" else -reward.mean()
            kl = step_kl(latents, t, cond, uncond, e) if spec.kl_weight > 0 else torch.zeros((), device=device)
            loss = spec.reward_weight * reward_term + spec.kl_weight * kl
            if pretrain:
                loss = loss + spec.pretrain_weight * pretrain_loss(step)
        else:  # reward_weighted
            with torch.no_grad():
                images = sample(prompts, seeds, cond=cond, uncond=uncond)
                reward = ctx.reward(images, prompts).detach().to(device)
                latents0 = vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
            per_image, (noisy, t, pred) = denoising_loss(latents0, cond)
            loss = spec.reward_weight * (torch.sigmoid(reward) * per_image).mean()
            kl = torch.zeros((), device=device)
            if spec.regularizer == "kl" and spec.kl_weight > 0:
                with torch.no_grad(), adapters_disabled(unet, True):
                    base_pred = unet(noisy, t, encoder_hidden_states=cond).sample.float()
                kl = ((pred - base_pred) ** 2).mean()
                loss = loss + spec.kl_weight * kl
            elif spec.regularizer == "pretrain" and pretrain:
                loss = loss + spec.pretrain_weight * pretrain_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if accelerator.num_processes > 1:
            for p in params:  # data parallel: every process applies the mean gradient, so the LoRAs stay equal
                p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
            reward, loss, kl = (accelerator.reduce(x.detach().mean(), reduction="mean") for x in (reward, loss, kl))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ctx.metrics["reward"].append(float(reward.detach().mean()))
        ctx.metrics["loss"].append(float(loss.detach()))
        ctx.metrics["kl"].append(float(kl.detach()))
        done = step + 1
        eta = (time.perf_counter() - t0) / (done - first) * (spec.steps - done)
        bar.set_postfix(reward=f"{ctx.metrics['reward'][-1]:.3f}", loss=f"{ctx.metrics['loss'][-1]:.3f}")
        if done % spec.checkpoint_every == 0 and done < spec.steps and main:
            _checkpoint(out, done, unet, optimizer, ctx.metrics, base_eval)
        if ctx.on_progress is not None and main:
            ctx.on_progress({"step": done, "total": spec.steps, "eta_s": round(eta, 1)})

    # ---- save (main process): LoRA in the diffusers format, metrics, samples, report
    accelerator.wait_for_everyone()
    if not main:  # the main process writes the artifacts
        return {"status": "succeeded", "metrics": ctx.metrics, "artifacts": [], "main_process": False}
    unet.eval()
    tuned_images = sample(eval_p, eval_seeds)
    tuned_eval = _summarise(ctx.reward.components(tuned_images, eval_p))
    _save_images(tuned_images, out / "samples", "tuned")
    save_lora(unet, out)
    base_images = torch.stack([_image_tensor(p, spec.resolution) for p in sorted((out / "samples").glob("base-*.png"))])
    metrics = {**ctx.metrics, "eval": {"prompts": eval_prompts, "base": base_eval, "tuned": tuned_eval}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from .report import write_report

    write_report(out / "report.png", ctx.metrics, base_images, tuned_images.cpu(), base_eval, tuned_eval)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"status": "succeeded", "metrics": metrics, "artifacts": artifact_names(out), "main_process": True}


class adapters_disabled:
    """Context manager: the UNet without its LoRA (the frozen base model) when `enabled`."""

    def __init__(self, unet, enabled: bool):
        self.unet, self.enabled = unet, enabled

    def __enter__(self):
        if self.enabled:
            self.unet.disable_adapters()

    def __exit__(self, *exc):
        if self.enabled:
            self.unet.enable_adapters()


def save_lora(unet, out: Path) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True, weight_name=LORA_FILE)
    return out / LORA_FILE


def artifact_names(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts)


def _checkpoint(out: Path, step: int, unet, optimizer, metrics: dict, base_eval: dict) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = out / "checkpoints"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}, tmp / "lora.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "metrics": metrics, "base_eval": base_eval}))
    final = root / f"step-{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint exists whole or not at all
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _resume(out: Path, unet, optimizer, metrics: dict) -> tuple[int, Optional[dict]]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        return 0, None
    last = ckpts[-1]
    set_peft_model_state_dict(unet, load_file(last / "lora.safetensors"))
    optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
    state = json.loads((last / "state.json").read_text())
    metrics.clear()
    metrics.update(state["metrics"])
    metrics.setdefault("resumed_at", []).append(int(state["step"]))  # shows the job did not restart from zero
    log.warning("resuming from %s", last)
    return int(state["step"]), state["base_eval"]


def _summarise(components: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per scorer: mean and standard error over the evaluation images."""
    out = {}
    for name, values in components.items():
        v = values.float()
        se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
        out[name] = {"mean": float(v.mean()), "se": se}
    return out


def _save_images(images: torch.Tensor, folder: Path, prefix: str) -> None:
    from torchvision.transforms.functional import to_pil_image

    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images.detach().float().cpu()):
        to_pil_image(img).save(folder / f"{prefix}-{k:03d}.png")


def _image_tensor(path: Path, resolution: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as im:
        im = TF.center_crop(TF.resize(im.convert("RGB"), resolution), resolution)
        return TF.to_tensor(im)


def _load_pretrain_pairs(folder: Path) -> list[tuple[Path, str]]:
    pairs = []
    for img in sorted(folder.iterdir()):
        if img.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and img.with_suffix(".txt").is_file():
            pairs.append((img, img.with_suffix(".txt").read_text().strip()))
    if not pairs:
        raise ValueError(f"pretrain_data {folder}: no image with a caption file (x.png + x.txt)")
    return pairs

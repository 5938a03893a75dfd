"""Model setup for a job: the frozen diffusers pipeline, LoRA adapters on the UNet, the optimiser.

As in diffusers' LoRA training example: every frozen module is cast to the weight dtype of the mixed
precision (fp16/bf16 on a GPU, float32 otherwise) and only the LoRA parameters train, in float32.
The frozen base model is the same UNet with its adapters disabled (`adapters_disabled`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .spec import JobSpec, is_hub_id

LORA_FILE = "pytorch_lora_weights.safetensors"
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass
class Models:
    pipe: object  # the StableDiffusionPipeline (tokenizer, text encoder, VAE, UNet, scheduler config)
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # a DDIMScheduler with the job's timesteps set
    params: list[torch.nn.Parameter]  # the LoRA parameters, the only ones that train
    optimizer: torch.optim.Optimizer
    latent_shape: tuple[int, int, int]


def load_pipeline(base_model: str, cache_dir: Path):
    """`base_model` as `prepare_job` resolved it: 'tiny', a hub id, or an absolute local pipeline directory.

    A hub id is fetched into (or, offline, read from) the hub cache first and loaded from there: given the
    id itself, `from_pretrained` would load a directory of that name relative to the working directory."""
    from diffusers import StableDiffusionPipeline

    from .tiny import ensure_tiny_sd

    if base_model == "tiny":
        path = str(ensure_tiny_sd(cache_dir))
    elif Path(base_model).is_absolute():
        path = base_model
    elif is_hub_id(base_model):
        try:
            path = StableDiffusionPipeline.download(base_model)
        except Exception as e:  # offline, unknown, gated: one clear error, without the cache's paths
            raise ValueError(f"base_model {base_model!r}: cannot get it from the hub or the hub cache ({type(e).__name__})") from e
    else:
        raise ValueError(f"base_model {base_model!r} is not 'tiny', a hub id or an absolute pipeline directory")
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def setup_models(spec: JobSpec, base_model: str, cache_dir: Path, device: torch.device, weight_dtype: torch.dtype) -> Models:
    from diffusers import DDIMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    pipe = load_pipeline(base_model, cache_dir)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for m in (unet, vae, text_encoder):  # frozen, in the weight dtype: only the adapters train
        m.requires_grad_(False).to(device, dtype=weight_dtype)
    torch.manual_seed(spec.seed)
    unet.add_adapter(LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, init_lora_weights="gaussian",
                                target_modules=spec.target_modules))
    cast_training_params(unet, dtype=torch.float32)  # why: optimiser steps on half-precision weights underflow
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(spec.num_inference_steps, device=device)
    scale = pipe.vae_scale_factor
    if spec.resolution % scale:
        raise ValueError(f"resolution {spec.resolution} is not a multiple of the VAE scale factor {scale}")
    return Models(pipe, unet, vae, text_encoder, pipe.tokenizer, scheduler, params,
                  torch.optim.AdamW(params, lr=spec.learning_rate),
                  (unet.config.in_channels, spec.resolution // scale, spec.resolution // scale))


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
    """The adapters in the diffusers LoRA format: `pipe.load_lora_weights(out)` loads them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True, weight_name=LORA_FILE)
    return out / LORA_FILE

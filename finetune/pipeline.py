"""Model setup for a job: the frozen diffusers pipeline, LoRA adapters on the UNet, the optimiser.

As in diffusers' LoRA training example: every frozen module is cast to the weight dtype of the mixed
precision (fp16/bf16 on a GPU, float32 otherwise) and only the LoRA parameters train, in float32.
The frozen base model is the same denoiser with its adapters disabled (`adapters_disabled`).

Pipelines come in three layouts (`pipeline_layout`, from model_index.json's `_class_name`): "sd"
(StableDiffusionPipeline: SD 1.x and 2.x), "sdxl" (StableDiffusionXLPipeline) and "sd3"
(StableDiffusion3Pipeline, flow matching; its denoiser is `pipe.transformer`, not `pipe.unet`).
`load_pipeline` loads any of them (the built-in `tiny`, `tiny-sdxl`, `tiny-sd3`, a hub id, a directory);
`save_lora` writes the adapters in the diffusers LoRA format of the layout, which the pipeline's own
`load_lora_weights` reads. Any other layout is a ValueError that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .spec import JobSpec, is_hub_id

LORA_FILE = "pytorch_lora_weights.safetensors"
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}

Layout = Literal["sd", "sdxl", "sd3"]
LAYOUTS: dict[str, Layout] = {  # model_index.json `_class_name` -> layout
    "StableDiffusionPipeline": "sd",  # SD 1.x and 2.x (v-prediction is in the scheduler config)
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
PIPELINE_CLASSES: dict[str, str] = {layout: name for name, layout in LAYOUTS.items()}
KNOWN_UNSUPPORTED = {"FluxPipeline": "flux"}  # known layouts that jobs cannot fine-tune (yet)


@dataclass
class Models:
    pipe: object  # the diffusers pipeline: text encoders and tokenizers (its `encode_prompt`), VAE, denoiser
    layout: Layout
    denoiser: torch.nn.Module  # the UNet (sd, sdxl) or SD3's transformer; it carries the LoRA
    vae: torch.nn.Module
    scheduler: object  # DDIM (sd, sdxl) or flow-matching Euler (sd3), with the job's timesteps set
    params: list[torch.nn.Parameter]  # the LoRA parameters, the only ones that train
    optimizer: torch.optim.Optimizer
    latent_shape: tuple[int, int, int]


def pipeline_layout(path_or_pipe, name: str | None = None) -> Layout:
    """"sd", "sdxl" or "sd3" for a pipeline directory (or its model_index.json), a loaded pipeline, or a
    model_index dict, from its `_class_name`; anything else is a ValueError naming the layout and the
    supported ones. `name` is what the message calls the model (default: the directory's name, never its
    full path)."""
    import json

    if isinstance(path_or_pipe, dict):
        index = path_or_pipe
    elif isinstance(path_or_pipe, (str, Path)):
        path = Path(path_or_pipe)
        index_file = path if path.name == "model_index.json" else path / "model_index.json"
        name = name if name is not None else (path.parent if path.name == "model_index.json" else path).name
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"base_model {name!r}: no readable model_index.json, not a diffusers pipeline") from e
    else:
        index = dict(getattr(path_or_pipe, "config", None) or {})
        index.setdefault("_class_name", type(path_or_pipe).__name__)
        name = name if name is not None else (index.get("_name_or_path") and Path(str(index["_name_or_path"])).name
                                              or type(path_or_pipe).__name__)
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name in LAYOUTS:
        return LAYOUTS[class_name]
    supported = ", ".join(f"{c} ({l})" for c, l in LAYOUTS.items())
    known = (f" (a {KNOWN_UNSUPPORTED[class_name]} pipeline: known, but jobs cannot fine-tune it)"
             if class_name in KNOWN_UNSUPPORTED else "")
    raise ValueError(f"base_model {name!r}: unsupported pipeline layout {class_name!r}{known}; supported: {supported}")


# the built-ins, the keys of tiny.TINY_PIPELINES, by layout (known without building them)
TINY_LAYOUTS: dict[str, Layout] = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3"}


def base_model_layout(base_model: str, name: str | None = None) -> Layout | None:
    """The layout of a resolved `base_model` without loading or downloading anything, for job preparation
    (a ValueError there is a 422): a tiny built-in's; a directory's (`pipeline_layout`); a hub id's when
    its model_index.json is in the hub cache; None for a hub id not cached yet (`load_pipeline` checks it
    after the download). An unsupported layout is a ValueError; `name` is what its message calls the model."""
    if base_model in TINY_LAYOUTS:
        return TINY_LAYOUTS[base_model]
    if Path(base_model).is_absolute():
        return pipeline_layout(base_model, name)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(base_model, "model_index.json")
    except Exception:  # not a valid repo id for the cache: load_pipeline says so
        return None
    return pipeline_layout(cached, name or base_model) if isinstance(cached, str) else None


def load_pipeline(base_model: str, cache_dir: Path):
    """`base_model` as `prepare_job` resolved it: 'tiny', 'tiny-sdxl', 'tiny-sd3', a hub id, or an absolute
    local pipeline directory; a pipeline of a supported layout (`pipeline_layout`), else a ValueError.

    A hub id is fetched into (or, offline, read from) the hub cache first and loaded from there: given the
    id itself, `from_pretrained` would load a directory of that name relative to the working directory."""
    import diffusers

    from .tiny import TINY_PIPELINES

    if base_model in TINY_PIPELINES:
        path, name = str(TINY_PIPELINES[base_model](cache_dir)), base_model
    elif Path(base_model).is_absolute():
        path, name = base_model, Path(base_model).name
    elif is_hub_id(base_model):
        try:
            path, name = diffusers.DiffusionPipeline.download(base_model), base_model
        except Exception as e:  # offline, unknown, gated: one clear error, without the cache's paths
            raise ValueError(f"base_model {base_model!r}: cannot get it from the hub or the hub cache ({type(e).__name__})") from e
    else:
        raise ValueError(f"base_model {base_model!r} is not one of {', '.join(map(repr, TINY_PIPELINES))}, "
                         "a hub id or an absolute pipeline directory")
    layout = pipeline_layout(path, name)
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if layout == "sd" else {}
    return getattr(diffusers, PIPELINE_CLASSES[layout]).from_pretrained(path, **kwargs)


def setup_models(spec: JobSpec, base_model: str, cache_dir: Path, device: torch.device, weight_dtype: torch.dtype) -> Models:
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    pipe = load_pipeline(base_model, cache_dir)
    layout = pipeline_layout(pipe)
    denoiser = pipe.transformer if layout == "sd3" else pipe.unet
    for m in pipe.components.values():  # frozen, in the weight dtype: only the adapters train
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).to(device, dtype=weight_dtype)
    torch.manual_seed(spec.seed)
    denoiser.add_adapter(LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=spec.target_modules))
    cast_training_params(denoiser, dtype=torch.float32)  # why: optimiser steps on half-precision weights underflow
    if spec.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    # why our own schedulers: the trainer takes its steps itself (sampler.transition), with a variance DDIM
    # and the flow SDE define; the pipeline's scheduler config gives the noise schedule
    scheduler_class = FlowMatchEulerDiscreteScheduler if layout == "sd3" else DDIMScheduler
    scheduler = scheduler_class.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(spec.num_inference_steps, device=device)
    scale = pipe.vae_scale_factor
    if spec.resolution % scale:
        raise ValueError(f"resolution {spec.resolution} is not a multiple of the VAE scale factor {scale}")
    return Models(pipe, layout, denoiser, pipe.vae, scheduler, params, torch.optim.AdamW(params, lr=spec.learning_rate),
                  (denoiser.config.in_channels, spec.resolution // scale, spec.resolution // scale))


class adapters_disabled:
    """Context manager: the denoiser without its LoRA (the frozen base model) when `enabled`."""

    def __init__(self, denoiser, enabled: bool):
        self.denoiser, self.enabled = denoiser, enabled

    def __enter__(self):
        if self.enabled:
            self.denoiser.disable_adapters()

    def __exit__(self, *exc):
        if self.enabled:
            self.denoiser.enable_adapters()


def model_layout(model) -> Layout:
    """The layout a denoiser belongs to: an SD3Transformer2DModel is "sd3"; a UNet with SDXL's
    "text_time" added conditioning is "sdxl"; any other UNet2DConditionModel is "sd"."""
    config = getattr(model, "config", {})
    if type(model).__name__ == "SD3Transformer2DModel":
        return "sd3"
    if type(model).__name__ != "UNet2DConditionModel":
        raise ValueError(f"no LoRA layout for a {type(model).__name__}: "
                         "expected a UNet2DConditionModel or an SD3Transformer2DModel")
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def save_lora(model, out: Path, layout: Layout | None = None, adapter_name: str = "default") -> Path:
    """The adapters of `model` (the pipeline's UNet, or SD3's transformer) in the diffusers LoRA format of
    `layout` (default: `model_layout(model)`), as `out/LORA_FILE`: that layout's `pipe.load_lora_weights(out)`
    loads them. The adapter's LoraConfig goes along as metadata, so loading keeps its lora_alpha (without it,
    diffusers would assume lora_alpha == r)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layout = layout or model_layout(model)
    if layout not in PIPELINE_CLASSES:
        raise ValueError(f"unsupported pipeline layout {layout!r}; supported: {', '.join(PIPELINE_CLASSES)}")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter_name))
    metadata = model.peft_config[adapter_name].to_dict()
    component = "transformer" if layout == "sd3" else "unet"
    getattr(diffusers, PIPELINE_CLASSES[layout]).save_lora_weights(
        out, **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": metadata},
        safe_serialization=True, weight_name=LORA_FILE)
    return Path(out) / LORA_FILE

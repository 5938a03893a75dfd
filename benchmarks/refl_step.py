"""Seconds per ReFL step and peak memory, for the tiny pipeline on the CPU, or an SD-1.5-sized random
UNet/VAE/text encoder at 512 px on a GPU (the thesis's budget: under 16 GB with gradient checkpointing).

    python benchmarks/refl_step.py --model tiny --resolution 64 --steps 12
    python benchmarks/refl_step.py --model sd15-random --resolution 512 --steps 10 --gradient-checkpointing --mixed-precision bf16

Runs `t2i_reward.finetune.run_job` with in-process rewards from the matching profile (tiny, or random-full) and
times the steps from the progress callbacks (the median step, so loading and evaluation do not count).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.finetune import JobContext, JobSpec, run_job  # noqa: E402
from t2i_reward.finetune.rewards import LocalReward  # noqa: E402
from t2i_reward.rewarders import create_rewarder  # noqa: E402


def sd15_random(out: Path) -> Path:
    """A random pipeline with Stable Diffusion 1.5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from t2i_reward.finetune.tiny import clip_tokenizer_files
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                        projection_dim=768, hidden_act="quick_gelu"))
    clip_tokenizer_files(out / "tok")
    tok = CLIPTokenizer(str(out / "tok/vocab.json"), str(out / "tok/merges.txt"), model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out / "pipe")
    return out / "pipe"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "sd15-random"], default="tiny")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--num-inference-steps", type=int, default=40)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refl-bench-"))
    base = "tiny" if args.model == "tiny" else str(sd15_random(work))
    rewarder = create_rewarder(profile="tiny" if args.model == "tiny" else "random-full")
    spec = JobSpec(method="refl", base_model=base, prompts=["a photo of a cat on a red sofa"], steps=args.steps,
                   resolution=args.resolution, num_inference_steps=args.num_inference_steps,
                   refl_step_range=(int(args.num_inference_steps * 0.75), args.num_inference_steps),
                   gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
                   checkpoint_every=10_000, eval_images_per_prompt=1)
    stamps: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_job(spec, JobContext(out_dir=work / "out", reward=LocalReward(rewarder), prompts=spec.prompts, base_model=base,
                             cache_dir=rewarder.config.cache_dir, on_progress=lambda p: stamps.append(time.perf_counter())))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {"model": args.model, "resolution": args.resolution, "num_inference_steps": args.num_inference_steps,
              "gradient_checkpointing": args.gradient_checkpointing, "mixed_precision": args.mixed_precision,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "median_s_per_step": statistics.median(steps),
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Seconds per GRPO step, images sampled per second, peak memory, and where a step's time goes (sampling
with log-probabilities, rewards, the PPO update), for a tiny pipeline on the CPU or a full-size random one
on a GPU.

    python benchmarks/grpo_step.py --model tiny --steps 6
    python benchmarks/grpo_step.py --model tiny-sd3 --steps 6
    python benchmarks/grpo_step.py --model sd15-random --resolution 512 --steps 4 --gradient-checkpointing --mixed-precision bf16
    python benchmarks/grpo_step.py --model sd3-medium-random --resolution 512 --steps 4 --gradient-checkpointing --mixed-precision bf16

Runs `t2i_reward.finetune.run_job` (method grpo) with in-process rewards of the matching profile (tiny, or
random-full) and times the steps from the progress callbacks (the median step: loading and evaluation do
not count). The phases are timed by wrapping the sampler and the reward for the run. Prints one JSON object.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from refl_step import sd15_random  # noqa: E402
from t2i_reward.finetune import JobContext, JobSpec, grpo, run_job  # noqa: E402
from t2i_reward.finetune.rewards import LocalReward  # noqa: E402
from t2i_reward.rewarders import create_rewarder  # noqa: E402

TINY = ("tiny", "tiny-sdxl", "tiny-sd3")


def sd3_medium_random(out: Path) -> Path:
    """A random pipeline with SD3-medium's architecture: a 24-block MMDiT (1536 wide), the 16-channel VAE,
    CLIP ViT-L and ViT-bigG text encoders and a T5-XXL encoder. Build it on a machine with memory to spare."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from t2i_reward.finetune.tiny import _clip_tokenizers, t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2, sample_size=1024,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)

    def clip(hidden, layers, heads, inter):
        return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                                          num_attention_heads=heads, projection_dim=hidden, hidden_act="gelu"))

    tok, tok2 = _clip_tokenizers(out / "tok")
    tok3 = t5_tokenizer(32128)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=clip(768, 12, 12, 3072), tokenizer=tok, text_encoder_2=clip(1280, 32, 20, 5120),
                             tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3).save_pretrained(out / "pipe")
    return out / "pipe"


class Timer:
    def __init__(self):
        self.s = {"sampling": 0.0, "rewards": 0.0}

    def wrap(self, key, fn):
        def timed(*a, **kw):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync()
                self.s[key] += time.perf_counter() - t
        return timed


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=[*TINY, "sd15-random", "sd3-medium-random"], default="tiny")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--num-inference-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    args = ap.parse_args()
    if args.model not in TINY:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    builders = {"sd15-random": sd15_random, "sd3-medium-random": sd3_medium_random}
    base = args.model if args.model in TINY else str(builders[args.model](work))
    rewarder = create_rewarder(profile="tiny" if args.model in TINY else "random-full")
    spec = JobSpec(method="grpo", base_model=base, prompts=["a photo of a cat on a red sofa", "a lighthouse at dusk"],
                   steps=args.steps, resolution=args.resolution, num_inference_steps=args.num_inference_steps,
                   batch_size=args.batch_size, group_size=args.group_size, guidance_scale=4.5,
                   gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
                   checkpoint_every=10_000, eval_images_per_prompt=1, eval_prompts=["a photo of a cat on a red sofa"])
    timer, reward = Timer(), LocalReward(rewarder)
    grpo.sample_with_logprobs = timer.wrap("sampling", grpo.sample_with_logprobs)
    reward.scores = timer.wrap("rewards", reward.scores)
    stamps: list[tuple[float, dict]] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_job(spec, JobContext(out_dir=work / "out", reward=reward, prompts=spec.prompts, base_model=base,
                             cache_dir=rewarder.config.cache_dir,
                             on_progress=lambda p: stamps.append((time.perf_counter(), dict(timer.s)))))
    steps = [(b[0] - a[0], {k: b[1][k] - a[1][k] for k in a[1]}) for a, b in zip(stamps, stamps[1:])]
    median = statistics.median(s for s, _ in steps)
    phases = {k: statistics.median(p[k] for _, p in steps) for k in timer.s}
    phases["training"] = max(0.0, median - sum(phases.values()))
    images = args.batch_size * args.group_size
    result = {"model": args.model, "resolution": args.resolution, "num_inference_steps": args.num_inference_steps,
              "images_per_step": images, "gradient_checkpointing": args.gradient_checkpointing,
              "mixed_precision": args.mixed_precision, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads(), "median_s_per_step": round(median, 3),
              "images_sampled_per_s": round(images / phases["sampling"], 2) if phases["sampling"] else None,
              "phases_s": {k: round(v, 3) for k, v in phases.items()},
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

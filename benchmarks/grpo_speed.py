"""GRPO at the field's speed (docs/finetuning.md): what the shorter training chain, the SDE window, the shared
group prefix and streamed rewards save, in denoiser forward passes (exact: `metrics.forward_passes`) and in
seconds per optimiser step (this machine's).

    python benchmarks/grpo_speed.py settings --models tiny tiny-sdxl tiny-sd3 --steps 4
    python benchmarks/grpo_speed.py learning --model tiny --steps 30
    python benchmarks/grpo_speed.py streaming --model tiny --steps 4 --micro-batches 1 2 4
    # with a GPU: SD-1.5- and SD3-medium-sized random pipelines (built by benchmarks/grpo_step.py's builders)
    python benchmarks/grpo_speed.py settings --models sd15-random sd3-medium-random --resolution 512 --steps 3 --mixed-precision bf16

- `settings`: one short GRPO job per model and setting (the whole 20-step chain, as before; a 10-step training
  chain; a 3-transition window on it; that window drawn per step with one starting noise per group): forward
  passes per step and the median seconds per step (loading and evaluation excluded).
- `learning`: the colour reward (`redness`, rewarders/testing.py: the share of red, in-process), the whole chain against a window on a shorter
  training chain: the reward gained (the tuned model's evaluation minus the base's, on the same seeds) per
  thousand forward passes.
- `streaming`: the rewards from a reward service in another process (`t2i-reward serve`, tiny profile), scored
  after sampling against streamed while sampling, at 1, 2 and 4 sampling micro-batches.
Prints one JSON object per job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import sd3_medium_random  # noqa: E402
from refl_step import sd15_random  # noqa: E402
from t2i_reward.finetune import JobContext, JobSpec, run_job  # noqa: E402
from t2i_reward.finetune.rewards import LocalReward, RemoteReward  # noqa: E402
from t2i_reward.rewarders import create_rewarder  # noqa: E402
from t2i_reward.rewarders.config import DEFAULT_CACHE  # noqa: E402
from t2i_reward.rewarders.testing import Redness  # noqa: E402,F401 (registers `redness`)

TINY = ("tiny", "tiny-sdxl", "tiny-sd3")
PROMPTS = ["a photo of a cat on a sofa", "a lighthouse at dusk"]

# name -> the spec fields of the setting, on a 20-step evaluation chain
SETTINGS = {
    "whole chain (before)": {},
    "train_inference_steps 10": {"train_inference_steps": 10},
    "+ sde_window [0, 3)": {"train_inference_steps": 10, "sde_window": [0, 3]},
    "+ random window, group_initial_noise": {"train_inference_steps": 10, "sde_window": [0, 3], "sde_window_schedule": "random",
                                             "sde_window_range": [0, 5], "group_initial_noise": True},
}


def base_model(name: str, work: Path) -> str:
    builders = {"sd15-random": sd15_random, "sd3-medium-random": sd3_medium_random}
    return name if name in TINY else str(builders[name](work))


def job(base: str, reward, work: Path, **fields) -> dict:
    """Run one GRPO job; its metrics, and the median seconds per step from the progress callbacks."""
    spec = JobSpec(**{"method": "grpo", "base_model": base, "prompts": PROMPTS, "checkpoint_every": 10_000,
                      "eval_images_per_prompt": 1, "eval_prompts": PROMPTS[:1], **fields})
    stamps: list[float] = []
    out = run_job(spec, JobContext(out_dir=work, reward=reward, prompts=spec.prompts, base_model=base,
                                   cache_dir=DEFAULT_CACHE,
                                   on_progress=lambda p: stamps.append(time.perf_counter())))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    out["median_s_per_step"] = round(statistics.median(steps), 3) if steps else None
    return out


def settings(args) -> None:
    for name in args.models:
        work = Path(tempfile.mkdtemp(prefix="grpo-speed-"))
        base = base_model(name, work)
        rewarder = create_rewarder(profile="tiny" if name in TINY else "random-full")
        for label, fields in SETTINGS.items():
            out = job(base, LocalReward(rewarder), work / label.replace(" ", "_"), steps=args.steps, resolution=args.resolution,
                      num_inference_steps=20, batch_size=args.batch_size, group_size=args.group_size, guidance_scale=4.5,
                      mixed_precision=args.mixed_precision, gradient_checkpointing=name not in TINY, **fields)
            print(json.dumps({"model": name, "setting": label, "forward_passes_per_step": out["metrics"]["forward_passes"][0],
                              "median_s_per_step": out["median_s_per_step"], "device": device(), "threads": torch.get_num_threads()}),
                  flush=True)


def learning(args) -> None:
    rewarder = create_rewarder(profile="tiny", normalize=False, experts={"imagereward": None, "aesthetic": None, "mlp": None, "redness": {}})
    common = dict(steps=args.steps, batch_size=2, group_size=4, learning_rate=0.1, clip_range=0.2, kl_weight=0.0, seed=0,
                  resolution=32, num_inference_steps=20, guidance_scale=1.0)
    for label, fields in (("whole chain", {}), ("train_inference_steps 8, sde_window [0, 3)", {"train_inference_steps": 8, "sde_window": [0, 3]})):
        work = Path(tempfile.mkdtemp(prefix="grpo-learn-"))
        out = job(args.model, LocalReward(rewarder), work, **common, **fields)
        m = out["metrics"]
        passes = sum(m["forward_passes"])
        gain = m["eval"]["tuned"]["redness"]["mean"] - m["eval"]["base"]["redness"]["mean"]
        print(json.dumps({"model": args.model, "setting": label, "steps": args.steps, "forward_passes": passes,
                          "reward_gain": round(gain, 4), "gain_per_1000_passes": round(1000 * gain / passes, 5),
                          "median_s_per_step": out["median_s_per_step"]}), flush=True)


def streaming(args) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).with_name("t2i-reward")
    server = subprocess.Popen([str(cli), "serve", "--profile", "tiny", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reward = RemoteReward(f"http://127.0.0.1:{port}")
        reward.client.wait_ready(300)
        for parts in args.micro_batches:
            for streamed in (False, True):
                out = job(args.model, reward, Path(tempfile.mkdtemp(prefix="grpo-stream-")), steps=args.steps, resolution=args.resolution,
                          num_inference_steps=10, batch_size=args.batch_size, group_size=args.group_size, guidance_scale=4.5,
                          sampling_micro_batches=parts, stream_rewards=streamed)
                print(json.dumps({"model": args.model, "micro_batches": parts, "stream_rewards": streamed,
                                  "median_s_per_step": out["median_s_per_step"], "reward": out["metrics"]["reward"]}), flush=True)
    finally:
        server.terminate()
        server.wait(30)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["settings", "learning", "streaming"])
    ap.add_argument("--models", nargs="+", default=list(TINY), choices=[*TINY, "sd15-random", "sd3-medium-random"])
    ap.add_argument("--model", default="tiny", choices=TINY)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    args = ap.parse_args()
    {"settings": settings, "learning": learning, "streaming": streaming}[args.mode](args)


if __name__ == "__main__":
    main()

"""The mixture (random-full, batched) against the reference chain run the seeds' way, on one machine.

Reference chain, per image: the reference ImageReward package's `inference_rank` one image at a time,
plus one separate CLIP ViT-L/14 image pass (open_clip, batch 1) per CLIP expert (aesthetic and MLP).
Ours: `create_rewarder(profile="random-full")`, every image through each backbone once, in batches.

    python benchmarks/mixture_vs_reference.py --images 16 --batch-size 8

`--ref-python` and `--ref-checkpoint` default to the reference environment and random checkpoint that
scripts/reference_envs.sh and the parity tests build (docs/parity.md). Prints one JSON
object; docs/benchmarks.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.rewarders import create_rewarder  # noqa: E402

PROMPT = "a photo of a cat on a red sofa, highly detailed"


def images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def time_ours(n: int, batch_size: int, size: int, device: str, repeat: int) -> float:
    rewarder = create_rewarder(profile="random-full", max_batch_size=batch_size, max_images=n, device=device)
    ims = images(n, size)
    rewarder.score(PROMPT, ims[:batch_size])  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        rewarder.score(PROMPT, ims)
    return n * repeat / (time.perf_counter() - t)


def time_reference_clip(n: int, size: int, device: str) -> float:
    """Seconds per image for one batch-1 CLIP ViT-L/14 pass, preprocessing included (as a seed expert does)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained=None, device=device)
    model.eval()
    ims = images(n, size)
    with torch.no_grad():
        model.encode_image(preprocess(ims[0]).unsqueeze(0).to(device))
        t = time.perf_counter()
        for im in ims:
            model.encode_image(preprocess(im).unsqueeze(0).to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def time_reference_imagereward(python: str, checkpoint: str, n: int) -> float:
    script = Path(__file__).resolve().parents[2] / "shared/reference/imagereward/ref_imagereward.py"
    out = subprocess.run([python, str(script), "bench", checkpoint, str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    # defaults: what scripts/reference_envs.sh and the parity tests build (docs/parity.md)
    ref_dir = Path(os.environ.get("T2I_REFERENCE_DIR", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2i-reward" / "reference"))
    ap.add_argument("--ref-python", default=str(ref_dir / "imagereward" / "bin" / "python"))
    ap.add_argument("--ref-checkpoint", default=str(ref_dir / "checkpoints" / "ir_random.pt"))
    args = ap.parse_args()

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "images": args.images,
        "batch_size": args.batch_size,
        "image_size": args.size,
    }
    result["ours_images_per_s"] = time_ours(args.images, args.batch_size, args.size, args.device, args.repeat)
    clip_s = time_reference_clip(args.images, args.size, args.device)
    result["reference_clip_s_per_image"] = clip_s
    if Path(args.ref_python).exists() and Path(args.ref_checkpoint).exists():
        ir_ips = time_reference_imagereward(args.ref_python, args.ref_checkpoint, args.images)
        result["reference_imagereward_images_per_s"] = ir_ips
        chain_s = 1.0 / ir_ips + 2 * clip_s  # ImageReward + one CLIP pass for the aesthetic and one for the MLP
        result["reference_chain_images_per_s"] = 1.0 / chain_s
        result["speedup"] = result["ours_images_per_s"] * chain_s
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""CPU time the service's model thread spends per image outside the models' forward passes.

    python benchmarks/model_thread.py --profile tiny --size 512 --images 16 --repeats 20

The service decodes, resizes, crops and normalises in its preprocessing pool (`Mixture.check_request` /
`check_tensor_request`); the model thread runs `Mixture.score_checked` on what the pool prepared. This
measures that call's CPU time on the calling thread (`time.thread_time`) minus the CPU time of every
backbone and expert pass (image and text encoders, heads: each pass the mixture times), with torch on
one thread so that a pass's compute is on the calling thread. What is
left is the model thread's own work per image: pooling the prepared tensors, copying them to the device,
slicing batches, combining scores and building the result. Two inputs: PNG bytes (the PIL reference
pipeline) and a uint8 (B, H, W, 3) tensor (the raw-tensor path; on a CPU host it is prepared in the pool
too). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.rewarders import create_rewarder  # noqa: E402

PROMPTS = ["a photo of a cat on a red sofa", "a watercolor lighthouse at dusk", "a city street at night, neon"]


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, size // 16, size // 16, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in small])


def cpu_timed(rewarder, spent: list[float]):
    """Replace the mixture's pass timer with one that records each pass's CPU time on this thread."""
    def timed(on_timing, name, fn, *args):
        t = time.thread_time()
        out = fn(*args)
        spent.append(time.thread_time() - t)
        return out
    rewarder._timed = timed


def model_thread_overhead(rewarder, checked, repeats: int) -> dict:
    """Median over repeats of (thread CPU of score_checked - thread CPU of the model passes), per image."""
    n = sum(len(c) for c in checked)
    outside, passes = [], []
    rewarder.score_checked(checked)  # warm-up
    for _ in range(repeats):
        spent: list[float] = []
        cpu_timed(rewarder, spent)
        t0 = time.thread_time()
        rewarder.score_checked(checked)
        total = time.thread_time() - t0
        del rewarder._timed
        outside.append((total - sum(spent)) / n)
        passes.append(sum(spent) / n)
    return {"outside_forward_ms_per_image": round(statistics.median(outside) * 1e3, 4),
            "model_passes_ms_per_image": round(statistics.median(passes) * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=16, help="images per request")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rewarder = create_rewarder(profile=args.profile, max_images=max(64, args.images), max_batch_size=args.images)
    arr = random_images(args.images, args.size)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    pngs = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    out = {"profile": args.profile, "size": args.size, "images_per_request": args.images, "device": str(rewarder.device)}
    t = time.perf_counter()
    checked = [rewarder.check_request(prompts, pngs)]
    out["png_prepare_ms_per_image (pool)"] = round((time.perf_counter() - t) / args.images * 1e3, 3)
    out["png"] = model_thread_overhead(rewarder, checked, args.repeats)
    t = time.perf_counter()
    checked = [rewarder.check_tensor_request(prompts, torch.from_numpy(arr))]
    out["uint8_prepare_ms_per_image (pool)"] = round((time.perf_counter() - t) / args.images * 1e3, 3)
    out["uint8_tensor"] = model_thread_overhead(rewarder, checked, args.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

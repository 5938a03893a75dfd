"""Latency of the vlm_judge per image: through `transformers serve` (the tiny random LLaVA on loopback) and
in-process, on this machine.

    python benchmarks/judge_latency.py --images 32

Starts `transformers serve <tiny VLM folder>` (pip install 'transformers[serving]'), asks the yes/no question
for `--images` 256x256 images one after another and with `--concurrency` in flight, and the same in-process.
Prints one JSON object (median milliseconds per image, and images/s with concurrency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewarders.mllm import MLLMConfig, create_peer  # noqa: E402
from rewarders.tiny_vlm import ensure_tiny_vlm  # noqa: E402


def serve(folder: Path, port: int):
    exe = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": tempfile.mkdtemp(prefix="hf-home-")}
    proc = subprocess.Popen([str(exe), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 120
    while time.time() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("transformers serve did not start")


def timed(peer, images, question, concurrency: int) -> dict:
    peer.yes_probability(images[0], question)  # warm-up (and, for auto, the mode)
    each = []
    for im in images:
        t = time.perf_counter()
        peer.yes_probability(im, question)
        each.append(time.perf_counter() - t)
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda im: peer.yes_probability(im, question), images))
    wall = time.perf_counter() - t
    return {"median_ms_per_image": round(1e3 * statistics.median(each), 2), "concurrent_images_per_s": round(len(images) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "t2i-reward"))
    ap.add_argument("--port", type=int, default=8791)
    args = ap.parse_args()
    folder = ensure_tiny_vlm(args.cache_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(args.images)]
    question = 'Does this image match the prompt "a red square"?'
    out = {"images": args.images, "size": 256, "concurrency": args.concurrency, "cores": os.cpu_count()}
    proc = serve(folder, args.port)
    try:
        http = create_peer(MLLMConfig(url=f"http://127.0.0.1:{args.port}", model=str(folder), image_size=384,
                                      max_concurrency=args.concurrency))
        out["http"] = {**timed(http, images, question, args.concurrency), "yes_no": http.describe()["yes_no"]}
    finally:
        proc.terminate()
        proc.wait(30)
    local = create_peer(MLLMConfig(model=str(folder), image_size=384), Path(args.cache_dir))
    out["in_process"] = timed(local, images, question, args.concurrency)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Latency of the vlm_judge per image: through `transformers serve` (the tiny random LLaVA on loopback) and
in-process, on this machine.

    python benchmarks/judge_latency.py --images 32                                   # the tiny VLM on this CPU
    python benchmarks/judge_latency.py --shape 2b --device cuda --images 64 --concurrency 1 8 32 [--continuous-batching]

Starts `transformers serve <VLM folder>` (pip install 'transformers[serving]'), asks the yes/no question
for `--images` 256x256 images one after another and with each `--concurrency` level in flight, and the same
in-process. `--shape 2b` builds a real-size random LLaVA (CLIP ViT-L/14-336 + a 1.7B Llama, 2.0 B
parameters; `rewarders/tiny_vlm.py`) once into the cache, for GPU figures; on a GPU both sides run in
bfloat16. Prints one JSON object (median milliseconds per image, and images/s per concurrency level).
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
from t2i_reward.rewarders.mllm import MLLMConfig, create_peer  # noqa: E402
from t2i_reward.rewarders.tiny_vlm import ensure_random_vlm  # noqa: E402


def serve(folder: Path, port: int, device: str = "cpu", extra: tuple[str, ...] = (), home: Path | None = None,
          timeout_s: float = 600) -> subprocess.Popen:
    """`transformers serve <folder>` on loopback `port`, offline, with its own HF_HOME (`home`, default a new
    temporary folder) and its output in `home/serve.log`; returns the process once /health answers. On a CPU
    the server runs one OpenMP thread, on a GPU in bfloat16. Raises RuntimeError with the log's tail if it
    exits or is not healthy within `timeout_s` (a 2 B model loads in a minute or two). The tests' peer too."""
    exe = Path(sys.executable).parent / "transformers"
    home = Path(home or tempfile.mkdtemp(prefix="hf-home-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HOME": str(home),
           **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})}
    dtype = ("--dtype", "bfloat16") if device.startswith("cuda") else ()
    with open(home / "serve.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(exe), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", device,
                                 *dtype, *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    end = time.time() + timeout_s
    while proc.poll() is None and time.time() < end:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    proc.wait(30)
    raise RuntimeError(f"transformers serve did not start:\n{(home / 'serve.log').read_text()[-3000:]}")


def timed(peer, images, question, levels: list[int]) -> dict:
    peer.yes_probability(images[0], question)  # warm-up (and, for auto, the mode)
    each = []
    for im in images:
        t = time.perf_counter()
        peer.yes_probability(im, question)
        each.append(time.perf_counter() - t)
    rates = {}
    for c in levels:
        t = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(lambda im: peer.yes_probability(im, question), images))
        rates[str(c)] = round(len(images) / (time.perf_counter() - t), 1)
    return {"median_ms_per_image": round(1e3 * statistics.median(each), 2), "images_per_s_by_concurrency": rates}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4], help="requests in flight, one run per level")
    ap.add_argument("--shape", choices=["tiny", "2b"], default="tiny", help="the random VLM's size (rewarders/tiny_vlm.py)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:n] (bfloat16 on both sides)")
    ap.add_argument("--continuous-batching", action="store_true", help="transformers serve's continuous batching")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "t2i-reward"))
    ap.add_argument("--port", type=int, default=8791)
    args = ap.parse_args()
    folder = ensure_random_vlm(args.cache_dir, args.shape)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(args.images)]
    question = 'Does this image match the prompt "a red square"?'
    out = {"shape": args.shape, "device": args.device, "images": args.images, "size": 256, "concurrency": args.concurrency,
           "continuous_batching": args.continuous_batching, "cores": os.cpu_count()}
    proc = serve(folder, args.port, args.device, ("--continuous-batching",) if args.continuous_batching else ())
    try:
        http = create_peer(MLLMConfig(url=f"http://127.0.0.1:{args.port}", model=str(folder), image_size=384,
                                      max_concurrency=max(args.concurrency), timeout_s=600))
        out["http"] = {**timed(http, images, question, args.concurrency), "yes_no": http.describe()["yes_no"]}
    finally:
        proc.terminate()
        proc.wait(30)
    local = create_peer(MLLMConfig(model=str(folder), image_size=384), Path(args.cache_dir), args.device)
    out["in_process"] = timed(local, images, question, args.concurrency)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Judge latency and peer calls per request: unified_reward (pointwise) and pairwise_judge (pairwise), through an
OpenAI-compatible server.

    python benchmarks/judges.py                                    # transformers serve of a scripted tiny VLM, on this CPU
    python benchmarks/judges.py --url http://127.0.0.1:8000 --model judge --concurrency 1 8 32 --group-size 8   # a running server (vLLM, SGLang)

Without `--url` it starts `transformers serve` (pip install 'transformers[serving]') of the tiny random LLaVA
scripted to answer in UnifiedReward's format (rewarders/tiny_vlm.py `ensure_scripted_vlm`: every answer parses,
so the figures are of full answers: about 90 tokens each). Each request is one group of `--group-size` random
256x256 images for one prompt, scored through the mixture with that judge alone; `--requests` requests are sent
with each `--concurrency` level in flight. Pairwise compares every pair in both orders (n(n-1) calls per group
of n) unless `--max-comparisons` bounds it. Prints one JSON object: per judge and level, the median seconds per
request, images/s, and the peer calls per request (counted by the peer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.judge_latency import serve  # noqa: E402
from t2i_reward.rewarders import create_rewarder  # noqa: E402
from t2i_reward.rewarders.tiny_vlm import ensure_scripted_vlm  # noqa: E402

SCRIPT = ("Alignment Score (1-5): 4\nCoherence Score (1-5): 2.5\nStyle Score (1-5): 5\n"
          "Final Score: 3\n<answer>Image 1 is better</answer>")
NO_OTHERS = {"imagereward": None, "aesthetic": None, "mlp": None}


def measure(rewarder, name: str, groups: list[list[Image.Image]], levels: list[int]) -> dict:
    peer = rewarder.experts[name].peer
    rewarder.score("a red square", groups[0])  # warm-up
    out = {}
    for c in levels:
        before, each = peer.calls, []

        def one(images):
            t = time.perf_counter()
            res = rewarder.score("a red square", images)
            each.append(time.perf_counter() - t)
            return res

        t = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            results = list(pool.map(one, groups))
        wall = time.perf_counter() - t
        failed = sum(1 for r in results for im in r.images if im.errors)
        out[str(c)] = {"median_s_per_request": round(statistics.median(each), 3),
                       "images_per_s": round(sum(len(g) for g in groups) / wall, 2),
                       "peer_calls_per_request": (peer.calls - before) / len(groups), "images_with_errors": failed}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="a running OpenAI-compatible server; default: start transformers serve of the scripted tiny VLM")
    ap.add_argument("--model", help="the model name the server serves (with --url)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="requests in flight, one run per level")
    ap.add_argument("--max-comparisons", type=int, default=None, help="pairwise_judge's bound (default: every pair, both orders)")
    ap.add_argument("--template", default="unifiedreward", help="pairwise_judge's template")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--judges", nargs="+", default=["unified_reward", "pairwise_judge"], help="any of unified_reward, pairwise_judge, vqascore")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "t2i-reward"))
    ap.add_argument("--port", type=int, default=8792)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    groups = [[Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(args.group_size)]
              for _ in range(args.requests)]
    proc = None
    if args.url is None:
        folder = ensure_scripted_vlm(args.cache_dir, SCRIPT)
        proc = serve(folder, args.port)
        url, model = f"http://127.0.0.1:{args.port}", str(folder)
    else:
        url, model = args.url, args.model
    n = args.group_size
    out = {"url": "transformers serve (scripted tiny VLM)" if proc else "external", "requests": args.requests, "group_size": n,
           "concurrency": args.concurrency, "cores": os.cpu_count()}
    try:
        for name in args.judges:
            cfg = {"url": url, "model": model, "max_concurrency": min(256, max(args.concurrency) * n * n), "timeout_s": 600}
            if name != "vqascore":
                cfg["max_tokens"] = args.max_tokens
            if name == "pairwise_judge":
                cfg.update(template=args.template, max_comparisons=args.max_comparisons or n * (n - 1))
            rewarder = create_rewarder(profile="tiny", cache_dir=args.cache_dir, device="cpu",
                                       experts={**NO_OTHERS, name: cfg})
            out[name] = measure(rewarder, name, groups, args.concurrency)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

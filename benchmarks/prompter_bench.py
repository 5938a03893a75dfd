"""Prompter quality and speed: relevance on real prompts, build time, /prompts latency at 10k and 1M.

    python benchmarks/prompter_bench.py --source ../shared/data/imagereward/refl_data.json --work /tmp/pbench
    python benchmarks/prompter_bench.py --source ../shared/data/imagereward/refl_data.json --work /tmp/pbench --million

- build: seconds to embed and index the source (per 10k prompts);
- relevance: for each topic word, the share of the n returned prompts that contain it (diversity 0 and 0.5);
- latency: p50/p99 of POST /prompts with one topic, over HTTP to `t2i-reward serve --prompts-index DIR`;
- --million: the same latency on a synthesised 1M-prompt corpus (each source prompt combined with 110
  style endings, so every prompt is distinct text) whose vectors are synthesised from real embeddings
  (see below), in an HNSW index.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.prompter import PromptIndex, build_index, read_prompts  # noqa: E402
from t2i_reward.prompter.index import embed  # noqa: E402
from t2i_reward.service.client import RewardClient  # noqa: E402

TOPICS = ["landscape", "portrait", "cat", "dragon", "city", "anime", "car", "castle", "robot", "forest", "space", "flower"]
ENDINGS = [f"{a}, {b}" for a in ("oil painting", "watercolor", "photo", "3d render", "pencil sketch", "digital art",
                                  "pixel art", "ink drawing", "pastel", "matte painting", "charcoal")
           for b in ("highly detailed", "soft light", "dramatic light", "muted colors", "vivid colors", "8k",
                     "film grain", "wide shot", "close-up", "minimalist")]


def relevance(index: PromptIndex, n: int, diversity: float) -> dict:
    found, _ = index.search(TOPICS, n, diversity)
    per_topic = {t: sum(t in p.lower() for p in ps) / len(ps) for t, ps in zip(TOPICS, found)}
    return {"per_topic": per_topic, "mean": float(np.mean(list(per_topic.values())))}


def serve_latency(index_dir: Path, requests: int) -> dict:
    """Cold: every request a new topic (the query is embedded); warm: 12 topics asked again (cached)."""
    exe = Path(sys.executable).parent / "t2i-reward"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(exe), "serve", "--profile", "tiny", "--port", str(port), "--prompts-index", str(index_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        RewardClient(url).wait_ready(900)
        result = {}
        with httpx.Client(base_url=url, timeout=60) as http:
            for name, topic in (("cold", lambda i: f"{TOPICS[i % len(TOPICS)]} art number {i}"),
                                ("warm", lambda i: f"{TOPICS[i % len(TOPICS)]} art")):
                lat = []
                for i in range(requests + 12):
                    t = time.perf_counter()
                    r = http.post("/prompts", json={"topics": [topic(i)], "n_prompts": 5})
                    r.raise_for_status()
                    if i >= 12:  # the first requests warm up (and fill the cache for 'warm')
                        lat.append(time.perf_counter() - t)
                result[name] = {"p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
                                "requests": len(lat)}
    finally:
        proc.terminate()
        proc.wait(30)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--work", default="/tmp/prompter-bench")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--million", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    prompts = read_prompts(args.source)
    out = {"machine": f"{os.cpu_count()} cores", "source_prompts": len(prompts)}

    t = time.perf_counter()
    meta = build_index(prompts, work / "10k")
    if meta["rebuilt"]:
        out["build_s_per_10k"] = (time.perf_counter() - t) * 10_000 / len(prompts)
    index = PromptIndex.load(work / "10k")
    out["relevance"] = {"diversity_0": relevance(index, args.n, 0.0), "diversity_0.5": relevance(index, args.n, 0.5)}
    out["latency_10k"] = serve_latency(work / "10k", args.requests)

    if args.million:
        # Synthesised 1M corpus: every real prompt with every style ending (distinct texts). Really
        # embedding 1M long prompts takes hours on this CPU, so each vector is synthesised from real
        # embeddings: normalise(v_prompt + 0.35 * v_ending). The latency of search does not depend on
        # which vectors they are, only on their number and spread.
        base = index.index.reconstruct_n(0, index.index.ntotal)
        ends = embed(index.embedder, ENDINGS)
        rows = [(i, j) for j in range(len(ENDINGS)) for i in range(len(prompts))][:1_000_000]
        ii = np.array([r[0] for r in rows])
        jj = np.array([r[1] for r in rows])
        vecs = base[ii] + 0.35 * ends[jj]
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        big = [f"{prompts[i]}, {ENDINGS[j]}" for i, j in rows]
        t = time.perf_counter()
        meta = build_index(big, work / "1m", vectors=vecs)
        if meta["rebuilt"]:
            out["build_1m_s"] = time.perf_counter() - t
        out["index_1m"] = {"count": meta["count"], "kind": meta["kind"]}
        out["latency_1m"] = serve_latency(work / "1m", args.requests)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

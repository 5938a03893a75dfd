"""Throughput and latency of `t2i-reward serve` under concurrent clients, and the HTTP overhead per image.

    python benchmarks/service_throughput.py --profile tiny --clients 1 8 32 --requests-per-client 8
    python benchmarks/service_throughput.py --profile random-full --clients 1 8 32 --requests-per-client 1

Starts the service in its own process on loopback, sends one 512x512 PNG per request from N client
threads at once, and reports images/s and p50/p99 latency per concurrency level. The HTTP overhead per
image: the same rewarder object served by uvicorn in a thread of this process; sequential one-image
requests interleaved with the same call in-process (`Mixture.score` on the same PNG bytes); the median
HTTP latency minus the median in-process time (client encoding, transfer, parsing, queueing included). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.service.client import RewardClient  # noqa: E402

PROMPT = "a photo of a cat on a red sofa, highly detailed"


def png(seed: int, size: int = 512) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(profile: str, port: int, max_batch: int, args: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
    """`t2i-reward serve` (with `args`, e.g. `--ray`) on loopback, in its own process session, once ready.
    `profile` may be a reward config file (`--config`) instead of a profile's name."""
    exe = Path(sys.executable).parent / "t2i-reward"
    env = {**os.environ, "T2I_SERVICE_MAX_BATCH_IMAGES": str(max_batch), "T2I_SERVICE_MAX_WAIT_MS": os.environ.get("T2I_SERVICE_MAX_WAIT_MS", "0"),
           "T2I_SERVICE_MAX_QUEUE_IMAGES": "4096", **(env or {})}
    which = ["--config", profile] if profile.endswith((".yaml", ".yml")) else ["--profile", profile]
    proc = subprocess.Popen([str(exe), "serve", *which, "--port", str(port), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        RewardClient(f"http://127.0.0.1:{port}").wait_ready(600)
    except TimeoutError:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (`serve --ray` then shuts its local cluster down), then whatever is left of its session."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def load(url: str, clients: int, per_client: int, images: list[bytes]) -> dict:
    def worker(k: int) -> list[float]:
        out = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for j in range(per_client):
                data = images[(k * per_client + j) % len(images)]
                t = time.perf_counter()
                r = http.post("/reward", data={"prompt": PROMPT}, files=[("images", ("i.png", data, "image/png"))])
                r.raise_for_status()
                out.append(time.perf_counter() - t)
        return out

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(worker, range(clients)) for x in xs]
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": len(latencies), "images_per_s": len(latencies) / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


def levels(url: str, clients: list[int], per_client: int, images: list[bytes]) -> list[dict]:
    """One warm-up request, then `load` at each number of clients."""
    load(url, 1, 1, images)
    return [load(url, c, per_client, images) for c in clients]


def overhead(profile: str, image: bytes, n: int) -> dict:
    """Same process, same rewarder object, interleaved calls: median in-process time vs median HTTP time."""
    import threading

    import uvicorn
    from t2i_reward.rewarders import create_rewarder
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    rewarder = create_rewarder(profile=profile)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Settings(), rewarder=rewarder), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    RewardClient(url).wait_ready(120)
    files = [("images", ("i.png", image, "image/png"))]
    inproc, over_http = [], []
    with httpx.Client(base_url=url, timeout=600) as http:
        http.post("/reward", data={"prompt": PROMPT}, files=files).raise_for_status()
        rewarder.score(PROMPT, [image])
        for _ in range(n):
            t = time.perf_counter()
            rewarder.score(PROMPT, [image])
            inproc.append(time.perf_counter() - t)
            t = time.perf_counter()
            http.post("/reward", data={"prompt": PROMPT}, files=files).raise_for_status()
            over_http.append(time.perf_counter() - t)
    server.should_exit = True
    thread.join(10)
    a, b = statistics.median(inproc), statistics.median(over_http)
    return {"in_process_ms": 1000 * a, "http_ms": 1000 * b, "overhead_ms_per_image": 1000 * (b - a), "png_bytes": len(image)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--overhead-requests", type=int, default=30)
    args = ap.parse_args()
    port = free_port()
    images = [png(i) for i in range(16)]
    proc = start_server(args.profile, port, args.max_batch)
    try:
        result = {"profile": args.profile, "machine": f"{os.cpu_count()} cores", "max_batch_images": args.max_batch,
                  "levels": levels(f"http://127.0.0.1:{port}", args.clients, args.requests_per_client, images)}
    finally:
        stop_server(proc)
    if args.overhead_requests:
        result["overhead_512px_png"] = overhead(args.profile, images[0], args.overhead_requests)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

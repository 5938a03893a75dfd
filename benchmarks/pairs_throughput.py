"""Batched (prompt, image) pairs over HTTP against the same work in-process: overhead and throughput.

    python benchmarks/pairs_throughput.py overhead --profile tiny --pairs 16 --requests 20
    python benchmarks/pairs_throughput.py throughput --profile random-full --pairs 16 --clients 1 8 32

`overhead`: the service in its own process (`--server process`, the default: `t2i-reward serve`), or one
rewarder object served by uvicorn in a thread of this process (`--server thread`: client and server share
one interpreter); sequential requests of `--pairs` random 512x512 images, each with its own prompt,
interleaved with the same work in-process (a rewarder in this process), each timed call after a pause
(`--pause-ms`, 50) in which the other side's OpenMP threads stop spinning.
Two transports: the raw tensor path (safetensors uint8 (B, H, W, 3) in, safetensors out, via
a plain POST) against `check_tensor_request` + `score_checked`; and PNG multipart against `check_request`
+ `score_checked` (`Mixture.score_many`'s two steps) on the same PNG bytes. Reports the
median HTTP time minus the median in-process time, per image, and where the HTTP time went: the server's
phases from its Server-Timing header (read the body, prepare, queue, model, encode) and the time outside
the route (the client, the loopback, uvicorn before and after the route).

`throughput`: the service in its own process (`t2i-reward serve`), N client threads each sending
`--requests-per-client` requests of `--pairs` pairs on the raw tensor path; images/s per level, against
the in-process rate of the same batches (`score_checked`, one request after another), and their ratio.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.rewarders import wire  # noqa: E402
from t2i_reward.rewarders.client import RewardClient  # noqa: E402

from benchmarks.model_thread import random_images  # noqa: E402

PROMPTS = ["a photo of a cat on a red sofa", "a watercolor lighthouse at dusk", "a city street at night, neon",
           "portrait of an old fisherman, oil painting"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensor_body(arr: np.ndarray, prompts: list[str]) -> bytes:
    return wire.encode_tensor_request(torch.from_numpy(arr), prompts)


def post_tensors(http: httpx.Client, body: bytes) -> httpx.Response:
    r = http.post("/reward", content=body, headers=wire.TENSOR_HEADERS)
    return r.raise_for_status()


def minor_faults(pid: int) -> int | None:
    """A process's minor page faults so far (Linux), None elsewhere."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except OSError:
        return None


def server_phases(r: httpx.Response) -> dict[str, float]:
    """The service's Server-Timing header, in seconds per phase."""
    return {k: float(v) / 1e3 for k, v in (part.split(";dur=") for part in r.headers["server-timing"].split(", "))}


def png_bytes(arr: np.ndarray) -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def overhead(args) -> dict:
    import uvicorn
    from t2i_reward.rewarders import create_rewarder
    from t2i_reward.service.app import create_app
    from t2i_reward.service.memory import keep_freed_memory
    from t2i_reward.service.settings import Settings

    keep_freed_memory(Settings().keep_freed_mb)  # the in-process side with the service's allocator setting: like for like
    rewarder = create_rewarder(profile=args.profile, max_batch_size=args.pairs)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = proc = None
    if args.server == "thread":
        server = uvicorn.Server(uvicorn.Config(create_app(Settings(max_images=max(64, args.pairs)), rewarder=rewarder),
                                               port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
    else:
        env = {**os.environ, "T2I_REWARD_MAX_BATCH_SIZE": str(args.pairs), "T2I_SERVICE_MAX_IMAGES": str(max(64, args.pairs))}
        proc = subprocess.Popen([str(Path(sys.executable).parent / "t2i-reward"), "serve", "--profile", args.profile, "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    RewardClient(url).wait_ready(300)
    arr = random_images(args.pairs, args.size)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.pairs)]
    pngs = png_bytes(arr)
    body = tensor_body(arr, prompts)
    files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    # in-process: (check and prepare, score); `score_many` is exactly these two steps
    runs = {
        "raw_tensor": (lambda http: post_tensors(http, body),
                       lambda: rewarder.check_tensor_request(prompts, torch.from_numpy(arr)), rewarder.score_checked),
        "png_multipart": (lambda http: http.post("/reward", data={"prompts": prompts}, files=files).raise_for_status(),
                          lambda: rewarder.check_request(prompts, pngs), rewarder.score_checked),
    }
    out = {"profile": args.profile, "server": args.server, "pairs_per_request": args.pairs, "size": args.size,
           "raw_body_bytes": len(body), "png_body_bytes": sum(map(len, pngs))}
    with httpx.Client(base_url=url, timeout=600) as http:
        for name, (over_http, check, score) in runs.items():
            over_http(http), score([check()])  # warm-up
            a, b, phases = [], [], []
            faults = minor_faults(proc.pid) if proc is not None else None
            for _ in range(args.requests):
                # why the pauses: a process's OpenMP threads spin for a few ms after its last parallel
                # region; each timed call starts once the other side's have gone to sleep
                time.sleep(args.pause_ms / 1e3)
                t = time.perf_counter()
                checked = check()
                t1 = time.perf_counter()
                score([checked])
                a.append((t1 - t, time.perf_counter() - t1))
                time.sleep(args.pause_ms / 1e3)
                t = time.perf_counter()
                r = over_http(http)
                b.append(time.perf_counter() - t)
                phases.append(server_phases(r))
            ma, mb = statistics.median(x + y for x, y in a), statistics.median(b)
            # where the time went, medians per image: in-process, checking and preparing vs scoring; over
            # HTTP, the server's phases (its Server-Timing header) and the rest (the client, the loopback,
            # uvicorn before and after the route)
            med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
            outside = statistics.median(t - sum(p.values()) for t, p in zip(b, phases))
            per_image = lambda v: round(1e3 * v / args.pairs, 3)  # noqa: E731
            out[name] = {"in_process_ms": round(1e3 * ma, 2), "http_ms": round(1e3 * mb, 2),
                         "overhead_ms_per_image": per_image(mb - ma),
                         "in_process_ms_per_image": {"prepare": per_image(statistics.median(x for x, _ in a)),
                                                     "model": per_image(statistics.median(y for _, y in a))},
                         "server_ms_per_image": {k: per_image(v) for k, v in med.items()},
                         "outside_server_ms_per_image": per_image(outside)}
            if faults is not None:  # the server's page faults: memory given back and taken again
                out[name]["server_minor_faults_per_request"] = round((minor_faults(proc.pid) - faults) / args.requests)
    if server is not None:
        server.should_exit = True
    else:
        proc.terminate()
        proc.wait(60)
    return out


def throughput(args) -> dict:
    port = free_port()
    exe = Path(sys.executable).parent / "t2i-reward"
    env = {**os.environ, "T2I_SERVICE_MAX_QUEUE_IMAGES": "100000", "T2I_SERVICE_MAX_QUEUE_WAIT_S": "3600",
           "T2I_SERVICE_MAX_BATCH_IMAGES": str(args.max_batch), "T2I_REWARD_MAX_BATCH_SIZE": str(args.pairs)}
    proc = subprocess.Popen([str(exe), "serve", "--profile", args.profile, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    arr = random_images(args.pairs, args.size)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.pairs)]
    body = tensor_body(arr, prompts)
    out = {"profile": args.profile, "pairs_per_request": args.pairs, "size": args.size, "machine": f"{os.cpu_count()} cores"}
    try:
        RewardClient(url).wait_ready(900)
        with httpx.Client(base_url=url, timeout=3600) as http:
            post_tensors(http, body)  # warm-up

        def client(_):
            with httpx.Client(base_url=url, timeout=3600) as http:
                for _ in range(args.requests_per_client):
                    post_tensors(http, body)

        levels = []
        for c in args.clients:
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(client, range(c)))
            wall = time.perf_counter() - t
            levels.append({"clients": c, "images": c * args.requests_per_client * args.pairs,
                           "http_images_per_s": round(c * args.requests_per_client * args.pairs / wall, 3)})
    finally:
        proc.terminate()
        proc.wait(60)
    # in-process, in this process once the server is gone: the same batches one after another
    from t2i_reward.rewarders import create_rewarder

    rewarder = create_rewarder(profile=args.profile, max_batch_size=args.pairs, max_images=max(64, args.pairs))
    rewarder.score_checked([rewarder.check_tensor_request(prompts, torch.from_numpy(arr))])
    n = max(1, args.in_process_requests)
    t = time.perf_counter()
    for _ in range(n):
        rewarder.score_checked([rewarder.check_tensor_request(prompts, torch.from_numpy(arr))])
    rate = n * args.pairs / (time.perf_counter() - t)
    out["in_process_images_per_s"] = round(rate, 3)
    for lv in levels:
        lv["ratio_to_in_process"] = round(lv["http_images_per_s"] / rate, 3)
    out["levels"] = levels
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["overhead", "throughput"])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--requests", type=int, default=20, help="overhead: requests per transport")
    ap.add_argument("--pause-ms", type=float, default=50, help="overhead: idle time before each timed call")
    ap.add_argument("--server", choices=["thread", "process"], default="process", help="overhead: where the service runs")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--in-process-requests", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=64, help="the service's max_batch_images")
    args = ap.parse_args()
    print(json.dumps(overhead(args) if args.what == "overhead" else throughput(args), indent=1))


if __name__ == "__main__":
    main()

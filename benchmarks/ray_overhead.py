"""What the Ray path costs: `t2i-reward serve --ray` (a local Ray cluster, one replica per pool) against the
single-process `t2i-reward serve`, on the same machine, images/s and p50/p99 latency at 1, 8 and 32 clients.

    python benchmarks/ray_overhead.py --profile tiny --clients 1 8 32 --requests-per-client 8
    python benchmarks/ray_overhead.py --profile random-full --clients 1 8 32 --requests-per-client 2

Each service runs alone, one after the other (single-process first), in its own process session on loopback;
the load is service_throughput.py's (one 512x512 PNG per request from N client threads at once, after one
warm-up request). Prints one JSON object: both services' levels and the Ray/single throughput ratio per level.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service_throughput import load, png, start_server  # noqa: E402
from t2i_reward.service.client import RewardClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(profile: str, port: int, max_batch: int) -> subprocess.Popen:
    """`serve --ray` on a local cluster of its own (no RAY_ADDRESS), in its own session."""
    exe = Path(sys.executable).parent / "t2i-reward"
    env = {**os.environ, "T2I_SERVICE_MAX_BATCH_IMAGES": str(max_batch), "T2I_SERVICE_MAX_WAIT_MS": os.environ.get("T2I_SERVICE_MAX_WAIT_MS", "0"),
           "T2I_SERVICE_MAX_QUEUE_IMAGES": "4096", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(exe), "serve", "--ray", "--profile", profile, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        RewardClient(f"http://127.0.0.1:{port}").wait_ready(600)
    except TimeoutError:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # `serve --ray` shuts its local cluster down
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the cluster is left in its session
    except ProcessLookupError:
        pass


def measure(start, profile: str, clients: list[int], per_client: int, max_batch: int, images: list[bytes]) -> list[dict]:
    port = free_port()
    proc = start(profile, port, max_batch)
    url = f"http://127.0.0.1:{port}"
    try:
        load(url, 1, 1, images)  # warm-up
        return [load(url, c, per_client, images) for c in clients]
    finally:
        stop(proc) if start is start_ray else (proc.terminate(), proc.wait(30))
        time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    # 32 clients on one address: room for all their uploads at once in both services (the limits' defaults are 16 / 32)
    os.environ.setdefault("T2I_SERVICE_MAX_CLIENT_UPLOADS", "64")
    os.environ.setdefault("T2I_SERVICE_MAX_CONCURRENT_UPLOADS", "64")
    images = [png(i) for i in range(16)]
    single = measure(start_server, args.profile, args.clients, args.requests_per_client, args.max_batch, images)
    on_ray = measure(start_ray, args.profile, args.clients, args.requests_per_client, args.max_batch, images)
    print(json.dumps({
        "profile": args.profile, "machine": f"{os.cpu_count()} cores", "max_batch_images": args.max_batch,
        "single": single, "ray": on_ray,
        "ratio": [{"clients": s["clients"], "images_per_s": r["images_per_s"] / s["images_per_s"]} for s, r in zip(single, on_ray)],
    }, indent=1))


if __name__ == "__main__":
    main()

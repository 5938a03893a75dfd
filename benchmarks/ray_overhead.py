"""What the Ray path costs: `t2i-reward serve --ray` (a local Ray cluster, one replica per pool) against the
single-process `t2i-reward serve`, on the same machine, images/s and p50/p99 latency at 1, 8 and 32 clients.

    python benchmarks/ray_overhead.py --profile tiny                   # 8 requests per client
    python benchmarks/ray_overhead.py --profile random-full            # 1 request per client (full-size models)

Each service runs alone, one after the other (single-process first), in its own process session on loopback,
started, loaded and stopped by service_throughput.py's functions (`start_server`, `levels`: one 512x512 PNG
per request from N client threads at once, after one warm-up request). On Ray the pools and the ingress
reserve 0.1 CPU each (`--ray-cpus`), so that every pool of random-full has a place on a small machine; a
pool's torch threads are then 1 (Ray sets OMP_NUM_THREADS to a replica's whole CPUs, at least 1) unless
`--pool-threads` sets them (the pools' `threads`). Prints one
JSON object: both services' levels and the Ray/single throughput ratio per level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service_throughput import free_port, levels, png, start_server, stop_server  # noqa: E402

REQUESTS_PER_CLIENT = {"tiny": 8, "random-full": 1}  # random-full: 32 full-size requests take minutes on a CPU


def measure(profile: str, clients: list[int], per_client: int, max_batch: int, images: list[bytes], ray_cpus: float | None,
            pool_threads: int | None = None, merge_calls: bool = False, threads_of: dict[str, int] | None = None) -> list[dict]:
    """One service's levels: single-process (`ray_cpus` None) or on a local Ray cluster of its own."""
    args, env, config = (), None, None
    if ray_cpus is not None:
        fd, config = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            # why the long pool timeout: full-size models on a CPU take longer than the default 60 s for a batch of 32
            default = {"num_cpus": ray_cpus, "threads": pool_threads, "merge_calls": merge_calls}
            pools = {name: {**default, "threads": n} for name, n in (threads_of or {}).items()}
            yaml.safe_dump({"profile": profile, "ray": {"default_pool": default, "pools": pools,
                                                        "ingress": {"num_cpus": ray_cpus}, "pool_timeout_s": 900}}, f)
        args, env = ("--ray",), {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    proc = start_server(config or profile, port, max_batch, args, env)
    try:
        out = levels(f"http://127.0.0.1:{port}", clients, per_client, images)
        if merge_calls:
            out.append({"merges": merges(profile)})
        return out
    finally:
        stop_server(proc)
        if config:
            os.unlink(config)
        time.sleep(2)


def merges(profile: str) -> dict:
    """Each pool's `merge_calls` counts (runs, calls, the largest run, fallbacks), from its replica, over all levels."""
    import ray
    from ray import serve
    from t2i_reward.rewarders.config import load_config
    from t2i_reward.rewarders.pools import plan_pools

    config = load_config(profile=profile)
    ray.init(address="auto", logging_level="ERROR")
    try:
        return {pool: serve.get_deployment_handle(f"pool-{pool}", app_name=config.ray.app_name).stats.remote().result(timeout_s=60)
                for pool in plan_pools(list(config.experts), config.ray)}
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=None, help="default: 8 (tiny), 1 (random-full and others)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--ray-cpus", type=float, default=0.1, help="CPUs each pool replica and the ingress reserve on Ray")
    ap.add_argument("--pool-threads", type=int, default=None, help="torch threads per pool replica (default: Ray's, 1 here)")
    ap.add_argument("--merge-calls", action="store_true", help="the pools merge the calls that queued (`merge_calls`)")
    ap.add_argument("--ray-only", action="store_true", help="skip the single-process service (compare Ray settings)")
    ap.add_argument("--threads-of", nargs="*", default=[], metavar="POOL=N", help="one pool's torch threads (e.g. clip=2)")
    args = ap.parse_args()
    per_client = args.requests_per_client or REQUESTS_PER_CLIENT.get(args.profile, 1)
    # 32 clients on one address: room for all their uploads at once in both services (the limits' defaults are 16 / 32)
    os.environ.setdefault("T2I_SERVICE_MAX_CLIENT_UPLOADS", "64")
    os.environ.setdefault("T2I_SERVICE_MAX_CONCURRENT_UPLOADS", "64")
    images = [png(i) for i in range(16)]
    single = None if args.ray_only else measure(args.profile, args.clients, per_client, args.max_batch, images, None)
    threads_of = {k: int(v) for k, v in (item.split("=") for item in args.threads_of)}
    on_ray = measure(args.profile, args.clients, per_client, args.max_batch, images, args.ray_cpus, args.pool_threads,
                     args.merge_calls, threads_of)
    print(json.dumps({
        "profile": args.profile, "machine": f"{os.cpu_count()} cores", "max_batch_images": args.max_batch,
        "requests_per_client": per_client, "pool_threads": args.pool_threads, "merge_calls": args.merge_calls,
        "threads_of": threads_of, "single": single, "ray": on_ray,
        "ratio": [{"clients": s["clients"], "images_per_s": r["images_per_s"] / s["images_per_s"]}
                  for s, r in zip(single or [], on_ray) if "clients" in r],
    }, indent=1))


if __name__ == "__main__":
    main()

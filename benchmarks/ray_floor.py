"""The floor under the Ray path's latency: what Ray Serve itself costs per request on this machine, with no
model and no reward code. A local Ray cluster of the script's own; one client, sequential requests.

    python benchmarks/ray_floor.py --requests 200

Three Serve applications, measured one after the other (median and p99 ms per request):
- `proxy -> ingress`: a FastAPI ingress deployment that answers at once (the HTTP proxy's hop);
- `proxy -> ingress -> pool`: the ingress awaits one call to a pool deployment that answers at once (what
  `t2i-reward serve --ray` adds per pool on the request's path);
- `... -> 2 pools`: the ingress awaits two pool calls at once (the tiny profile has two pools).
The body is one 512x512 PNG's worth of bytes (about 400 KB), as in benchmarks/ray_overhead.py.
"""


import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import ray
from fastapi import FastAPI, Request
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_throughput import free_port  # noqa: E402


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Pool:
    async def score(self, n: int) -> list[float]:
        return [0.0] * n


def ingress_app(pools: int):
    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, *handles):
            self.handles = handles

        @api.post("/reward")
        async def reward(self, request: Request) -> dict:
            body = await request.body()
            answers = await asyncio.gather(*(h.score.remote(1) for h in self.handles))
            return {"bytes": len(body), "answers": len(answers)}

    return Ingress.bind(*[Pool.options(name=f"pool-{i}").bind() for i in range(pools)])


def measure(url: str, body: bytes, n: int) -> dict:
    with httpx.Client(timeout=60) as client:
        for _ in range(5):  # warm-up
            client.post(url, content=body).raise_for_status()
        ms = []
        for _ in range(n):
            t = time.perf_counter()
            client.post(url, content=body).raise_for_status()
            ms.append((time.perf_counter() - t) * 1000)
    ms.sort()
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    ray.init(include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    body = os.urandom(400_000)
    out = {"machine": f"{os.cpu_count()} cores", "ray": ray.__version__, "requests": args.requests}
    for label, pools in (("proxy -> ingress", 0), ("proxy -> ingress -> pool", 1), ("proxy -> ingress -> 2 pools", 2)):
        serve.run(ingress_app(pools), name="floor", route_prefix="/")
        out[label] = measure(f"http://127.0.0.1:{port}/reward", body, args.requests)
        serve.delete("floor")
    serve.shutdown()
    ray.shutdown()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Mixed-traffic load test of the reward service: N clients for M seconds, R rounds; latency per endpoint
and the server's resident memory after every round (it must not grow from round to round).

    python benchmarks/load.py --clients 8 --seconds 20 --rounds 3 --out load.json      # starts a tiny server
    python benchmarks/load.py --url http://127.0.0.1:8000 --api-key KEY --server-pid 1234 --out load.json

Without `--url` the service is started with the tiny profile as `t2i-reward serve` in a child process of
this script (its own process, so its RSS is the server's alone; Redis db 12, emptied before and after).
With `--url`, RSS comes from `--server-pid` (or, for a loopback URL, the process listening on its port).

Each client thread (httpx, one connection) repeats, until the round's deadline, a request drawn from the
mix: /reward with base64 PNGs in JSON, /reward with multipart files, /reward/gradient with a safetensors
tensor, /prompts, GET /jobs and GET /jobs/{id} (two jobs are submitted at the start and cancelled at
once, so no worker ever trains them). Prints a table per round and writes everything as JSON with --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
from PIL import Image
from t2i_reward.rewarders import wire

MIX = {"POST /reward json": 3, "POST /reward multipart": 3, "POST /reward/gradient": 2, "POST /prompts": 2,
       "GET /jobs": 1, "GET /jobs/{id}": 1}
PROMPT = "a red apple on a wooden table"


def png(seed: int, w: int, h: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize((w, h)).save(buf, format="PNG")
    return buf.getvalue()


class Payloads:
    """Pre-built request bodies, so the clients spend their time waiting on the server."""

    def __init__(self) -> None:
        self.images = [png(i, 96 + 32 * i, 128 - 16 * i) for i in range(4)]
        self.json = [wire.encode_json_request(PROMPT, self.images[: k + 1]) for k in range(2)]
        gen = torch.Generator().manual_seed(0)
        self.tensors = [wire.encode_tensor_request(torch.rand(b, 3, 64, 64, generator=gen), [PROMPT] * b)
                        for b in (1, 2)]
        self.topics = [{"topics": ["a cat"], "n_prompts": 3}, {"topics": ["landscape", "portrait"], "n_prompts": 5, "diversity": 0.5}]
        self.job_ids: list[str] = []

    def send(self, http: httpx.Client, kind: str, rng: random.Random) -> httpx.Response:
        if kind == "POST /reward json":
            return http.post("/reward", json=rng.choice(self.json))
        if kind == "POST /reward multipart":
            files = [("images", (f"{i}.png", im, "image/png")) for i, im in enumerate(rng.sample(self.images, rng.randint(1, 2)))]
            return http.post("/reward", data={"prompt": PROMPT}, files=files)
        if kind == "POST /reward/gradient":
            return http.post("/reward/gradient", content=rng.choice(self.tensors), headers={"content-type": wire.OCTET})
        if kind == "POST /prompts":
            return http.post("/prompts", json=rng.choice(self.topics))
        if kind == "GET /jobs":
            return http.get("/jobs", params={"limit": rng.choice([1, 20])})
        return http.get(f"/jobs/{rng.choice(self.job_ids) if self.job_ids else 'no-such-job'}")


def submit_jobs(http: httpx.Client, n: int = 2) -> list[str]:
    """Jobs to read back; cancelled at once, so a worker (if any) never trains them."""
    ids = []
    for i in range(n):
        r = http.post("/jobs", json={"prompts": [PROMPT], "steps": 1, "base_model": "tiny", "seed": i})
        if r.status_code == 202:
            ids.append(r.json()["id"])
            http.post(f"/jobs/{ids[-1]}/cancel")
        else:
            print(f"job submission answered {r.status_code}: {r.text[:200]}", file=sys.stderr)
    return ids


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def listening_pid(url: str) -> int | None:
    """The process listening on a loopback URL's port (None when it cannot be told)."""
    try:
        import psutil
    except ImportError:
        return None
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    with contextlib.suppress(psutil.Error):
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == (parts.port or 80) and c.pid:
                return c.pid
    return None


def run_round(url: str, headers: dict, payloads: Payloads, clients: int, seconds: float, timeout: float, seed: int) -> dict:
    """`clients` threads for `seconds`; per endpoint: latencies of answered requests and status counts."""
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    kinds, weights = list(MIX), list(MIX.values())

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
            while time.monotonic() < deadline:
                kind = rng.choices(kinds, weights)[0]
                t = time.perf_counter()
                try:
                    status = str(payloads.send(http, kind, rng).status_code)
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.HTTPError as e:
                    status = type(e).__name__
                with lock:
                    statuses[kind][status] += 1
                    if status.isdigit():
                        latencies[kind].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = {}
    for kind in kinds:
        lat = np.asarray(latencies[kind]) * 1000
        out[kind] = {"requests": sum(statuses[kind].values()), "status": dict(sorted(statuses[kind].items())),
                     "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
                     "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None}
    return {"wall_s": round(wall, 1), "requests_per_s": round(sum(v["requests"] for v in out.values()) / wall, 1), "endpoints": out}


@contextlib.contextmanager
def tiny_server(api_key: str, redis_url: str):
    """`t2i-reward serve --profile tiny` in a child process; yields (url, pid). Its Redis db is emptied."""
    import redis

    root = Path(tempfile.mkdtemp(prefix="t2i-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "T2I_SERVICE_API_KEYS": json.dumps([api_key]), "T2I_SERVICE_REDIS_URL": redis_url,
           "T2I_SERVICE_JOBS_DIR": str(root / "jobs"), "T2I_SERVICE_MODELS_DIR": str(root / "models"),
           "T2I_SERVICE_DATA_DIR": str(root / "data")}
    db = redis.Redis.from_url(redis_url)
    db.flushdb()
    log = open(root / "server.log", "w")
    exe = Path(sys.executable).parent / "t2i-reward"
    proc = subprocess.Popen([str(exe), "serve", "--profile", "tiny", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 600
        while time.time() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: see {root / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise TimeoutError("server never became ready")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        db.flushdb()


def print_table(rounds: list[dict], rss_start: float | None) -> None:
    print(f"RSS after warm-up: {rss_start if rss_start is None else f'{rss_start:.0f} MB'}")
    for i, r in enumerate(rounds, 1):
        rss = r["rss_mb"]
        print(f"\nround {i}: {r['wall_s']} s, {r['requests_per_s']} req/s, server RSS after: {rss if rss is None else f'{rss:.0f} MB'}")
        print(f"  {'endpoint':26} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8}  statuses")
        for kind, e in r["endpoints"].items():
            print(f"  {kind:26} {e['requests']:8} {e['p50_ms'] or '-':>8} {e['p99_ms'] or '-':>8}  {e['status']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service; default: start a tiny one")
    p.add_argument("--api-key", default="load-key")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (1..256)")
    p.add_argument("--seconds", type=float, default=20, help="length of a round (1..3600)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (1..100)")
    p.add_argument("--timeout", type=float, default=60, help="per request; past it a request counts as 'timeout'")
    p.add_argument("--server-pid", type=int, help="with --url: the server process, for its RSS")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="the started server's Redis (emptied)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not (1 <= args.clients <= 256 and 1 <= args.seconds <= 3600 and 1 <= args.rounds <= 100):
        p.error("--clients must be in 1..256, --seconds in 1..3600, --rounds in 1..100")
    headers = {"x-api-key": args.api_key}
    payloads = Payloads()
    server = contextlib.nullcontext((args.url, args.server_pid or listening_pid(args.url))) if args.url else tiny_server(args.api_key, args.redis_url)
    with server as (url, pid):
        with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as http:
            payloads.job_ids = submit_jobs(http)
            for kind in MIX:  # warm-up: every path once, so round 1 does not pay the first-call costs
                payloads.send(http, kind, random.Random(0))
        rss_start = rss_mb(pid)
        rounds = []
        for i in range(args.rounds):
            r = run_round(url, headers, payloads, args.clients, args.seconds, args.timeout, args.seed + i)
            r["rss_mb"] = rss_mb(pid)
            rounds.append(r)
            print(f"round {i + 1}/{args.rounds} done: {r['requests_per_s']} req/s, RSS {r['rss_mb']}", file=sys.stderr, flush=True)
    print_table(rounds, rss_start)
    rss = [r["rss_mb"] for r in rounds if r["rss_mb"] is not None]
    growth = round(rss[-1] - rss[0], 1) if len(rss) > 1 else None
    print(f"\nRSS growth from round 1 to round {len(rounds)}: {growth} MB")
    if args.out:
        args.out.write_text(json.dumps({"url": url, "clients": args.clients, "seconds": args.seconds, "mix": MIX, "server_pid": pid,
                                        "rss_start_mb": rss_start, "rss_growth_mb": growth, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

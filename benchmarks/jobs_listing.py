"""How fast `GET /jobs` stays with many large finished jobs, and what they cost in Redis.

    python benchmarks/jobs_listing.py --jobs 1000 --steps 10000

Starts a private redis-server (no persistence) on a free port, creates `--jobs` finished jobs the way a
worker leaves them (claimed, then a terminal write with `--steps` steps of reward, loss, kl and three
expert curves; the store keeps at most 1000 points per curve), then times a page of the listing through
the library (`JobStore.list`) and through the app (`GET /jobs` on `create_app`, in-process, once it is
ready), and one full record (`GET /jobs/{id}`). For comparison it also times the listing as it was before
(one HGETALL per job with every step's metrics, decoded) on `--old-jobs` jobs holding full curves.
Prints one JSON object: medians in milliseconds, Redis memory per job in KiB.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.finetune.jobs import INDEX, PREFIX, JobStore  # noqa: E402
from t2i_reward.finetune.spec import JobSpec  # noqa: E402

EXPERTS = ("imagereward", "aesthetic", "mlp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curves(steps: int, rng: random.Random) -> dict:
    c = lambda: [rng.random() for _ in range(steps)]  # noqa: E731
    return {"reward": c(), "loss": c(), "kl": c(), "processes": 1, "components": {e: c() for e in EXPERTS}}


def timed(fn, repeats: int) -> float:
    fn()  # warm: connections, scripts
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--old-jobs", type=int, default=40, help="jobs in the old layout (each holds every step)")
    ap.add_argument("--page", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    folder, port = Path(tempfile.mkdtemp(prefix="jobs-bench-")), free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        admin = redis.Redis(port=port)
        for _ in range(100):
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        rng = random.Random(0)
        store = JobStore(url)
        spec = JobSpec(method="refl", base_model="tiny", prompts=["a red apple"], steps=min(args.steps, 10_000))
        one = curves(args.steps, rng)  # the same curves for every job: building them is not what we time

        before = used(admin)
        t0 = time.perf_counter()
        for k in range(args.jobs):
            job_id = store.create(spec)
            store.start(job_id, 1, "1:bench", 60)
            store.owned_write(job_id, 1, "1:bench", 60, {
                "status": "succeeded", "metrics": one, "artifacts": ["metrics.json", "pytorch_lora_weights.safetensors"],
                "progress": {"step": args.steps, "total": args.steps, "eta_s": 0}}, retention_s=7 * 24 * 3600)
        create_s = time.perf_counter() - t0
        per_job_kib = (used(admin) - before) / args.jobs / 1024

        out = {
            "jobs": args.jobs, "steps": args.steps, "page": args.page,
            "create_and_finish_s": round(create_s, 1),
            "redis_kib_per_job": round(per_job_kib, 1),
            "library_list_ms": timed(lambda: store.list(0, args.page), args.repeats),
            "library_list_last_page_ms": timed(lambda: store.list(args.jobs - args.page, args.page), args.repeats),
        }
        job_id = store.list(0, 1)[1][0]["id"]
        out["library_get_ms"] = timed(lambda: store.get(job_id), args.repeats)

        from fastapi.testclient import TestClient
        from t2i_reward.service.app import create_app
        from t2i_reward.service.settings import Settings

        with TestClient(create_app(Settings(redis_url=url, profile="tiny"))) as client:
            for _ in range(600):  # time the listing once the models and prompt index are loaded, not while
                if client.get("/readyz").status_code == 200:
                    break
                time.sleep(0.5)
            assert client.get("/jobs", params={"limit": args.page}).status_code == 200
            out["app_list_ms"] = timed(lambda: client.get("/jobs", params={"limit": args.page}), args.repeats)
            out["app_get_ms"] = timed(lambda: client.get(f"/jobs/{job_id}"), args.repeats)

        # the old layout and listing: every step's metrics in the hash, read back whole for each listed job
        old = redis.Redis(port=port, db=1, decode_responses=True)
        before = used(admin)
        full = json.dumps(one)
        for k in range(args.old_jobs):
            old.hset(f"{PREFIX}old{k}", mapping={"id": f"old{k}", "spec": spec.model_dump_json(), "status": "succeeded",
                                                  "progress": "{}", "metrics": full, "artifacts": "[]", "error": "",
                                                  "created_at": k, "updated_at": k, "attempt": 1})
            old.zadd(INDEX, {f"old{k}": k})
        out["old_redis_kib_per_job"] = round((used(admin) - before) / args.old_jobs / 1024, 1)

        def old_list():
            ids = old.zrevrange(INDEX, 0, args.page - 1)
            return [{**raw, "metrics": json.loads(raw["metrics"])} for raw in (old.hgetall(PREFIX + i) for i in ids)]

        out["old_library_list_ms"] = timed(old_list, args.repeats)
        print(json.dumps(out))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

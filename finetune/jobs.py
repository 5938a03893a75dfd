"""Fine-tuning jobs in Redis: their state (for the API, from any replica) and the rq queue (for workers).

Why rq: it is a small, well-kept Redis queue with long job timeouts and a worker class that runs jobs
in its own process without forking (`SimpleWorker`), which keeps CUDA safe. State, progress and metrics
live in one Redis hash per job, written by the worker and read by the API.

A worker heartbeats into the job while it runs. When a worker dies, its heartbeat goes stale; any live
worker's reaper then puts the job back on the queue, and `run_job` resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from typing import Optional

import redis
from rq import Queue

from .spec import JobSpec

PREFIX = "t2i:job:"
INDEX = "t2i:jobs"
QUEUE = "t2i-finetune"
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_TIMEOUT_S = 7 * 24 * 3600


class JobStore:
    def __init__(self, url: str):
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.queue = Queue(QUEUE, connection=redis.Redis.from_url(url))

    def close(self) -> None:
        self.redis.close()
        self.queue.connection.close()

    # ---- API side
    def create(self, spec: JobSpec) -> str:
        job_id = secrets.token_urlsafe(16)  # unguessable: ids are capabilities to read a job's artifacts
        now = time.time()
        self.redis.hset(PREFIX + job_id, mapping={
            "id": job_id, "spec": spec.model_dump_json(), "status": "queued", "attempt": 0,
            "progress": json.dumps({"step": 0, "total": spec.steps, "eta_s": None}),
            "metrics": json.dumps({"reward": [], "loss": [], "kl": []}), "artifacts": "[]", "error": "",
            "created_at": now, "updated_at": now, "heartbeat": 0, "cancel": 0,
        })
        self.redis.zadd(INDEX, {job_id: now})
        self.enqueue(job_id)
        return job_id

    def enqueue(self, job_id: str) -> None:
        attempt = self.redis.hincrby(PREFIX + job_id, "attempt", 1)
        self.queue.enqueue("finetune.worker.execute_job", job_id, job_id=f"{job_id}-{attempt}",
                           job_timeout=JOB_TIMEOUT_S, result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600)

    def get(self, job_id: str) -> Optional[dict]:
        raw = self.redis.hgetall(PREFIX + job_id)
        if not raw:
            return None
        return {
            "id": raw["id"], "status": raw["status"], "progress": json.loads(raw["progress"]),
            "metrics": json.loads(raw["metrics"]), "artifacts": json.loads(raw["artifacts"]),
            "error": raw["error"] or None, "created_at": float(raw["created_at"]), "updated_at": float(raw["updated_at"]),
            "attempt": int(raw["attempt"]), "spec": json.loads(raw["spec"]),
        }

    def list(self, offset: int, limit: int) -> tuple[int, list[dict]]:
        ids = self.redis.zrevrange(INDEX, offset, offset + limit - 1)
        return self.redis.zcard(INDEX), [j for j in (self.get(i) for i in ids) if j is not None]

    def cancel(self, job_id: str) -> str:
        """Ask a job to stop. A queued job is cancelled at once; a running one at its next step."""
        status = self.redis.hget(PREFIX + job_id, "status")
        if status in TERMINAL:
            return status
        self.redis.hset(PREFIX + job_id, mapping={"cancel": 1, "updated_at": time.time()})
        if status == "queued":
            self.update(job_id, status="cancelled")
            return "cancelled"
        return status

    # ---- worker side
    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.model_validate_json(self.redis.hget(PREFIX + job_id, "spec"))

    def status(self, job_id: str) -> Optional[str]:
        return self.redis.hget(PREFIX + job_id, "status")

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(PREFIX + job_id, "cancel") == "1"

    def update(self, job_id: str, **fields) -> None:
        mapping = {k: (json.dumps(v) if k in ("progress", "metrics", "artifacts") else v) for k, v in fields.items()}
        mapping["updated_at"] = time.time()
        self.redis.hset(PREFIX + job_id, mapping=mapping)

    def heartbeat(self, job_id: str) -> None:
        self.redis.hset(PREFIX + job_id, mapping={"heartbeat": time.time(), "worker": worker_name()})

    def requeue_stale(self, timeout_s: float) -> list[str]:
        """Put running jobs whose worker stopped heartbeating back on the queue (they resume)."""
        requeued = []
        for job_id in self.redis.zrange(INDEX, 0, -1):
            raw = self.redis.hmget(PREFIX + job_id, "status", "heartbeat", "attempt")
            status, beat, attempt = raw
            if status != "running" or time.time() - float(beat or 0) < timeout_s:
                continue
            # one reaper wins per attempt, even with several workers
            if self.redis.set(f"{PREFIX}{job_id}:requeue:{attempt}", worker_name(), nx=True, ex=3600):
                self.update(job_id, status="queued")
                self.enqueue(job_id)
                requeued.append(job_id)
        return requeued


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

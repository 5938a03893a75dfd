"""Fine-tuning jobs in Redis: their state (for the API, from any replica) and the rq queue (for workers).

Why rq: it is a small, well-kept Redis queue with long job timeouts and a worker class that runs jobs
in its own process without forking (`SimpleWorker`), which keeps CUDA safe. State, progress and metrics
live in one Redis hash per job, written by the worker and read by the API.

Ownership (why: a Redis blip must never let two workers run one job in the same directory). Every run of
a job is an *attempt*, numbered in the hash and passed with the rq job. A runner starts only if the
stored attempt is still the one it was queued with and it takes the job's *lease* (`<job>:lease`, SET NX
PX heartbeat_timeout, holding the attempt and a per-runner nonce). Every worker-side write goes through
one Lua script that applies it only while the attempt is still the runner's and the lease is the
runner's (or has lapsed with nobody taking over), and renews the lease. The reaper re-queues only
running jobs whose lease expired, bumping the attempt in the same transaction as the enqueue, so a runner
that was cut off finds its writes refused when it comes back.

No window leaves a job stuck. rq moves a job out of its queue before our claim; a worker that dies in
between leaves the job `queued` in no queue. Queued jobs are therefore tracked too, and a sweep (each
worker's reaper) hands a queued job that has been in no rq queue for longer than the lease to a new
attempt. A job whose runner keeps dying gets `max_attempts` lost attempts, then fails (a poison job); a
worker asked to stop hands its job back as a new attempt (`hand_back`).

Quotas (why: any key holder could fill Redis): `create` refuses a job past a cap on queued plus running
jobs, in total and per API key (`QuotaExceeded`), checked and written in one transaction; queued jobs
expire after a TTL (`expire_queued`).

Keys: `t2i:job:<id>` (hash), `t2i:job:<id>:lease`, `t2i:jobs` (index, by creation time),
`t2i:jobs:running` (what the reaper scans), `t2i:jobs:queued` (queued jobs, by the time they were queued:
what the sweep scans), `t2i:jobs:owner:<key digest>` (an API key's queued and running jobs, pruned at each
submission), `t2i:jobs:expiry` (when terminal jobs leave the index; their hash expires by itself after the
retention).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import time
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.serializers import JSONSerializer

from .spec import JobSpec

PREFIX = "t2i:job:"
INDEX = "t2i:jobs"
RUNNING = "t2i:jobs:running"
QUEUED = "t2i:jobs:queued"
OWNER = "t2i:jobs:owner:"
EXPIRY = "t2i:jobs:expiry"
QUEUE = "t2i-finetune"
TERMINAL = ("succeeded", "failed", "cancelled")
JOB_TIMEOUT_S = 7 * 24 * 3600
DEFAULT_RETENTION_S = 7 * 24 * 3600
DEFAULT_MAX_ATTEMPTS = 3
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # secrets.token_urlsafe's alphabet; nothing else reaches a key
MAX_OFFSET = 1_000_000  # of a listing page (the API bounds it too)
METRIC_POINTS = 1000  # most points per curve kept in Redis (metrics.json keeps them all)
MAX_ERROR_CHARS = 4000
SUMMARY = ("id", "status", "progress", "error", "created_at", "updated_at")
JSON_FIELDS = ("progress", "metrics", "artifacts")

# KEYS: hash, lease, running, expiry. ARGV: token, attempt, lease_ms, ttl_s (> 0: terminal), now, job id,
# then field, value, ... Applied only while the attempt is the caller's and the lease is the caller's or
# lapsed (the reaper bumps the attempt when it re-queues, so a lapsed lease with our attempt means nobody
# took over). Returns -1 (refused: superseded) or the cancel flag.
_OWNED_WRITE = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return -1 end
local lease = redis.call('GET', KEYS[2])
if lease and lease ~= ARGV[1] then return -1 end
if #ARGV > 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[6])
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl))
  redis.call('ZADD', KEYS[4], tonumber(ARGV[5]) + ttl, ARGV[6])
else
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
return 0
"""

# KEYS: hash, lease, running, queued. ARGV: token, attempt, lease_ms, now, job id, worker. Returns {state, spec}:
# 'ok' (we hold the lease; idempotent for a retried call), 'gone', a terminal status, 'stale' (a newer
# attempt exists) or 'busy' (another runner holds this attempt: a duplicate delivery).
_START = """
local h = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'spec')
if not h[1] then return {'gone', ''} end
if h[1] == 'succeeded' or h[1] == 'failed' or h[1] == 'cancelled' then return {h[1], ''} end
if h[2] ~= ARGV[2] then return {'stale', ''} end
local lease = redis.call('GET', KEYS[2])
if lease == ARGV[1] then return {'ok', h[3]} end
if lease then return {'busy', ''} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'running', 'heartbeat', ARGV[4], 'updated_at', ARGV[4], 'worker', ARGV[6],
           'run:' .. ARGV[2], ARGV[6] .. '@' .. ARGV[4])
redis.call('HDEL', KEYS[1], 'missing_since')
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('ZREM', KEYS[4], ARGV[5])
return {'ok', h[3]}
"""

# KEYS: hash, expiry, queued. ARGV: now, ttl_s, job id. A queued job is cancelled at once (and starts its retention).
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return false end
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return s end
redis.call('HSET', KEYS[1], 'cancel', 1, 'updated_at', ARGV[1])
if s ~= 'queued' then return s end
redis.call('HSET', KEYS[1], 'status', 'cancelled')
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])))
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
return 'cancelled'
"""

# KEYS: index, expiry. ARGV: now, offset, limit, prefix, fields... Drops expired jobs from the index, then
# returns {total, {fields of each job on the page}}: one round trip, without the per-step metrics.
_LIST = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
local out = {redis.call('ZCARD', KEYS[1])}
local ids = redis.call('ZREVRANGE', KEYS[1], ARGV[2], tonumber(ARGV[2]) + tonumber(ARGV[3]) - 1)
for _, id in ipairs(ids) do
  out[#out + 1] = redis.call('HMGET', ARGV[4] .. id, unpack(ARGV, 5))
end
return out
"""


# KEYS: queued, expiry. ARGV: now, ttl_s, retention_s, prefix, message. Fails the jobs queued for longer than
# ttl_s (a worker that dequeues one later finds it failed and does not run it); returns their ids.
_EXPIRE_QUEUED = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]), 'LIMIT', 0, 1000)
local out = {}
for _, id in ipairs(ids) do
  local h = ARGV[4] .. id
  redis.call('ZREM', KEYS[1], id)
  if redis.call('HGET', h, 'status') == 'queued' then
    redis.call('HSET', h, 'status', 'failed', 'error', ARGV[5], 'updated_at', ARGV[1])
    redis.call('EXPIRE', h, math.ceil(tonumber(ARGV[3])))
    redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[3]), id)
    out[#out + 1] = id
  end
end
return out
"""

# KEYS: queued, the rq queue's list. ARGV: now, grace_s, prefix. The dequeue-claim window: a queued job whose
# current attempt is in no rq queue is marked (`missing_since`); one missing for longer than grace_s is
# returned ({id, attempt, ...}) to be queued again. Members that are no longer queued leave the set.
_SWEEP = """
local waiting = {}
for _, rq_id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do waiting[rq_id] = true end
local lost = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = ARGV[3] .. id
  local s = redis.call('HMGET', h, 'status', 'attempt', 'missing_since')
  if s[1] ~= 'queued' then
    redis.call('ZREM', KEYS[1], id)
  elseif waiting[id .. '-' .. s[2]] then
    if s[3] then redis.call('HDEL', h, 'missing_since') end
  elseif not s[3] then
    redis.call('HSET', h, 'missing_since', ARGV[1])
  elseif tonumber(ARGV[1]) - tonumber(s[3]) > tonumber(ARGV[2]) then
    lost[#lost + 1] = id
    lost[#lost + 1] = s[2]
  end
end
return lost
"""


class QuotaExceeded(Exception):
    """Too many queued and running jobs, in total or for one API key (the API answers 429)."""


class LeaseLost(Exception):
    """This runner no longer owns its job (a newer attempt took over, or it was cut off from Redis)."""


def check_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise ValueError("a job id is 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return job_id


def key(job_id: str) -> str:
    return PREFIX + check_id(job_id)


def bounded_metrics(metrics: dict, points: int = METRIC_POINTS) -> dict:
    """A copy of `metrics` whose per-step curves longer than `points` are thinned to every k-th step
    (`stride` = k), so a job's hash stays small whatever its length (metrics.json keeps every step). A copy,
    because the training thread appends to the curves while the state writer encodes them."""
    curves = [v for v in metrics.values() if isinstance(v, list)] + list((metrics.get("components") or {}).values())
    k = max(1, math.ceil(max(map(len, curves), default=0) / points))
    thin = lambda n, v: list(v[::k]) if isinstance(v, list) and n != "resumed_at" else v  # noqa: E731
    out = {n: thin(n, v) for n, v in list(metrics.items()) if n != "rounds"}
    if isinstance(metrics.get("rounds"), list):  # active learning: each round's scores; its prompts are in metrics.json
        out["rounds"] = [{k: r[k] for k in ("round", "train_reward", "eval") if k in r} for r in list(metrics["rounds"])]
    if isinstance(metrics.get("components"), dict):
        out["components"] = {n: thin(n, v) for n, v in list(metrics["components"].items())}
    if k > 1:
        out["stride"] = k
    return out


def encode(fields: dict) -> dict:
    """Hash values for the fields of a job: JSON where structured, metrics and errors bounded."""
    out = {}
    for k, v in fields.items():
        if k == "metrics":
            v = bounded_metrics(v)
        if k == "error" and v:
            v = str(v)[:MAX_ERROR_CHARS]
        out[k] = json.dumps(v) if k in JSON_FIELDS else v
    return out


class JobStore:
    """Job state and the queue. `socket_timeout` turns a hung Redis into an error; `retries` are redis-py's
    own retries per command (0 for a worker, which retries on its own schedule)."""

    def __init__(self, url: str, socket_timeout: Optional[float] = 10.0, retries: int = 1):
        opts = dict(socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), retries))
        self.redis = redis.Redis.from_url(url, decode_responses=True, **opts)
        # rq wants bytes; JSON, not pickle: a queued call is only (function path, job id, attempt), and a
        # worker must never unpickle what it finds in Redis
        self.queue = Queue(QUEUE, connection=redis.Redis.from_url(url, **opts), serializer=JSONSerializer)
        self._owned_write = self.redis.register_script(_OWNED_WRITE)
        self._start = self.redis.register_script(_START)
        self._cancel = self.redis.register_script(_CANCEL)
        self._list = self.redis.register_script(_LIST)
        self._expire_queued = self.redis.register_script(_EXPIRE_QUEUED)
        self._sweep = self.redis.register_script(_SWEEP)

    def close(self) -> None:
        self.redis.close()
        self.queue.connection.close()

    def _enqueue(self, job_id: str, attempt: int, pipe) -> None:
        self.queue.enqueue("t2i_reward.finetune.worker.execute_job", job_id, attempt, job_id=f"{job_id}-{attempt}", pipeline=pipe,
                           job_timeout=JOB_TIMEOUT_S, result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600)

    # ---- API side
    def create(self, spec: JobSpec, owner: str = "-", max_active: Optional[int] = None,
               max_per_owner: Optional[int] = None) -> str:
        """The hash, the index entry and the rq job in one MULTI/EXEC: all or nothing. With caps, the count of
        queued plus running jobs (in total, and of `owner`: a digest of the API key) is checked in the same
        transaction (WATCH), so concurrent submissions cannot overshoot it; QuotaExceeded past a cap."""
        job_id = secrets.token_urlsafe(16)  # unguessable: ids are capabilities to read a job's artifacts
        owned = OWNER + owner
        for _ in range(100):  # a WATCH conflict means another submission or a claim got in first: count again
            with self.queue.connection.pipeline() as pipe:
                try:
                    pipe.watch(QUEUED, RUNNING, owned)
                    active = pipe.zcard(QUEUED) + pipe.scard(RUNNING)
                    if max_active is not None and active >= max_active:
                        raise QuotaExceeded(f"{active} jobs are queued or running; the limit is {max_active}")
                    mine, done = [], []
                    if max_per_owner is not None:  # the owner's set, pruned of the jobs that ended since
                        mine = [m.decode() for m in pipe.smembers(owned)]
                        with self.redis.pipeline(transaction=False) as read:
                            for m in mine:
                                read.hget(key(m), "status")
                            statuses = read.execute()
                        done = [m for m, st in zip(mine, statuses) if st is None or st in TERMINAL]
                        if len(mine) - len(done) >= max_per_owner:
                            raise QuotaExceeded(f"this API key has {len(mine) - len(done)} jobs queued or running; "
                                                f"the limit is {max_per_owner}")
                    now = time.time()
                    pipe.multi()
                    if done:
                        pipe.srem(owned, *done)
                    pipe.hset(key(job_id), mapping=encode({
                        "id": job_id, "spec": spec.model_dump_json(), "status": "queued", "attempt": 1,
                        "progress": {"step": 0, "total": spec.total_steps, "eta_s": None},
                        "metrics": {"reward": [], "loss": [], "kl": []}, "artifacts": [], "error": "",
                        "created_at": now, "updated_at": now, "heartbeat": 0, "cancel": 0, "owner": owner,
                    }))
                    pipe.zadd(INDEX, {job_id: now})
                    pipe.zadd(QUEUED, {job_id: now})
                    if max_per_owner is not None:
                        pipe.sadd(owned, job_id)
                    self._enqueue(job_id, 1, pipe)
                    pipe.execute()
                    return job_id
                except redis.WatchError:
                    continue
        raise redis.RedisError("too many concurrent submissions and claims to count the queued jobs; retry")

    def expire_queued(self, ttl_s: float, retention_s: float = DEFAULT_RETENTION_S) -> list[str]:
        """Fail the jobs queued for longer than `ttl_s` (nobody ran them); returns their ids."""
        message = f"expired: not started within {ttl_s:g} s of being queued (no worker took it)"
        return self._expire_queued(keys=[QUEUED, EXPIRY], args=[time.time(), ttl_s, retention_s, PREFIX, message])

    def get(self, job_id: str) -> Optional[dict]:
        raw = self.redis.hgetall(key(job_id))
        if not raw or "status" not in raw:
            return None
        return {
            "id": raw["id"], "status": raw["status"], "progress": json.loads(raw["progress"]),
            "metrics": json.loads(raw["metrics"]), "artifacts": json.loads(raw["artifacts"]),
            "error": raw["error"] or None, "created_at": float(raw["created_at"]), "updated_at": float(raw["updated_at"]),
            "attempt": int(raw["attempt"]), "spec": json.loads(raw["spec"]),
        }

    def list(self, offset: int, limit: int) -> tuple[int, list[dict]]:
        """Summaries (no metrics) of one page of jobs, newest first, in one round trip; expired jobs leave the index."""
        if not (0 <= offset <= MAX_OFFSET and 1 <= limit <= 1000):
            raise ValueError(f"offset must be in [0, {MAX_OFFSET}] and limit in [1, 1000]")
        total, *rows = self._list(keys=[INDEX, EXPIRY], args=[time.time(), offset, limit, PREFIX, *SUMMARY])
        jobs = []
        for row in rows:
            job = dict(zip(SUMMARY, row))
            if job["status"] is None:  # expired between two prunes
                continue
            jobs.append({**job, "progress": json.loads(job["progress"]), "error": job["error"] or None,
                         "created_at": float(job["created_at"]), "updated_at": float(job["updated_at"])})
        return total, jobs

    def cancel(self, job_id: str, retention_s: float = DEFAULT_RETENTION_S) -> Optional[str]:
        """Ask a job to stop. A queued job is cancelled at once; a running one at its next step."""
        return self._cancel(keys=[key(job_id), EXPIRY, QUEUED], args=[time.time(), retention_s, job_id])

    # ---- worker side
    def start(self, job_id: str, attempt: int, token: str, lease_s: float) -> tuple[str, Optional[str]]:
        """Claim `attempt` of the job: ('ok', the spec's JSON) when this runner may run it, else (why not, None)."""
        now = time.time()
        state, spec = self._start(keys=[key(job_id), key(job_id) + ":lease", RUNNING, QUEUED],
                                  args=[token, attempt, int(lease_s * 1000), now, job_id, worker_name()])
        return state, (spec if state == "ok" else None)

    def attempt(self, job_id: str) -> int:
        return int(self.redis.hget(key(job_id), "attempt") or 0)

    def owned_write(self, job_id: str, attempt: int, token: str, lease_s: float, fields: dict,
                    retention_s: float = 0) -> Optional[bool]:
        """Write `fields` (and a heartbeat) if this runner still owns the job, renewing its lease; with
        `retention_s` > 0 the write is terminal: the lease goes and the job expires after the retention.
        Returns None when refused (superseded), else whether a cancel was requested."""
        now = time.time()
        mapping = encode({**fields, "updated_at": now, "heartbeat": now, "worker": worker_name()})
        flat = [x for kv in mapping.items() for x in kv]
        r = self._owned_write(keys=[key(job_id), key(job_id) + ":lease", RUNNING, EXPIRY],
                              args=[token, attempt, int(lease_s * 1000), retention_s, now, job_id, *flat])
        return None if r == -1 else bool(r)

    def requeue_stale(self, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                      retention_s: float = DEFAULT_RETENTION_S) -> list[tuple[str, str]]:
        """Queue again the running jobs whose lease expired (their runner died or was cut off); they resume.
        A job that has lost `max_attempts` attempts this way fails instead (a poison job: it may be what
        kills its workers), its checkpoints kept. Only the running set is scanned, not every job ever
        created. Returns (job id, "requeued" or "failed") for each job it acted on."""
        ids = sorted(self.redis.smembers(RUNNING))
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(key(job_id) + ":lease")
                pipe.hget(key(job_id), "status")
            found = pipe.execute()
        acted = []
        for job_id, held, status in zip(ids, found[::2], found[1::2]):
            if status != "running":  # finished or expired: not ours to scan any more
                self.redis.srem(RUNNING, job_id)
            elif not held:
                outcome = self._requeue(job_id, max_attempts, retention_s)
                if outcome is not None:
                    acted.append((job_id, outcome))
        return acted

    def _requeue(self, job_id: str, max_attempts: int, retention_s: float) -> Optional[str]:
        """Bump the attempt and enqueue it (or fail a job out of attempts), in one transaction that fails if
        the lease or the job changed meanwhile (the runner came back, or another reaper won)."""
        h, lease = key(job_id), key(job_id) + ":lease"
        with self.queue.connection.pipeline() as pipe:
            try:
                pipe.watch(h, lease)
                status, attempt, lost, worker = pipe.hmget(h, "status", "attempt", "lost", "worker")
                if pipe.exists(lease) or status != b"running":
                    return None
                attempt, lost, now = int(attempt), int(lost or 0) + 1, time.time()
                pipe.multi()
                pipe.srem(RUNNING, job_id)
                if lost >= max_attempts:
                    last = (worker or b"?").decode()
                    pipe.hset(h, mapping={"status": "failed", "lost": lost, "updated_at": now, "error": (
                        f"gave up after {lost} attempts: each time, its worker died or was cut off before the job "
                        f"finished (the last one: {last}); its checkpoints are kept in the job directory")})
                    pipe.expire(h, math.ceil(retention_s))
                    pipe.zadd(EXPIRY, {job_id: now + retention_s})
                else:
                    pipe.hset(h, mapping={"status": "queued", "attempt": attempt + 1, "lost": lost, "updated_at": now})
                    pipe.zadd(QUEUED, {job_id: now})
                    self._enqueue(job_id, attempt + 1, pipe)
                pipe.execute()
                return "failed" if lost >= max_attempts else "requeued"
            except redis.WatchError:
                return None

    def redeliver_lost(self, grace_s: float) -> list[str]:
        """The dequeue-claim window: queue again, as a new attempt, each queued job that has been in no rq
        queue for longer than `grace_s` (the worker that dequeued it died before claiming it). A worker
        that dequeued it and is still alive finds its attempt stale and does not run it."""
        lost = self._sweep(keys=[QUEUED, self.queue.key], args=[time.time(), grace_s, PREFIX])
        done = []
        for job_id, attempt in zip(lost[::2], lost[1::2]):
            h, rq_id = key(job_id), f"{job_id}-{attempt}"
            with self.queue.connection.pipeline() as pipe:
                try:
                    pipe.watch(h, self.queue.key)
                    status, current = pipe.hmget(h, "status", "attempt")
                    if status != b"queued" or current != attempt.encode() or pipe.lpos(self.queue.key, rq_id) is not None:
                        continue
                    pipe.multi()
                    pipe.hset(h, mapping={"attempt": int(attempt) + 1, "updated_at": time.time()})
                    pipe.hdel(h, "missing_since")
                    self._enqueue(job_id, int(attempt) + 1, pipe)
                    pipe.execute()
                    done.append(job_id)
                except redis.WatchError:
                    continue
        return done

    def hand_back(self, job_id: str, attempt: int, token: str, fields: dict) -> bool:
        """A runner asked to stop gives its job back: the job is queued again as a new attempt (which
        resumes from the checkpoint just written), with `fields` (the last progress) written, the lease
        released. False when this runner no longer owns the job."""
        h, lease = key(job_id), key(job_id) + ":lease"
        for _ in range(10):  # a conflict is a concurrent cancel request or a sweep: look again
            with self.queue.connection.pipeline() as pipe:
                try:
                    pipe.watch(h, lease)
                    status, current = pipe.hmget(h, "status", "attempt")
                    held = pipe.get(lease)
                    if status != b"running" or current != str(attempt).encode() or (held is not None and held != token.encode()):
                        return False
                    now = time.time()
                    pipe.multi()
                    pipe.hset(h, mapping={**encode(fields), "status": "queued", "attempt": attempt + 1, "updated_at": now})
                    pipe.delete(lease)
                    pipe.srem(RUNNING, job_id)
                    pipe.zadd(QUEUED, {job_id: now})
                    self._enqueue(job_id, attempt + 1, pipe)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
        return False

    def prune(self) -> None:
        """Drop expired jobs from the index (listing does it too)."""
        self._list(keys=[INDEX, EXPIRY], args=[time.time(), 0, 1, PREFIX, "status"])


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"

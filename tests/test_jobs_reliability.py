"""Jobs stay correct when Redis or a worker misbehaves (README: Fine-tuning jobs, Reliability).

Everything is real: private redis-server processes (append-only file, fsync on every write, so a SIGKILL
loses nothing), `t2i-reward worker` processes, the tiny SD pipeline. Outages are scaled down: the workers'
lease is `H` seconds; a short outage (< 0.8 H) must be ridden out by the same attempt, a long one (> H)
hands the job to a new attempt that resumes from its checkpoint. Run the brief's full-length scenarios with
T2I_TEST_HEARTBEAT_S=30 T2I_TEST_SHORT_OUTAGE_S=15 T2I_TEST_LONG_OUTAGE_S=40.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from t2i_reward.finetune.jobs import EXPIRY, INDEX, MAX_OFFSET, RUNNING, JobStore, key
from t2i_reward.finetune.spec import JobSpec
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

from .conftest import free_port

H = float(os.environ.get("T2I_TEST_HEARTBEAT_S", "6"))
SHORT = float(os.environ.get("T2I_TEST_SHORT_OUTAGE_S", "1.5"))
LONG = float(os.environ.get("T2I_TEST_LONG_OUTAGE_S", str(H + 2)))
FAST = dict(base_model="tiny", resolution=32, num_inference_steps=4, refl_step_range=[2, 4], guidance_scale=1.0,
            eval_images_per_prompt=1, learning_rate=5e-2, checkpoint_every=2)
SUMMARY_KEYS = {"id", "status", "progress", "error", "created_at", "updated_at"}


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None):
        self.dir, self.port = folder, port or free_port()
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                                      "--save", "", "--appendonly", "yes", "--appendfsync", "always"], stdout=subprocess.DEVNULL)
        client, end = redis.Redis(port=self.port), time.time() + 30
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.time() > end:
                    raise
                time.sleep(0.05)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


class Worker:
    def __init__(self, env: dict, log: Path):
        self.log_path = log
        with open(log, "a") as out:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "t2i-reward"), "-v", "worker"], env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        self.name = None  # hostname:pid, as the job records it

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis"))
    yield s
    s.kill()


@pytest.fixture(scope="module")
def env(tmp_path_factory, cache_dir, tiny):
    from t2i_reward.finetune.tiny import ensure_tiny_sd

    ensure_tiny_sd(cache_dir)  # built once here, not by two workers at once
    root = tmp_path_factory.mktemp("jobs-reliability")
    for d in ("jobs", "models", "data"):
        (root / d).mkdir()
    return {"T2I_SERVICE_JOBS_DIR": str(root / "jobs"), "T2I_SERVICE_MODELS_DIR": str(root / "models"),
            "T2I_SERVICE_DATA_DIR": str(root / "data"), "T2I_SERVICE_PROFILE": "tiny", "T2I_REWARD_CACHE_DIR": str(cache_dir),
            "T2I_SERVICE_HEARTBEAT_TIMEOUT_S": str(H), "T2I_SERVICE_JOB_RETENTION_S": "3600",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two workers on two cores: no oversubscription


@pytest.fixture(scope="module")
def workers(server, env, tmp_path_factory):
    """Two workers on one queue, in db 0."""
    logs = tmp_path_factory.mktemp("worker-logs")
    ws = [Worker({**os.environ, **env, "T2I_SERVICE_REDIS_URL": server.url(0)}, logs / f"w{k}.log") for k in range(2)]
    for w in ws:
        w.name = f"{os.uname().nodename}:{w.proc.pid}"
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(scope="module")
def store(server):
    s = JobStore(server.url(0), socket_timeout=2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def api(server, env, tiny):
    """The API on db 1, where no worker runs: jobs stay queued; finished jobs are kept for 1 s."""
    settings = Settings(redis_url=server.url(1), jobs_dir=Path(env["T2I_SERVICE_JOBS_DIR"]), models_dir=Path(env["T2I_SERVICE_MODELS_DIR"]),
                        data_dir=Path(env["T2I_SERVICE_DATA_DIR"]), job_retention_s=1)
    with TestClient(create_app(settings, rewarder=tiny)) as client:
        yield client


def submit(store: JobStore, steps: int, prompt: str = "a red apple") -> str:
    return store.create(JobSpec(method="refl", prompts=[prompt], steps=steps, **FAST))


def wait(store: JobStore, job_id: str, done, timeout: float = 300, each=None) -> dict:
    """Poll the job until `done(job)`; Redis errors (the outages) are waited out."""
    end, job = time.time() + timeout, None
    while time.time() < end:
        try:
            job = store.get(job_id)
            if each is not None:
                each(job_id)
        except redis.RedisError:
            job = None
        if job is not None:
            if job["status"] == "failed":
                raise AssertionError(f"job failed: {job['error']}")
            if done(job):
                return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {job and {k: job[k] for k in ('status', 'progress', 'attempt')}}")


def wait_all(store: JobStore, ids: list[str], done, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not all(done(store.get(i)) for i in ids):
        jobs = [store.get(i) for i in ids]
        assert time.time() < end and all(j["status"] in ("queued", "running") for j in jobs), jobs
        time.sleep(0.1)


def at_step(n: int):
    return lambda j: j["status"] == "running" and j["progress"]["step"] >= n


def succeeded(j: dict) -> bool:
    return j["status"] == "succeeded"


def runs(store: JobStore, job_id: str) -> dict[int, str]:
    """The attempt records: which worker claimed each attempt."""
    return {int(k[4:]): v.split("@")[0] for k, v in store.redis.hgetall(key(job_id)).items() if k.startswith("run:")}


def check_finished(store: JobStore, job: dict, steps: int) -> None:
    assert job["progress"]["step"] == steps and len(job["metrics"]["reward"]) == steps
    assert "pytorch_lora_weights.safetensors" in job["artifacts"]
    assert sorted(runs(store, job["id"])) == list(range(1, job["attempt"] + 1))  # each attempt claimed once
    assert 0 < store.redis.ttl(key(job["id"])) <= 3600 and not store.redis.sismember(RUNNING, job["id"])


# ---- the API: bounds, ids, summaries, retention, atomic creation (db 1, no worker)

def test_api_bounds_offsets_and_job_ids(api):
    for params in ({"offset": 2**64}, {"offset": MAX_OFFSET + 1}, {"offset": -1}, {"limit": 0}, {"limit": 101}):
        r = api.get("/jobs", params=params)
        assert r.status_code == 422 and r.json()["detail"], params
    schema = {p["name"]: p["schema"] for p in api.get("/openapi.json").json()["paths"]["/jobs"]["get"]["parameters"]}
    assert schema["offset"]["maximum"] == MAX_OFFSET and schema["limit"]["maximum"] == 100
    for bad in ("a:b", "t2i:jobs", "x" * 65, "a b", "a.b"):
        for method, path in (("GET", f"/jobs/{bad}"), ("POST", f"/jobs/{bad}/cancel"), ("GET", f"/jobs/{bad}/artifacts/report.png")):
            r = api.request(method, path)
            assert r.status_code == 422 and r.json()["detail"], (method, path, r.text)
    r = api.get("/jobs/no-such-job")
    assert r.status_code == 404 and "no job" in r.json()["detail"]


def test_listing_returns_summaries_and_finished_jobs_expire(api, server):
    ids = [api.post("/jobs", json={"method": "refl", "prompts": [f"a cat {k}"], "steps": 3, **FAST}).json()["id"] for k in range(3)]
    listing = api.get("/jobs", params={"limit": 2}).json()
    assert listing["total"] == 3 and [j["id"] for j in listing["jobs"]] == ids[::-1][:2]
    assert all(set(j) == SUMMARY_KEYS for j in listing["jobs"])  # no per-step metrics in a listing
    full = api.get(f"/jobs/{ids[0]}").json()
    assert {"metrics", "artifacts", "attempt"} <= set(full) and full["status"] == "queued"

    # a finished job (here: cancelled while queued) is kept for job_retention_s (1 s), then it is gone
    r = redis.Redis.from_url(server.url(1), decode_responses=True)
    assert api.post(f"/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
    assert 0 < r.pttl(key(ids[0])) <= 1000 and r.zscore(EXPIRY, ids[0]) is not None
    # and one finished by a worker: the runner's terminal write starts the retention and leaves the running set
    store = JobStore(server.url(1))
    assert store.start(ids[1], 1, "1:test", 5)[0] == "ok" and r.sismember(RUNNING, ids[1])
    assert store.owned_write(ids[1], 1, "1:test", 5, {"status": "succeeded"}, retention_s=1) is False
    assert 0 < r.pttl(key(ids[1])) <= 1000 and not r.sismember(RUNNING, ids[1]) and not r.exists(key(ids[1]) + ":lease")
    time.sleep(1.2)
    listing = api.get("/jobs").json()
    assert listing["total"] == 1 and [j["id"] for j in listing["jobs"]] == [ids[2]]
    assert api.get(f"/jobs/{ids[0]}").status_code == 404
    assert r.zrange(INDEX, 0, -1) == [ids[2]] and r.zcard(EXPIRY) == 0 and not r.exists(key(ids[1]))
    store.close()


def test_job_creation_is_all_or_nothing(api, server):
    """A user that may write the job's hash and index but not the queue: the enqueue fails half-way, and
    nothing of the job remains (before, a 'queued' job in no queue)."""
    admin = redis.Redis.from_url(server.url(2))
    admin.acl_setuser("halfway", enabled=True, passwords=["+pw"], keys=["t2i:*"], commands=["+@all"])
    halfway = JobStore(f"redis://halfway:pw@127.0.0.1:{server.port}/2")
    with pytest.raises(redis.RedisError):
        halfway.create(JobSpec(method="refl", prompts=["a cat"], steps=3, **FAST))
    assert admin.keys("*") == []
    saved, api.app.state.service.job_store = api.app.state.service.job_store, halfway  # the API on the same user: a 503 that says why
    try:
        r = api.post("/jobs", json={"method": "refl", "prompts": ["a cat"], "steps": 3, **FAST})
        assert r.status_code == 503 and "Redis" in r.json()["detail"]
        assert api.get("/jobs").json()["total"] == 0
    finally:
        api.app.state.service.job_store = saved
        halfway.close()
    assert admin.keys("*") == []


# ---- workers (db 0): outages, stalls, a superseded runner

def test_a_job_queued_by_an_older_release_still_runs(server, workers):
    """Releases before the single import root queued the function "finetune.worker.execute_job"; a worker of
    this release runs such a job (t2i_reward.finetune.worker.LEGACY_FUNCTIONS) instead of failing it."""

    class OldStore(JobStore):
        def _enqueue(self, job_id, attempt, pipe):
            self.queue.enqueue("finetune.worker.execute_job", job_id, attempt, job_id=f"{job_id}-{attempt}", pipeline=pipe)

    old = OldStore(server.url(0), socket_timeout=2)
    try:
        job_id = submit(old, steps=2)
        assert old.queue.fetch_job(f"{job_id}-1").func_name == "finetune.worker.execute_job"
        check_finished(old, wait(old, job_id, succeeded), steps=2)
    finally:
        old.close()


def test_worker_rides_out_a_short_redis_outage(server, store, workers):
    job_id = submit(store, steps=10)
    wait(store, job_id, at_step(7))
    server.kill()  # the training goes on; state writes are retried, and the terminal one waits for Redis
    time.sleep(SHORT)
    server.start()  # the same data (append-only file)
    job = wait(store, job_id, succeeded)
    check_finished(store, job, 10)
    assert job["attempt"] == 1 and "resumed_at" not in job["metrics"]  # the same runner, never handed on
    assert all(w.proc.poll() is None for w in workers)
    assert "retrying" in "".join(w.log() for w in workers)


def test_worker_started_before_redis_waits_for_it(env, tmp_path):
    """rq's loop gives up when Redis is unreachable; the worker restarts it with back-off instead of exiting."""
    port, late = free_port(), None
    worker = Worker({**os.environ, **env, "T2I_SERVICE_REDIS_URL": f"redis://127.0.0.1:{port}/0"}, tmp_path / "w.log")
    try:
        end = time.time() + 120
        while "restarting in" not in worker.log():  # it tried, failed, and waits to try again
            assert time.time() < end and worker.proc.poll() is None, worker.log()[-2000:]
            time.sleep(0.2)
        late = RedisServer(tmp_path, port)
        store = JobStore(late.url(0))
        assert wait(store, submit(store, steps=2), succeeded)["attempt"] == 1
        store.close()
    finally:
        worker.stop()
        if late is not None:
            late.kill()


def test_stall_longer_than_the_lease_runs_no_job_twice(server, store, workers):
    """The probe's case: Redis stalls (SIGSTOP) past the lease while one worker runs a job and the other
    waits for work, and the job's attempt was delivered twice. Each attempt runs once, the cut-off runner
    stops, and the job resumes under a new attempt (then it is cancelled: it is long, so that it cannot
    finish during the stall however fast the machine)."""
    job_id = submit(store, steps=400)
    store.queue.enqueue("t2i_reward.finetune.worker.execute_job", job_id, 1, job_id=f"{job_id}-1-again")
    wait(store, job_id, at_step(2))  # past a checkpoint
    server.proc.send_signal(signal.SIGSTOP)
    time.sleep(LONG)
    server.proc.send_signal(signal.SIGCONT)
    resumed = lambda j: j["attempt"] == 2 and j["progress"]["step"] > j["metrics"].get("resumed_at", [1e9])[0]  # noqa: E731
    job = wait(store, job_id, lambda j: j["status"] == "running" and resumed(j))
    resumed_at = job["metrics"]["resumed_at"]
    assert len(resumed_at) == 1 and resumed_at[0] >= 2  # handed on once, resumed from a checkpoint
    store.cancel(job_id)
    job = wait(store, job_id, lambda j: j["status"] == "cancelled")
    assert job["attempt"] == 2 and sorted(runs(store, job_id)) == [1, 2] and store.redis.ttl(key(job_id)) > 0
    logs = "".join(w.log() for w in workers)
    for n in (1, 2):
        assert len(re.findall(rf"job {job_id} attempt {n}: running", logs)) == 1
    assert re.search(rf"job {job_id} attempt 1 not run: (busy|stale)", logs)  # the duplicate delivery
    assert re.search(rf"job {job_id} attempt 1: cut off from Redis .* stopped without writing anything more", logs)
    assert all(w.proc.poll() is None for w in workers)


def test_a_superseded_runner_stops_and_writes_nothing(store, workers):
    """The runner freezes (SIGSTOP) past its lease; the other worker takes the job over (attempt 2). When
    the first comes back it must stop at once: none of its writes reaches the job."""
    job_id = submit(store, steps=10)
    wait(store, job_id, at_step(3))
    first = next(w for w in workers if w.name == store.redis.hget(key(job_id), "worker"))
    other = next(w for w in workers if w is not first)
    first.proc.send_signal(signal.SIGSTOP)
    try:
        wait(store, job_id, lambda j: j["attempt"] == 2 and j["status"] == "running", timeout=120)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    writers = set()
    job = wait(store, job_id, succeeded, each=lambda i: writers.add(store.redis.hget(key(i), "worker")))
    check_finished(store, job, 10)
    assert writers == {other.name} and runs(store, job_id) == {1: first.name, 2: other.name}
    assert re.search(rf"job {job_id} attempt 1: (superseded|cut off).*stopped without writing anything more", first.log())
    assert f"job {job_id} attempt 1: succeeded" not in first.log() and first.proc.poll() is None

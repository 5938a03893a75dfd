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
import torch
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


# ---- no job stuck, graceful stop, poison jobs, fencing, disk full (issue 30): each test on its own Redis

class Private:
    """A Redis of the test's own, a store on it, and the workers the test starts (stopped at the end)."""

    def __init__(self, folder: Path, env: dict):
        self.server = RedisServer(folder)
        self.store = JobStore(self.server.url(0), socket_timeout=2)
        self.env = {**os.environ, **env, "T2I_SERVICE_REDIS_URL": self.server.url(0)}
        self.folder, self.workers = folder, []

    def worker(self, **extra) -> Worker:
        w = Worker({**self.env, **extra}, self.folder / f"w{len(self.workers)}.log")
        w.name = f"{os.uname().nodename}:{w.proc.pid}"
        self.workers.append(w)
        return w

    def close(self):
        for w in self.workers:
            w.stop()
        self.store.close()
        self.server.kill()


@pytest.fixture
def private(tmp_path, env):
    p = Private(tmp_path, env)
    yield p
    p.close()


def until(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, f"timed out after {timeout} s: {what}"
        time.sleep(0.1)


def frozen(w: Worker) -> bool:
    """SIGSTOPped (the process's state is T)."""
    return Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def in_rq_queue(store: JobStore, rq_id: str) -> bool:
    return rq_id.encode() in store.queue.connection.lrange(store.queue.key, 0, -1)


@pytest.mark.parametrize("point", ["dequeued", "claimed", "outage"])
def test_no_job_is_stuck_whatever_point_its_worker_dies_at(private, point):
    """A worker dies after rq handed it the job and before its claim (`dequeued`), right after the claim
    (`claimed`), or while its claim is being retried through a Redis outage (`outage`: frozen before the
    claim, Redis killed, thawed, killed, Redis back). A job lost before its claim is `queued` in no rq queue;
    before the sweep it stayed so forever. Now another worker runs it within the lease plus two reaper
    periods of its start."""
    store = private.store
    first = private.worker(T2I_TEST_WORKER_HOOK="dequeued:stop" if point == "outage" else f"{point}:kill")
    job_id = submit(store, steps=3)
    if point == "outage":
        until(lambda: frozen(first), 120, "the worker froze before its claim")
        private.server.kill()
        first.proc.send_signal(signal.SIGCONT)
        until(lambda: f"job {job_id}: Redis unavailable" in first.log(), 60, "the claim is retried")
        first.proc.kill()
        private.server.start()
    assert first.proc.wait(120) == -signal.SIGKILL
    job = store.get(job_id)
    assert job["status"] == ("running" if point == "claimed" else "queued") and job["attempt"] == 1
    assert not in_rq_queue(store, f"{job_id}-1")  # in no queue: only the sweep (or the reaper) can hand it on
    started = time.time()
    second = private.worker()
    job = wait(store, job_id, succeeded, timeout=180)
    assert job["attempt"] == 2 and len(job["metrics"]["reward"]) == 3 and "pytorch_lora_weights.safetensors" in job["artifacts"]
    claimed = runs(store, job_id)
    assert claimed[2] == second.name and claimed.get(1) == (first.name if point == "claimed" else None)
    taken = float(store.redis.hget(key(job_id), "run:2").split("@")[1]) - started
    print(f"\nMEASURE window={point}: attempt 2 claimed {taken:.1f} s after the second worker started (lease {H:g} s)")
    assert second.proc.poll() is None and len(store.queue.connection.lrange(store.queue.key, 0, -1)) == 0


def test_sigterm_stops_the_job_at_a_step_and_another_worker_ends_it_as_if_uninterrupted(private):
    """SIGTERM mid-job: the worker checkpoints at the next step boundary, hands the job back as attempt 2 and
    exits within the default bound (25 s); another worker resumes it from that checkpoint, redoing no step,
    and ends with the uninterrupted job's losses and LoRA. Before, the worker waited for the whole job."""
    from safetensors.torch import load_file

    store = private.store
    spec = JobSpec(method="refl", prompts=["a red apple", "a blue car"], steps=14, **{**FAST, "checkpoint_every": 100})
    first = private.worker()
    job_id = store.create(spec)
    wait(store, job_id, at_step(4))
    second = private.worker()
    sent = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(60) == 0
    took = time.monotonic() - sent
    stopped = re.search(rf"job {job_id} attempt 1: stopped for shutdown with a checkpoint at step (\d+); queued again as attempt 2",
                        first.log())
    assert stopped, first.log()[-3000:]
    at = int(stopped.group(1))
    assert 4 <= at < 14 and took < 25, took
    job = wait(store, job_id, succeeded)
    assert job["attempt"] == 2 and runs(store, job_id) == {1: first.name, 2: second.name}
    assert job["metrics"]["resumed_at"] == [at]  # the step it stopped after: no step redone
    print(f"\nMEASURE sigterm: exited {took:.2f} s after SIGTERM; stopped after step {at}, resumed at {at}: 0 steps redone")
    whole = wait(store, store.create(spec), succeeded)  # the same job, never interrupted
    assert job["metrics"]["loss"] == whole["metrics"]["loss"] and job["metrics"]["reward"] == whole["metrics"]["reward"]
    jobs = Path(private.env["T2I_SERVICE_JOBS_DIR"])
    a, b = (load_file(jobs / i / "pytorch_lora_weights.safetensors") for i in (job_id, whole["id"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_longer_than_the_bound_is_abandoned_and_a_second_signal_exits_at_once(private):
    """A step that never ends (the `hang` hook): SIGTERM, and the worker still exits at its bound (8 s here),
    having handed the job back at once (not after the lease) to resume from its last checkpoint. A second
    SIGTERM to the next worker, hung the same way with a 60 s bound, ends it at once."""
    store = private.store
    first = private.worker(T2I_TEST_WORKER_HOOK="step-3:hang", T2I_SERVICE_SHUTDOWN_TIMEOUT_S="8")
    job_id = submit(store, steps=8)  # checkpoints every 2 steps
    until(lambda: "test hook: hang at step-3" in first.log(), 180, "the step hangs")
    sent = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    took = time.monotonic() - sent
    assert 5 < took < 8 + 1, took  # the watchdog, just before the bound
    job = store.get(job_id)
    assert job["status"] == "queued" and job["attempt"] == 2  # handed back, no lease to wait for
    assert f"job {job_id} attempt 1: still mid-step at the shutdown bound" in first.log()

    second = private.worker(T2I_TEST_WORKER_HOOK="step-5:hang", T2I_SERVICE_SHUTDOWN_TIMEOUT_S="60")
    until(lambda: "test hook: hang at step-5" in second.log(), 180, "the step hangs again")
    second.proc.send_signal(signal.SIGTERM)
    until(lambda: "exiting within 60 s" in second.log(), 10, "the first signal is taken")
    sent = time.monotonic()
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(10) == 1
    again = time.monotonic() - sent
    print(f"\nMEASURE bound: a hung step's worker exited {took:.2f} s after SIGTERM (bound 8 s); a second signal: {again:.2f} s")
    assert again < 3 and "second SIGTERM: exiting now" in second.log()
    private.worker()  # the lease of attempt 2 lapses; this one resumes it from step 4
    job = wait(store, job_id, succeeded, timeout=180)
    assert job["attempt"] == 3 and job["metrics"]["resumed_at"] == [2, 4] and len(job["metrics"]["reward"]) == 8


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(private):
    """A poison job (here: every worker SIGKILLs itself at step 3) was queued again forever. With
    max_attempts 2 it fails after its second lost attempt, saying so, its checkpoints kept; workers go on."""
    store = private.store
    job_id = submit(store, steps=6)
    end, started = time.time() + 300, []
    while (job := store.get(job_id))["status"] != "failed":
        assert time.time() < end and len(started) <= 3, (job["status"], job["attempt"], len(started))
        if not started or started[-1].proc.poll() is not None:  # an orchestrator restarting the dead worker
            started.append(private.worker(T2I_TEST_WORKER_HOOK="step-3:kill", T2I_SERVICE_MAX_ATTEMPTS="2"))
        time.sleep(0.2)
    assert "gave up after 2 attempts" in job["error"] and "checkpoints are kept" in job["error"], job["error"]
    assert len(started) == 3 and [w.proc.poll() for w in started] == [-signal.SIGKILL, -signal.SIGKILL, None]
    assert job["attempt"] == 2 and sorted(runs(store, job_id)) == [1, 2]
    folder = Path(private.env["T2I_SERVICE_JOBS_DIR"]) / job_id / "checkpoints"
    assert (folder / "attempt-2" / "step-2" / "lora.safetensors").is_file()
    assert not store.redis.sismember(RUNNING, job_id) and not in_rq_queue(store, f"{job_id}-3")
    assert 0 < store.redis.ttl(key(job_id)) <= 3600


def test_a_superseded_runner_frozen_before_a_checkpoint_write_cannot_reach_the_job(private):
    """The last stale-write window: the first runner freezes after its ownership check, just before writing
    the checkpoint of step 4; the second takes over (attempt 2), writes step 6 and freezes before step 8.
    The first thaws and writes its stale step 4: before per-attempt folders that replaced (deleted) step 6,
    and attempt 3 resumed from 4. Now it lands in attempt 1's folder, which nobody reads: attempt 3 resumes
    from 6."""
    store = private.store
    first = private.worker(T2I_TEST_WORKER_HOOK="checkpoint-4:stop")
    job_id = submit(store, steps=12)
    wait(store, job_id, at_step(1))
    second = private.worker(T2I_TEST_WORKER_HOOK="checkpoint-8:stop")
    until(lambda: frozen(second), 180, "the second runner took over and froze before step 8's checkpoint")
    assert frozen(first) and runs(store, job_id) == {1: first.name, 2: second.name}
    first.proc.send_signal(signal.SIGCONT)  # its write of step 4 goes through, then its guard stops it
    until(lambda: re.search(rf"job {job_id} attempt 1: .*stopped without writing anything more", first.log()), 60, "the stale runner stops")
    job = wait(store, job_id, succeeded, timeout=180)  # attempt 3, on the first worker, once the second's lease lapsed
    second.proc.send_signal(signal.SIGCONT)
    assert runs(store, job_id) == {1: first.name, 2: second.name, 3: first.name}
    assert job["metrics"]["resumed_at"] == [2, 6] and len(job["metrics"]["reward"]) == 12
    until(lambda: re.search(rf"job {job_id} attempt 2: .*stopped without writing anything more", second.log()), 60, "the second stops")


@pytest.fixture
def small_volume(tmp_path):
    """A 16 MB tmpfs for the jobs directory (needs the right to mount, e.g. root; else the test is skipped)."""
    folder = tmp_path / "volume"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_jobs_volume_fails_the_job_clearly_and_the_worker_goes_on(private, small_volume):
    """The jobs volume fills up mid-job: the job fails with "no space left on the jobs volume" (before: torch's
    "unexpected pos" or safetensors' error text), no temporary checkpoint folder is left, the worker lives
    on and runs the next job once there is room."""
    store = private.store
    worker = private.worker(T2I_SERVICE_JOBS_DIR=str(small_volume))
    job_id = submit(store, steps=60)
    wait(store, job_id, at_step(1))  # its base samples are written
    filler = small_volume / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):  # take every byte left
        while True:
            f.write(b"\0" * 65536)
    end = time.time() + 120
    while (job := store.get(job_id))["status"] != "failed":
        assert time.time() < end and job["status"] == "running", job["status"]
        time.sleep(0.1)
    assert job["error"].startswith("no space left on the jobs volume"), job["error"]
    assert list((small_volume / job_id).rglob(".step-*.tmp")) == []
    filler.unlink()
    assert worker.proc.poll() is None
    wait(store, submit(store, steps=2), succeeded)
    assert runs(store, job_id) == {1: worker.name}


# ---- quotas and a full Redis (the API)

def test_quotas_per_key_and_in_total_spec_size_and_queued_ttl(server, env, tiny):
    """429 with Retry-After past the caps on queued plus running jobs (per API key, in total), 413 for a spec
    stored too large, and queued jobs expire after their TTL, which frees their slots."""
    settings = Settings(redis_url=server.url(4), jobs_dir=Path(env["T2I_SERVICE_JOBS_DIR"]), models_dir=Path(env["T2I_SERVICE_MODELS_DIR"]),
                        data_dir=Path(env["T2I_SERVICE_DATA_DIR"]), api_keys=["key-a", "key-b"], max_active_jobs=3,
                        max_active_jobs_per_key=2, max_spec_bytes=4096, queued_ttl_s=3)
    spec = {"method": "refl", "prompts": ["a cat"], "steps": 3, **FAST}
    with TestClient(create_app(settings, rewarder=tiny)) as api:
        def post(k, body=spec):
            return api.post("/jobs", json=body, headers={"X-API-Key": k})

        a = [post("key-a").json()["id"] for _ in range(2)]
        r = post("key-a")
        assert r.status_code == 429 and r.headers["Retry-After"] == "60" and "this API key has 2 jobs" in r.json()["detail"]
        b = post("key-b").json()["id"]
        r = post("key-b")
        assert r.status_code == 429 and "3 jobs are queued or running; the limit is 3" in r.json()["detail"]
        assert api.post(f"/jobs/{a[0]}/cancel", headers={"X-API-Key": "key-a"}).json()["status"] == "cancelled"
        assert post("key-b").status_code == 202  # a slot freed
        r = post("key-a", {**spec, "prompts": ["a cat " + "x" * 1990] * 3})
        assert r.status_code == 413 and "the limit is 4096" in r.json()["detail"]
        time.sleep(3.2)  # every queued job is now past its TTL: the next submission expires them first
        assert post("key-a").status_code == 202
        expired = api.get(f"/jobs/{a[1]}", headers={"X-API-Key": "key-a"}).json()
        assert expired["status"] == "failed" and "not started within 3 s" in expired["error"]
        assert api.get(f"/jobs/{b}", headers={"X-API-Key": "key-a"}).json()["status"] == "failed"
        store = JobStore(server.url(4))
        assert store.redis.zcard("t2i:jobs:queued") == 1  # only the last one is still queued
        store.close()


def test_a_full_redis_refuses_job_writes_with_503(tmp_path, env, tiny):
    """Redis under maxmemory with noeviction (compose's setting) refuses writes when full: POST /jobs and a
    cancel answer 503 with a message, never 500; reads still work."""
    full = RedisServer(tmp_path)
    try:
        admin = redis.Redis(port=full.port)
        settings = Settings(redis_url=full.url(0), jobs_dir=Path(env["T2I_SERVICE_JOBS_DIR"]), models_dir=Path(env["T2I_SERVICE_MODELS_DIR"]),
                            data_dir=Path(env["T2I_SERVICE_DATA_DIR"]))
        spec = {"method": "refl", "prompts": ["a cat"], "steps": 3, **FAST}
        with TestClient(create_app(settings, rewarder=tiny)) as api:
            job_id = api.post("/jobs", json=spec).json()["id"]
            used = admin.info("memory")["used_memory"]
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", used + 2 * 1024 * 1024)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                for k in range(10_000):
                    admin.set(f"junk:{k}", b"x" * 65536)
            for r in (api.post("/jobs", json=spec), api.post(f"/jobs/{job_id}/cancel")):
                assert r.status_code == 503 and "full and refuses new writes" in r.json()["detail"], r.text
            assert api.get(f"/jobs/{job_id}").json()["status"] == "queued" and api.get("/jobs").json()["total"] == 1
    finally:
        full.kill()

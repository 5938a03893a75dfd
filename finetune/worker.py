"""The fine-tuning worker (`t2i-reward worker`) and the function it runs for each job.

One worker runs one job at a time on one device (start one per GPU). It uses rq's `SimpleWorker`, which
runs jobs in the worker process itself: nothing forks after CUDA is initialised. Every job runs with the
settings the worker was started with (its flags, config file and environment) and its prompt index;
rewards come from the reward service when `reward_service_url` is set (`/reward/gradient`), else from
`rewarders` in-process, loaded once per worker.

Redis outages are ridden out: the rq loop is restarted with back-off, a running job keeps training while
its state writes are retried (only the newest progress matters), and its terminal state is written once
Redis is back. Ownership (see `jobs.py`): a runner holds its job's lease through `Lease`; when its writes
are refused, or it has not renewed the lease for 0.8 x `heartbeat_timeout_s`, it stops at the next step
and writes nothing more, and the job resumes from its last checkpoint under a newer attempt. Each attempt
writes its checkpoints into its own folder (`artifacts.adopt_checkpoints`), so a late write of a runner
that lost its job never reaches the newer attempt's.

Stopping (`Shutdown`): SIGTERM or SIGINT (what compose, Kubernetes and systemd send) stops the running job
at its next step boundary, where it is checkpointed and handed back to the queue as a new attempt that
any worker resumes bit-exactly; the worker exits within `shutdown_timeout_s` whatever the job is doing (a
step still running then is abandoned: the job is handed back and resumes from its last checkpoint). A
second signal exits at once. A job that fails because the jobs volume is full says so; the worker goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import redis
from t2i_reward.rewarders.errors import public_message

from .artifacts import adopt_checkpoints
from .faults import hook
from .jobs import QUEUE, JobStore, LeaseLost, bounded_metrics, worker_name
from .prepare import prepare_job
from .rewards import LocalReward, RemoteReward, Reward
from .settings import FinetuneSettings
from .spec import JobSpec
from .train import JobCancelled, JobContext, artifact_names, run_job

log = logging.getLogger(__name__)


class JobRunner:
    """What a worker process needs to run jobs: its settings, and the models and prompt index it loads once."""

    def __init__(self, settings: FinetuneSettings):
        self.settings = settings
        self.reward_config = settings.rewarder_config()  # read once; a bad --config or --profile stops here
        self.cache_dir = self.reward_config.cache_dir
        self._mixture = None
        self._prompter = None
        self._peer = None
        self._store: Optional[JobStore] = None
        self.shutdown = Shutdown(settings.shutdown_timeout_s, self)
        self.current: Optional[Lease] = None  # the lease of the job being run

    @property
    def store(self) -> JobStore:
        """The worker's state client: short socket timeouts (a hung Redis is an error, not a hang) and no
        redis-py retries (ours follow the lease's clock)."""
        if self._store is None:
            self._store = JobStore(self.settings.redis_url, socket_timeout=_socket_timeout(self.settings), retries=0)
        return self._store

    def prompter(self):
        if self._prompter is None:
            from t2i_reward.prompter import open_index

            self._prompter = open_index(self.settings.prompts_index, self.cache_dir)
        return self._prompter

    def reward(self, spec: JobSpec) -> Reward:
        s = self.settings
        if s.reward_service_url:
            return RemoteReward(s.reward_service_url, api_key=s.reward_service_api_key, weights=spec.reward_weights)
        if self._mixture is None:
            from t2i_reward.rewarders import create_rewarder

            self._mixture = create_rewarder(self.reward_config)
        return LocalReward(self._mixture, spec.reward_weights)

    def peer(self):
        """The MLLM peer of the settings, made once."""
        if self._peer is None:
            from t2i_reward.rewarders.mllm import create_peer

            self._peer = create_peer(self.settings.mllm, self.cache_dir)
        return self._peer

    def context(self, spec: JobSpec, out_dir: Path, **callbacks) -> tuple[JobSpec, JobContext]:
        """`prepare_job` under this worker's settings, then everything `run_job` needs."""
        prepared = prepare_job(spec, self.settings, self.prompter() if spec.prompts is None and spec.topics else None)
        peer = self.peer() if prepared.spec.method == "generate" and self.settings.mllm is not None else None
        ctx = JobContext(out_dir=out_dir, reward=self.reward(prepared.spec), prompts=list(prepared.spec.prompts),
                         base_model=prepared.base_model, cache_dir=self.cache_dir, pretrain_dir=prepared.pretrain_dir,
                         device=self.settings.device, lora_path=prepared.lora_path, peer=peer, **callbacks)
        return prepared.spec, ctx

    def execute(self, job_id: str, attempt: Optional[int] = None) -> None:
        """Run one attempt of a queued job to a terminal state, unless another attempt owns it (or the
        worker is asked to stop: then the job goes back to the queue as a new attempt)."""
        settings, store = self.settings, self.store
        if attempt is None:  # queued by a version that did not pass the attempt
            attempt = _retry(f"job {job_id}", lambda: store.attempt(job_id))
        lease = Lease(store, job_id, attempt, settings.heartbeat_timeout_s)
        hook("dequeued")  # out of rq's queue, not claimed yet: the window the sweep covers (JobStore.redeliver_lost)
        state, raw_spec = _retry(f"job {job_id}", lease.claim)
        if state != "ok":  # cancelled while queued, superseded by a newer attempt, or a duplicate delivery
            log.info("job %s attempt %d not run: %s", job_id, attempt, state)
            return
        self.current = lease
        try:
            self._run(job_id, attempt, lease, raw_spec)
        finally:
            self.current = None

    def _run(self, job_id: str, attempt: int, lease: Lease, raw_spec: str) -> None:
        settings, stopping = self.settings, self.shutdown.requested.is_set
        hook("claimed")
        log.info("job %s attempt %d: running on %s", job_id, attempt, worker_name())
        out_dir = settings.jobs_dir / job_id
        error = None
        try:
            ctx = None

            def progress(p: dict) -> None:  # a copy, thinned: the reporter thread encodes it while training goes on
                lease.report(progress=p, metrics=bounded_metrics(ctx.metrics))
                hook(f"step-{p['step']}")

            # parsed here, so a stored spec this version cannot read fails the job instead of looping
            spec = JobSpec.model_validate_json(raw_spec)
            lease.check()
            checkpoints = adopt_checkpoints(out_dir, attempt) if spec.method != "generate" else None  # this attempt's own (fencing)
            spec, ctx = self.context(spec, out_dir, on_progress=progress,
                                     should_stop=lambda: lease.cancel or stopping(), guard=lease.check,
                                     checkpoint_dir=checkpoints)
            result = run_job(spec, ctx)
            # "failed" with an error when the job stopped itself (the reward-hacking sentinel), artifacts kept
            final = dict(status=result["status"], metrics=result["metrics"], artifacts=result["artifacts"],
                         progress=result.get("progress") or {"step": spec.total_steps, "total": spec.total_steps, "eta_s": 0})
            if result.get("error"):
                final["error"] = result["error"]
        except LeaseLost as e:
            lease.abandon()
            log.warning("job %s attempt %d: %s; stopped without writing anything more", job_id, attempt, e)
            return
        except JobCancelled as e:
            if stopping() and not lease.cancel:  # the worker is stopping: the job was checkpointed at this step
                if lease.hand_back():
                    at = max((int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")), default=0) if checkpoints else 0
                    log.warning("job %s attempt %d: stopped for shutdown with a checkpoint at step %d; queued again as "
                                "attempt %d", job_id, attempt, at, attempt + 1)
                return
            log.info("job %s: %s", job_id, e)
            final = dict(status="cancelled", artifacts=artifact_names(out_dir) if out_dir.exists() else [])
        except Exception as e:
            error = e
            if disk_full(e):  # say what happened, not the library's words (torch: "unexpected pos ...")
                final = dict(status="failed", error="no space left on the jobs volume: the job could not write its files "
                             f"({type(e).__name__}); its last checkpoint is kept. Free space, then submit it again")
            else:
                # the job record is read through the API: no URLs or server paths (the log below keeps them)
                final = dict(status="failed", error=public_message(f"{type(e).__name__}: {e}"))
        except BaseException:  # a cold shutdown: the lease lapses and another worker resumes the job
            lease.abandon()
            raise
        if lease.finish(final, settings.job_retention_s):
            log.info("job %s attempt %d: %s", job_id, attempt, final["status"])
        if error is not None:
            log.error("job %s failed: %s: %s", job_id, type(error).__name__, error)
            raise error  # rq records the job as failed and logs the traceback; the worker lives on


def disk_full(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a full disk or quota: ENOSPC / EDQUOT, or a library's words for it
    (safetensors reports Rust's IO error as text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False


class Shutdown:
    """A worker asked to stop (SIGTERM or SIGINT). The running job sees `requested` at its next step boundary,
    is checkpointed there and handed back to the queue (`JobRunner._run`); whatever happens, a watchdog
    hands the job back (from its last checkpoint) and ends the process `timeout_s` after the signal, inside
    the orchestrator's grace period. A second signal ends the process at once."""

    def __init__(self, timeout_s: float, runner: JobRunner):
        self.timeout_s, self.runner = timeout_s, runner
        self.requested = threading.Event()

    def request(self, signum: int) -> None:
        """Called from the signal handler (the main thread)."""
        name = signal.Signals(signum).name
        if self.requested.is_set():
            log.warning("worker: second %s: exiting now", name)
            _flush_logs()
            os._exit(1)
        self.requested.set()
        log.warning("worker: %s: the running job stops at its next step and is queued again; exiting within %g s "
                    "(a second signal exits now)", name, self.timeout_s)
        threading.Thread(target=self._watchdog, daemon=True, name="shutdown").start()

    def _watchdog(self) -> None:
        margin = min(5.0, self.timeout_s / 5)  # for the hand-back, one Redis transaction
        time.sleep(self.timeout_s - margin)
        lease = self.runner.current
        if lease is not None and lease.hand_back(deadline=time.monotonic() + margin / 2):
            log.warning("job %s attempt %d: still mid-step at the shutdown bound: queued again as attempt %d, "
                        "it resumes from its last checkpoint", lease.job_id, lease.attempt, lease.attempt + 1)
        log.warning("worker: shutdown bound (%g s) reached: exiting", self.timeout_s)
        _flush_logs()
        os._exit(0)


def _flush_logs() -> None:
    for h in logging.getLogger().handlers:
        h.flush()


class Lease:
    """A runner's hold on one attempt of a job. A thread renews the lease every timeout/4 and writes the
    newest reported state with it; Redis errors are retried with back-off, so training never waits on
    Redis. The lease is lost when a write is refused (superseded) or when no write got through for
    0.8 x timeout (cut off: by then a reaper may be about to hand the job on); from then on nothing is
    written, and `check()` (the training loop's guard) raises."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, timeout_s: float):
        self.store, self.job_id, self.attempt, self.lease_s = store, job_id, attempt, timeout_s
        self.token = f"{attempt}:{worker_name()}:{secrets.token_hex(4)}"  # tells duplicate deliveries apart
        # stop before the lease can lapse in Redis: a reaper may hand the job on only after that
        self.limit = 0.8 * timeout_s
        self.interval = timeout_s / 4
        self.last_ok = time.monotonic()  # when the last write that Redis accepted was sent
        self.superseded: Optional[str] = None
        self.cut_off: Optional[str] = None
        self.cancel = False
        self._pending: dict = {}
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{job_id}")
        self._handing = threading.Lock()
        self._handed: Optional[bool] = None

    def claim(self):
        sent = time.monotonic()
        state, spec = self.store.start(self.job_id, self.attempt, self.token, self.lease_s)
        if state == "ok":
            self.last_ok = sent
            self._thread.start()
        return state, spec

    @property
    def lost(self) -> Optional[str]:
        if self.superseded is None and self.cut_off is None and time.monotonic() - self.last_ok > self.limit:
            self.cut_off = f"cut off from Redis for {time.monotonic() - self.last_ok:.1f} s (lease {self.lease_s:g} s)"
        return self.superseded or self.cut_off

    def check(self) -> None:
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def report(self, **fields) -> None:
        with self._lock:
            self._pending.update(fields)
        self._wake.set()

    def _write(self, fields: dict, retention_s: float = 0) -> bool:
        """One owned write; False (and lost) when refused. Redis errors propagate."""
        sent = time.monotonic()
        r = self.store.owned_write(self.job_id, self.attempt, self.token, self.lease_s, fields, retention_s)
        if r is None:
            self.superseded = f"superseded (attempt {self.attempt} is no longer current)"
            return False
        self.last_ok, self.cancel = sent, r
        return True

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            # retry well inside the lease, so a short outage never costs it
            self._wake.wait(self.interval if not failures else min(0.25 * 2 ** failures, self.interval / 2, 5.0))
            self._wake.clear()
            if self._stop.is_set() or self.lost is not None:
                return
            with self._lock:
                fields, self._pending = self._pending, {}
            try:
                if not self._write(fields):
                    return
                failures = 0
                self._stop.wait(0.2)  # at most ~5 writes a second, however fast the steps
            except redis.RedisError as e:
                with self._lock:  # keep the unsent state; newer reports win
                    self._pending = {**fields, **self._pending}
                failures += 1
                log.warning("job %s: state write failed (%s: %s); retrying", self.job_id, type(e).__name__, e)

    def abandon(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def hand_back(self, deadline: Optional[float] = None) -> bool:
        """Give the job back to the queue as a new attempt, with the newest reported state; once, whether the
        training thread or the shutdown watchdog asks first. Redis errors are retried until `deadline`
        (monotonic; None: until Redis answers). False when the job is no longer this runner's."""
        with self._handing:
            if self._handed is None:
                self.abandon()
                with self._lock:
                    fields = dict(self._pending)
                def give():
                    return self.store.hand_back(self.job_id, self.attempt, self.token, fields)

                self._handed = self.superseded is None and bool(_retry(f"job {self.job_id}: hand-back", give, deadline))
            return self._handed

    def finish(self, fields: dict, retention_s: float) -> bool:
        """Write the terminal state, retrying until Redis answers; False when the job was taken over. A
        runner cut off after its last step still tries: the job's files are written, and Redis accepts the
        write only if no newer attempt exists."""
        self.abandon()
        with self._lock:
            fields = {**self._pending, **fields}
        if self.superseded is None and _retry(f"job {self.job_id}: terminal state", lambda: self._write(fields, retention_s)):
            return True
        log.warning("job %s attempt %d: %s not recorded: %s", self.job_id, self.attempt, fields.get("status"), self.superseded)
        return False


def _retry(what: str, fn: Callable, deadline: Optional[float] = None):
    """Call `fn` until Redis answers, backing off from 0.5 s to 10 s; None once `deadline` (monotonic) passed."""
    delay = 0.5
    while True:
        try:
            return fn()
        except redis.RedisError as e:
            if deadline is not None and time.monotonic() + delay > deadline:
                log.warning("%s: Redis unavailable (%s: %s); giving up", what, type(e).__name__, e)
                return None
            log.warning("%s: Redis unavailable (%s: %s); retrying in %.1f s", what, type(e).__name__, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _socket_timeout(settings: FinetuneSettings) -> float:
    return min(5.0, max(0.5, settings.heartbeat_timeout_s / 4))


# the runner of this worker process; rq calls `execute_job` by import path, so it is found here
_runner: Optional[JobRunner] = None


def execute_job(job_id: str, attempt: Optional[int] = None) -> None:
    """The function rq runs for each job. In `t2i-reward worker` it uses the worker's settings; in a plain
    `rq worker` process it reads them from the environment."""
    global _runner
    if _runner is None:
        log.warning("no t2i-reward worker settings in this process: reading them from the environment")
        _runner = JobRunner(FinetuneSettings())
    _runner.execute(job_id, attempt)


# rq stores a job's function as a dotted path. Before the single import root, jobs were enqueued as
# "finetune.worker.execute_job"; a worker of this version runs those too, so an upgrade loses no queued job.
LEGACY_FUNCTIONS = {"finetune.worker.execute_job": f"{__name__}.execute_job"}


def job_class():
    """rq's Job, reading the function paths of older releases as today's (`LEGACY_FUNCTIONS`)."""
    from rq.job import Job
    from rq.utils import import_attribute

    class CompatJob(Job):
        @property
        def func(self):
            name = self.func_name
            return import_attribute(LEGACY_FUNCTIONS[name]) if name in LEGACY_FUNCTIONS else super().func

    return CompatJob


def worker_class():
    """rq's SimpleWorker with our stop (`Shutdown`) in place of rq's warm shutdown, which waits for the
    running job to finish however long it takes."""
    from rq import SimpleWorker
    from rq.exceptions import StopRequested
    from rq.utils import now as rq_now

    class Worker(SimpleWorker):
        busy = False

        def _install_signal_handlers(self):
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)

        def _on_signal(self, signum, frame):
            _runner.shutdown.request(signum)  # a second signal does not come back
            self._shutdown_requested_date = rq_now()
            if not self.busy:
                raise StopRequested()  # out of the blocking dequeue, as rq does
            self._stop_requested = True  # rq's loop ends after the job, which stops at its next step

        def unsubscribe(self):
            """rq's, without waiting for redis-py's pubsub thread: once unsubscribed it sleeps up to 60 s before
            it sees the stop, and rq joins it (a stopping worker would wait that long); it is a daemon thread."""
            if self.pubsub_thread:
                self.pubsub.unsubscribe()
                self.pubsub_thread.stop(timeout=0.1)
                self.pubsub.close()

        def execute_job(self, job, queue):
            self.busy = True
            try:
                super().execute_job(job, queue)
            finally:
                self.busy = False

    return Worker


def run_worker(settings: FinetuneSettings, burst: bool = False) -> None:
    """rq's SimpleWorker (`worker_class`), restarted with back-off whenever it quits on a Redis error (rq's
    loop gives up on one), plus a reaper thread that re-queues jobs whose lease expired, fails those out of
    attempts, queues again the jobs lost between dequeue and claim, and expires the queued ones too old."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    global _runner
    _runner = JobRunner(settings)
    store = _runner.store
    stop = threading.Event()

    def reap():
        failing = False
        while not stop.wait(max(settings.heartbeat_timeout_s / 3, 0.5)):
            try:
                for job_id, outcome in store.requeue_stale(settings.max_attempts, settings.job_retention_s):
                    if outcome == "failed":
                        log.error("job %s lost its worker %d times: failed (a poison job?)", job_id, settings.max_attempts)
                    else:
                        log.warning("job %s lost its worker: queued again, it will resume from its last checkpoint", job_id)
                for job_id in store.redeliver_lost(settings.heartbeat_timeout_s):
                    log.warning("job %s was dequeued by a worker that never claimed it: queued again", job_id)
                for job_id in store.expire_queued(settings.queued_ttl_s, settings.job_retention_s):
                    log.warning("job %s expired: queued for more than %g s", job_id, settings.queued_ttl_s)
                store.prune()
                failing = False
            except redis.RedisError as e:  # an outage must not kill the reaper; say so once per outage
                if not failing:
                    log.warning("reaper: Redis unavailable (%s); retrying", e)
                failing = True
            except Exception:
                log.exception("reaper")

    def on_signal(signum, frame):  # while rq's loop is not running (the back-off below)
        stop.set()
        _runner.shutdown.request(signum)

    threading.Thread(target=reap, daemon=True, name="reaper").start()
    compat, worker_cls = job_class(), worker_class()
    connection = redis.Redis.from_url(settings.redis_url)  # rq's own: it sets a socket timeout above its blocking pop
    delay = 1.0
    try:
        while True:
            worker, started = None, time.monotonic()
            try:
                queue = Queue(QUEUE, connection=connection, serializer=JSONSerializer, job_class=compat)  # no pickle
                worker = worker_cls([queue], connection=connection, serializer=JSONSerializer, job_class=compat)
                worker.work(burst=burst, with_scheduler=False)
                if _runner.shutdown.requested.is_set():  # SIGTERM / SIGINT
                    return
                if burst and len(worker.queues[0]) == 0:  # drained (rq also returns on errors: look)
                    return
                problem = "rq's loop quit (see its log)"
            except redis.RedisError as e:
                problem = f"{type(e).__name__}: {e}"
            if _runner.shutdown.requested.is_set():
                return
            if time.monotonic() - started > 60:  # it ran a while: a new outage starts the back-off again
                delay = 1.0
            log.warning("worker: Redis unavailable (%s); restarting in %.0f s", problem, delay)
            # rq's signal handlers point at the old worker: ours, while we wait
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            if stop.wait(delay):
                return
            delay = min(delay * 2, 30.0)
    finally:
        stop.set()

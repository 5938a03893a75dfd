"""The fine-tuning worker (`t2i-reward worker`) and the function it runs for each job.

One worker runs one job at a time on one device (start one per GPU). It uses rq's `SimpleWorker`, which
runs jobs in the worker process itself: nothing forks after CUDA is initialised. Every job runs with the
settings the worker was started with (its flags, config file and environment) and its prompt index;
rewards come from the reward service when `reward_service_url` is set (`/reward/gradient`), else from
`rewarders` in-process, loaded once per worker.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

from .jobs import TERMINAL, JobStore
from .settings import FinetuneSettings
from .prepare import prepare_job
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

    def prompter(self):
        if self._prompter is None:
            from prompter import open_index

            self._prompter = open_index(self.settings.prompts_index, self.cache_dir)
        return self._prompter

    def reward(self, spec: JobSpec):
        from .rewards import LocalReward, RemoteReward

        s = self.settings
        if s.reward_service_url:
            return RemoteReward(s.reward_service_url, api_key=s.reward_service_api_key, weights=spec.reward_weights)
        if self._mixture is None:
            from rewarders import create_rewarder

            self._mixture = create_rewarder(self.reward_config)
        return LocalReward(self._mixture, spec.reward_weights)

    def context(self, spec: JobSpec, out_dir: Path, **callbacks) -> tuple[JobSpec, JobContext]:
        """`prepare_job` under this worker's settings, then everything `run_job` needs."""
        prepared = prepare_job(spec, self.settings, self.prompter() if spec.prompts is None else None)
        ctx = JobContext(out_dir=out_dir, reward=self.reward(prepared.spec), prompts=list(prepared.spec.prompts),
                         base_model=prepared.base_model, cache_dir=self.cache_dir, pretrain_dir=prepared.pretrain_dir,
                         device=self.settings.device, **callbacks)
        return prepared.spec, ctx

    def execute(self, job_id: str) -> None:
        """Run one queued job to a terminal state, writing status, progress and metrics to Redis."""
        settings = self.settings
        store = JobStore(settings.redis_url)
        status = store.status(job_id)
        if status in TERMINAL:  # cancelled while it waited in the queue
            log.info("job %s was %s before it started", job_id, status)
            return
        spec = store.spec(job_id)
        out_dir = settings.jobs_dir / job_id
        store.update(job_id, status="running")
        store.heartbeat(job_id)
        stop_beating = threading.Event()

        def beat():  # also during model loading and long steps; a Redis error must not stop it
            while not stop_beating.wait(max(settings.heartbeat_timeout_s / 4, 0.5)):
                try:
                    store.heartbeat(job_id)
                except Exception as e:
                    log.warning("job %s: heartbeat failed (%s); retrying", job_id, e)

        threading.Thread(target=beat, daemon=True).start()
        ctx = None
        try:
            spec, ctx = self.context(spec, out_dir,
                                     on_progress=lambda p: store.update(job_id, progress=p, metrics=ctx.metrics),
                                     should_stop=lambda: store.cancel_requested(job_id))
            result = run_job(spec, ctx)
            store.update(job_id, status="succeeded", metrics=result["metrics"], artifacts=result["artifacts"],
                         progress={"step": spec.steps, "total": spec.steps, "eta_s": 0})
            log.info("job %s succeeded", job_id)
        except JobCancelled as e:
            log.info("job %s: %s", job_id, e)
            store.update(job_id, status="cancelled", artifacts=artifact_names(out_dir) if out_dir.exists() else [])
        except Exception as e:
            store.update(job_id, status="failed", error=f"{type(e).__name__}: {e}")
            log.error("job %s failed: %s: %s", job_id, type(e).__name__, e)
            raise  # rq records the job as failed and logs the traceback; the worker lives on
        finally:
            stop_beating.set()


# the runner of this worker process; rq calls `execute_job` by import path, so it is found here
_runner: Optional[JobRunner] = None


def execute_job(job_id: str) -> None:
    """The function rq runs for each job. In `t2i-reward worker` it uses the worker's settings; in a plain
    `rq worker` process it reads them from the environment."""
    global _runner
    if _runner is None:
        log.warning("no t2i-reward worker settings in this process: reading them from the environment")
        _runner = JobRunner(FinetuneSettings())
    _runner.execute(job_id)


def run_worker(settings: FinetuneSettings, burst: bool = False) -> None:
    from rq import SimpleWorker

    global _runner
    _runner = JobRunner(settings)
    store = JobStore(settings.redis_url)
    stop = threading.Event()

    def reap():
        while not stop.wait(max(settings.heartbeat_timeout_s / 3, 0.5)):
            try:
                for job_id in store.requeue_stale(settings.heartbeat_timeout_s):
                    log.warning("job %s lost its worker: queued again, it will resume from its last checkpoint", job_id)
            except Exception:  # Redis hiccups must not kill the reaper
                log.exception("reaper")

    threading.Thread(target=reap, daemon=True).start()
    worker = SimpleWorker([store.queue], connection=store.queue.connection)
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        stop.set()

"""The fine-tuning worker (`t2i-reward worker`) and the function it runs for each job.

One worker runs one job at a time on one device (start one per GPU). It uses rq's `SimpleWorker`, which
runs jobs in the worker process itself: nothing forks after CUDA is initialised. Rewards come from the
reward service when `T2I_SERVICE_REWARD_SERVICE_URL` is set (`/reward/gradient`), else from `rewarders`
in-process.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .jobs import TERMINAL, JobStore
from .spec import confined, resolve_base_model, with_defaults
from .train import JobCancelled, JobContext, artifact_names, run_job

log = logging.getLogger(__name__)
_LOCAL_MIXTURES: dict = {}


def make_reward(settings, spec):
    from .rewards import LocalReward, RemoteReward

    if settings.reward_service_url:
        return RemoteReward(settings.reward_service_url, api_key=settings.reward_service_api_key, weights=spec.reward_weights)
    key = (str(settings.reward_config), settings.profile)
    if key not in _LOCAL_MIXTURES:  # loaded once per worker process, shared by its jobs
        from rewarders import create_rewarder

        _LOCAL_MIXTURES[key] = create_rewarder(settings.reward_config, profile=settings.profile)
    return LocalReward(_LOCAL_MIXTURES[key], spec.reward_weights)


def job_prompts(spec, cache_dir: Path) -> list[str]:
    if spec.prompts:
        return list(spec.prompts)
    from prompter import default_index

    found, _ = default_index(cache_dir).search(spec.topics, spec.n_prompts)
    return [p for per_topic in found for p in per_topic]


def build_context(settings, spec, out_dir: Path, **callbacks) -> JobContext:
    from rewarders import load_config

    cache_dir = load_config(settings.reward_config, profile=settings.profile).cache_dir
    spec = with_defaults(spec, settings.profile)
    return JobContext(
        out_dir=out_dir,
        reward=make_reward(settings, spec),
        prompts=job_prompts(spec, cache_dir),
        base_model=resolve_base_model(spec.base_model, settings.models_dir),
        cache_dir=cache_dir,
        pretrain_dir=confined(spec.pretrain_data, settings.data_dir, "pretrain_data") if spec.pretrain_data else None,
        device=settings.device,
        **callbacks,
    )


def execute_job(job_id: str) -> None:
    """Run one queued job to a terminal state, writing status, progress and metrics to Redis."""
    from service.settings import Settings

    settings = Settings()
    store = JobStore(settings.redis_url)
    if store.status(job_id) in TERMINAL:  # cancelled while it waited in the queue
        return
    spec = store.spec(job_id)
    out_dir = settings.jobs_dir / job_id
    store.update(job_id, status="running")
    store.heartbeat(job_id)
    stop_beating = threading.Event()

    def beat():  # also during model loading and long steps
        while not stop_beating.wait(max(settings.heartbeat_timeout_s / 4, 0.5)):
            store.heartbeat(job_id)

    threading.Thread(target=beat, daemon=True).start()
    ctx = None
    try:
        ctx = build_context(settings, spec, out_dir,
                            on_progress=lambda p: store.update(job_id, progress=p, metrics=ctx.metrics),
                            should_stop=lambda: store.cancel_requested(job_id))
        result = run_job(spec, ctx)
        store.update(job_id, status="succeeded", metrics=result["metrics"], artifacts=result["artifacts"],
                     progress={"step": spec.steps, "total": spec.steps, "eta_s": 0})
    except JobCancelled as e:
        log.info("job %s: %s", job_id, e)
        store.update(job_id, status="cancelled", artifacts=artifact_names(out_dir) if out_dir.exists() else [])
    except Exception as e:  # the job failed; the worker lives on for the next one
        log.exception("job %s failed", job_id)
        store.update(job_id, status="failed", error=f"{type(e).__name__}: {e}")
    finally:
        stop_beating.set()


def run_worker(settings, burst: bool = False) -> None:
    from rq import SimpleWorker

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

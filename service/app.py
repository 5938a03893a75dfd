"""The FastAPI app: a thin shell over `rewarders`.

    uvicorn --factory t2i_reward.service.app:create_app        # settings from T2I_SERVICE_* variables
    t2i-reward serve --profile tiny                  # the same, from the CLI

Models and the prompt index load in background threads at start-up: /healthz answers at once,
/readyz and the endpoints that need them answer 503 until they are in memory.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from t2i_reward.finetune.jobs import JobStore
from t2i_reward.prompter import PromptIndex, open_index
from t2i_reward.rewarders import Mixture, create_rewarder

from .batcher import MicroBatcher, model_thread_executor, side_executor
from .errors import install_error_handlers
from .memory import keep_freed_memory
from .metrics import Metrics
from .middleware import LimitsAndMetrics
from .routers import compat, health, jobs, mllm, prompts, reward
from .settings import Settings
from .state import AppState

log = logging.getLogger(__name__)


def load_rewarder(settings: Settings) -> Mixture:
    """The rewarder the settings name, with the service's limits and batch size."""
    return create_rewarder(settings.rewarder_config(**settings.rewarder_overrides()))


def create_app(settings: Settings | None = None, rewarder: Mixture | None = None, prompter: PromptIndex | None = None,
               *, loader: Callable[[Settings], Mixture] | None = None, max_inflight_batches: int = 1) -> FastAPI:
    """Build the app. Pass `rewarder` / `prompter` to serve already-loaded ones (tests, embedding).

    `loader(settings)`, run on the model thread at start-up, gives the rewarder instead of `load_rewarder`, and
    `max_inflight_batches` micro-batches are scored at once, on that many model threads: the Ray ingress
    (service/ray_serve.py) loads a `PooledMixture` whose models run in the pools."""
    settings = settings or Settings()
    metrics = Metrics()
    state = AppState(settings, metrics)  # what the dependencies read (deps.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # one loader, models then prompt index, in sequence: importing transformers from two threads
        # at once races inside its lazy module and fails
        keep_freed_memory(settings.keep_freed_mb)  # request bodies reuse freed memory instead of faulting it in
        # asyncio.to_thread's threads (prompts, the MLLM judge, jobs) get no OpenMP teams: the model thread's is the only one
        asyncio.get_running_loop().set_default_executor(side_executor())
        state.job_store = JobStore(settings.redis_url)  # connects on first use: Redis may start later
        loading = asyncio.create_task(_load(state, rewarder, prompter, loader or load_rewarder, max_inflight_batches))
        yield
        loading.cancel()
        if state.batcher is not None:
            await state.batcher.stop()
        state.job_store.close()

    app = FastAPI(
        title="t2i-reward",
        version="0.1.0",
        description="Reward models for text-to-image generation: a mixture of ImageReward, the LAION aesthetic "
        "predictor and an MLP reward model on CLIP embeddings.",
        lifespan=lifespan,
    )
    app.state.service = state
    app.include_router(health.router)
    app.include_router(reward.router)
    app.include_router(mllm.router)  # before /prompts: /prompts/enhance is its own route
    app.include_router(prompts.router)
    app.include_router(jobs.router)
    app.include_router(compat.router)  # 404 unless flow_grpo_compat
    install_error_handlers(app)  # every 4xx answer is JSON-safe, never an echo of the input
    app.add_middleware(LimitsAndMetrics, settings=settings, metrics=metrics)
    return app


async def _load(state: AppState, rewarder: Mixture | None, prompter: PromptIndex | None,
                loader: Callable[[Settings], Mixture], max_inflight_batches: int) -> None:
    settings = state.settings
    try:
        # loaded on the model thread that will run them: its OpenMP team is then the process's only one
        model_thread = model_thread_executor(max_inflight_batches)
        mixture = rewarder if rewarder is not None else await asyncio.get_running_loop().run_in_executor(
            model_thread, loader, settings)
    except Exception as e:  # reported by /readyz; the process stays up to say why
        log.error("loading the models failed: %s", e)
        state.load_error = str(e)
        model_thread.shutdown(wait=False)
        return
    batcher = MicroBatcher(mixture, settings.limits(), settings.max_batch_images, settings.max_wait_ms / 1000,
                           settings.max_queue_images, settings.max_queue_wait_s, state.metrics, settings.prepare_workers,
                           model_thread, max_prepare_s=settings.max_prepare_s, max_prepare_pixels=settings.max_prepare_pixels,
                           max_queue_bytes=settings.max_queue_bytes, max_inflight_batches=max_inflight_batches)
    batcher.start()
    state.batcher = batcher
    if mixture.random_weights:
        log.warning("serving RANDOM-weight experts (profile %s): scores are for testing only", mixture.config.profile)
    log.info("models ready: %s", ", ".join(mixture.experts))
    try:
        state.prompter = prompter if prompter is not None else await asyncio.to_thread(
            open_index, settings.prompts_index, mixture.config.cache_dir)
    except Exception as e:
        log.error("loading the prompt index failed: %s", e)
        state.prompter_error = str(e)
        return
    log.info("prompt index ready: %d prompts", len(state.prompter))

"""The app's state, typed: one `AppState` per app (`app.state.service`), written by the app's start-up and
read by the dependencies (deps.py), never as loose attributes."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from t2i_reward.finetune.jobs import JobStore
from t2i_reward.prompter import PromptIndex
from t2i_reward.prompter.generate import PromptGenerator

from .batcher import MicroBatcher
from .metrics import Metrics
from .settings import Settings


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    # the models, loaded in the background at start-up: None until then (and the error when they failed)
    batcher: Optional[MicroBatcher] = None
    load_error: Optional[str] = None
    # the prompt index, loaded after the models
    prompter: Optional[PromptIndex] = None
    prompter_error: Optional[str] = None
    # the job queue, opened by the lifespan (it connects on first use: Redis may start later)
    job_store: Optional[JobStore] = None
    # the MLLM peer of /verify and /prompts/enhance, made on first use (deps.get_peer)
    peer: Any = None  # an HTTP peer or a model in-process (rewarders.mllm.create_peer)
    peer_lock: threading.Lock = field(default_factory=threading.Lock)
    # /prompts mode generate's model, loaded on first use (once; a failure is remembered)
    prompt_generator: Optional[PromptGenerator] = None
    prompt_generator_error: Optional[str] = None
    prompt_generator_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

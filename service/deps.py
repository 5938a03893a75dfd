"""Every FastAPI dependency of the service, as an `Annotated` alias the routers use."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from finetune.jobs import JobStore
from prompter import PromptIndex
from rewarders import Mixture

from .batcher import MicroBatcher
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_batcher(request: Request) -> MicroBatcher:
    state = request.app.state
    if state.batcher is None:
        detail = f"models failed to load: {state.load_error}" if state.load_error else "models are loading; retry shortly"
        raise HTTPException(status_code=503, detail=detail, headers={"Retry-After": "5"})
    return state.batcher


def get_rewarder(batcher: Annotated[MicroBatcher, Depends(get_batcher)]) -> Mixture:
    return batcher.rewarder


def get_prompter(request: Request) -> PromptIndex:
    state = request.app.state
    if state.prompter is None:
        detail = f"prompt index failed to load: {state.prompter_error}" if state.prompter_error else "prompt index is loading; retry shortly"
        raise HTTPException(503, detail, headers={"Retry-After": "5"})
    return state.prompter


def get_optional_prompter(request: Request) -> PromptIndex | None:
    """The prompt index when it is loaded (a job with explicit prompts does not need it)."""
    return request.app.state.prompter


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.job_store
    try:
        store.redis.ping()
    except Exception as e:
        raise HTTPException(503, f"the job queue (Redis) is unreachable: {e}") from None
    return store


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """With keys configured, every protected endpoint needs `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    if not settings.api_keys:
        return
    key = x_api_key
    if key is None and authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value:
            key = value.strip()
    if not key:
        raise HTTPException(status_code=401, detail="missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not any(secrets.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
        raise HTTPException(status_code=403, detail="invalid API key")


SettingsDep = Annotated[Settings, Depends(get_settings)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
RewarderDep = Annotated[Mixture, Depends(get_rewarder)]
PrompterDep = Annotated[PromptIndex, Depends(get_prompter)]
OptionalPrompterDep = Annotated[PromptIndex | None, Depends(get_optional_prompter)]
StoreDep = Annotated[JobStore, Depends(get_store)]
AuthDep = Depends(require_api_key)

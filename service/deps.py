"""Every FastAPI dependency of the service, as an `Annotated` alias the routers use. They read the app's
typed state (`AppState`, state.py); what is missing is a 503 (`errors.Unavailable`)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from t2i_reward.finetune.jobs import JobStore
from t2i_reward.prompter import PromptIndex
from t2i_reward.rewarders import Mixture

from .batcher import MicroBatcher
from .errors import Unavailable
from .settings import Settings
from .state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.service


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_batcher(state: StateDep) -> MicroBatcher:
    if state.batcher is None:
        detail = f"models failed to load: {state.load_error}" if state.load_error else "models are loading; retry shortly"
        raise Unavailable(detail, retry_after=5)
    return state.batcher


def get_rewarder(batcher: Annotated[MicroBatcher, Depends(get_batcher)]) -> Mixture:
    return batcher.rewarder


def get_prompter(state: StateDep) -> PromptIndex:
    if state.prompter is None:
        detail = f"prompt index failed to load: {state.prompter_error}" if state.prompter_error else "prompt index is loading; retry shortly"
        raise Unavailable(detail, retry_after=5)
    return state.prompter


def get_optional_prompter(state: StateDep) -> PromptIndex | None:
    """The prompt index when it is loaded (a job with explicit prompts does not need it)."""
    return state.prompter


def get_peer(state: StateDep):
    """The MLLM peer of the settings, made on first use (an in-process model loads then); 503 without one."""
    settings = state.settings
    if settings.mllm is None:
        raise Unavailable("no MLLM peer is configured: set T2I_SERVICE_MLLM__URL and T2I_SERVICE_MLLM__MODEL "
                          "(or T2I_SERVICE_MLLM__MODEL alone for the model in-process)")
    with state.peer_lock:
        if state.peer is None:
            from t2i_reward.rewarders.mllm import create_peer

            try:
                state.peer = create_peer(settings.mllm, settings.rewarder_config().cache_dir)
            except Exception as e:  # an in-process model that does not load
                raise Unavailable(f"the MLLM model {settings.mllm.model!r} failed to load: {type(e).__name__}") from None
    return state.peer


def get_store(state: StateDep) -> JobStore:
    store = state.job_store
    try:
        store.redis.ping()
    except Exception as e:
        raise Unavailable(f"the job queue (Redis) is unreachable: {e}") from None
    return store


# Paths anyone may call; with API keys configured, every other path needs a key. The middleware checks
# the key from the headers before any body is read; `require_api_key` documents it in the OpenAPI schema.
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def api_key_error(api_keys: list[str], authorization: str | None, x_api_key: str | None) -> HTTPException | None:
    """The 401/403 for these headers, or None when the key is good (or no keys are configured).
    Keys are compared in constant time, and every configured key is compared."""
    if not api_keys:
        return None
    key = x_api_key
    if key is None and authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value:
            key = value.strip()
    if not key:
        return HTTPException(status_code=401, detail="missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                             headers={"WWW-Authenticate": "Bearer"})
    matches = [secrets.compare_digest(key.encode("utf-8", "surrogateescape"), k.encode()) for k in api_keys]
    return None if any(matches) else HTTPException(status_code=403, detail="invalid API key")


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """With keys configured, every protected endpoint needs `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    error = api_key_error(settings.api_keys, authorization, x_api_key)
    if error is not None:
        raise error


SettingsDep = Annotated[Settings, Depends(get_settings)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
RewarderDep = Annotated[Mixture, Depends(get_rewarder)]
PrompterDep = Annotated[PromptIndex, Depends(get_prompter)]
OptionalPrompterDep = Annotated[PromptIndex | None, Depends(get_optional_prompter)]
StoreDep = Annotated[JobStore, Depends(get_store)]
PeerDep = Annotated[object, Depends(get_peer)]
AuthDep = Depends(require_api_key)

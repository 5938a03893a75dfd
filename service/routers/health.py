"""Liveness, readiness, Prometheus metrics and the loaded models."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from t2i_reward.rewarders.errors import public_message

from ..deps import AuthDep, RewarderDep, SettingsDep, StateDep
from ..schemas import error_responses

router = APIRouter(tags=["health"])


# HEAD too: load balancers and uptime checks probe with it
@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", summary="The process is alive")
def healthz() -> dict:
    return {"status": "ok"}


def mllm_state(state) -> dict:
    """The MLLM peer's own state, beside readiness (a peer that is down never makes the service unready):
    open to anyone, so without the peer's URL, and its last error without URLs or paths."""
    if state.settings.mllm is None:
        return {"state": "not configured"}
    if state.peer is None:
        return {"state": "not used yet"}
    return public_peer(state.peer.describe())


def public_peer(peer: dict) -> dict:
    """A peer's `describe()` as clients may see it: its state, model and mode; never its URL."""
    error = peer.get("last_error")
    return {"state": "error" if error else "ok", "model": peer.get("model"), "yes_no": peer.get("yes_no"),
            "last_error": public_message(error) if error else None}


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", summary="200 once the models and the prompt index are loaded, 503 before", responses={503: {"description": "not ready"}})
def readyz(state: StateDep):
    if state.batcher is not None and state.prompter is not None:
        return {"status": "ready", "mllm": mllm_state(state)}
    # the causes are in the log; the open answer names no server path
    errors = [f"models failed to load: {public_message(state.load_error)}"] if state.load_error else []
    errors += [f"prompt index failed to load: {public_message(state.prompter_error)}"] if state.prompter_error else []
    if errors:
        return JSONResponse({"detail": "; ".join(errors)}, status_code=503)
    loading = [name for name, obj in (("models", state.batcher), ("prompt index", state.prompter)) if obj is None]
    return JSONResponse({"detail": f"{' and '.join(loading)} loading"}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/models", summary="Experts, checkpoints, devices, dtypes, weights and normalisation", dependencies=[AuthDep],
            responses=error_responses(401, 403, 503))
def models(rewarder: RewarderDep, settings: SettingsDep) -> dict:
    limits = settings.limits()
    return {
        "profile": rewarder.config.profile,
        "normalize": rewarder.config.normalize,
        "random_weights": rewarder.random_weights,
        "experts": rewarder.describe(),
        # one request's limits, so that clients can size their requests (RemoteReward does)
        "limits": {"max_images": limits.max_images, "max_image_pixels": limits.max_image_pixels,
                   "max_prompt_chars": limits.max_prompt_chars, "max_body_bytes": settings.max_body_bytes},
    }

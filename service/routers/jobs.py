"""Fine-tuning jobs over REST: submit, list, inspect, cancel, download artifacts.

Job ids are checked against the token alphabet (`[A-Za-z0-9_-]{1,64}`) before anything reaches Redis
(422 otherwise), a failing Redis is a 503 with a message (Redis refusing a write because it is full, under
`noeviction`, too), and the listing returns summaries fetched in one round trip (the per-step metrics only
come with GET /jobs/{id}). A submission is checked whole before it is queued (`prepare.check_submission`),
its stored spec is bounded (413), and the queued plus running jobs are capped in total and per API key
(429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated, Any, Callable, Optional, TypeVar

import redis
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from t2i_reward.finetune.jobs import JOB_ID, MAX_OFFSET, JobStore, QuotaExceeded
from t2i_reward.finetune.prepare import check_submission, prepare_job
from t2i_reward.finetune.spec import JobSpec, confined
from t2i_reward.rewarders.errors import InvalidRequestError

from ..deps import AuthDep, OptionalPrompterDep, SettingsDep, StateDep, StoreDep
from ..errors import Unavailable
from ..schemas import error_responses
from ..state import AppState

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[AuthDep])
ERRORS = error_responses(400, 401, 403, 404, 408, 413, 422, 429, 503)


class Progress(BaseModel):
    """Steps done of the job's total; an active-learning job adds `round`, the round under way (1-based)."""

    model_config = ConfigDict(extra="allow")

    step: int = Field(..., description="Steps done.")
    total: int = Field(..., description="Steps in the job.")
    eta_s: Optional[float] = Field(None, description="Estimated seconds left.")


class JobSummary(BaseModel):
    id: str
    status: str = Field(..., description="queued | running | succeeded | failed | cancelled")
    progress: Progress
    error: Optional[str] = None
    created_at: float = Field(..., description="Unix time the job was submitted.")
    updated_at: float = Field(..., description="Unix time of its last state change or progress.")


class JobStatus(JobSummary):
    metrics: dict[str, Any] = Field(..., description="Per step: reward, loss, kl (curves over 1000 points are thinned to "
                                    "every `stride`-th step; metrics.json has all); eval (base and fine-tuned) once done; resumed_at.")
    artifacts: list[str] = Field(..., description="Files under the job directory, for GET /jobs/{id}/artifacts/{name}.")
    attempt: int = Field(..., description="Which run of the job this is (it grows when a job resumes on another worker).")


class JobList(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[JobSummary]


class Submitted(BaseModel):
    id: str
    status: str


JobId = Annotated[str, Path(pattern=JOB_ID.pattern, description="A job id: 1 to 64 characters of A-Z, a-z, 0-9, '_', '-'.")]
T = TypeVar("T")
QUOTA_RETRY_AFTER_S = 60  # jobs take minutes: a slot rarely frees sooner


def _redis(fn: Callable[..., T], *args, **kwargs) -> T:
    """A Redis failure mid-request is a 503 with a message (never a 500)."""
    try:
        return fn(*args, **kwargs)
    except redis.RedisError as e:
        # maxmemory with noeviction: nothing is evicted, new writes are refused (inside a script: a plain error)
        if isinstance(e, redis.exceptions.OutOfMemoryError) or "used memory > 'maxmemory'" in str(e):
            raise Unavailable("the job store (Redis) is full and refuses new writes; retry later, or ask the "
                              "operator to raise its maxmemory", retry_after=30) from None
        raise Unavailable(f"the job queue (Redis) failed: {type(e).__name__}: {e}", retry_after=5) from None


def _owner(request: Request, api_keys: list[str]) -> str:
    """Whose quota a submission counts against: a digest of its API key (the key itself is never stored), as
    the auth dependency read it; '-' for everyone when no keys are configured."""
    if not api_keys:
        return "-"
    key = request.headers.get("x-api-key")
    if key is None:
        key = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _experts(state: AppState) -> Optional[list[str]]:
    """The experts of the served mixture (once loaded), else of the configured one."""
    if state.batcher is not None:
        return list(state.batcher.rewarder.weights)
    try:
        return list(state.settings.rewarder_config().experts)
    except Exception:  # a config the service cannot read fails elsewhere, with its own message
        return None


def _job(store: JobStore, job_id: str) -> dict:
    job = _redis(store.get, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or finished longer ago than the retention)")
    return job


@router.post("", status_code=202, response_model=Submitted, responses=ERRORS, summary="Submit a fine-tuning job")
async def submit(spec: JobSpec, request: Request, store: StoreDep, settings: SettingsDep, prompter: OptionalPrompterDep,
                 state: StateDep) -> Submitted:
    if spec.prompts is None and spec.topics is not None and prompter is None:
        raise Unavailable("the prompt index is not loaded yet; retry, or give prompts", retry_after=5)
    try:  # defaults, limits, paths, and topics turned into prompts now, so the job is reproducible
        prepared = await asyncio.to_thread(prepare_job, spec, settings, prompter)
        rewarder = state.batcher.rewarder if state.batcher is not None else None  # the served mixture, once loaded
        await asyncio.to_thread(check_submission, spec, prepared, _experts(state), settings.rewarder_config().cache_dir, rewarder)
    except ValueError as e:  # the spec cannot run here: a 422, whatever kind of ValueError said so
        raise InvalidRequestError(str(e)) from None
    size = len(prepared.spec.model_dump_json())
    if size > settings.max_spec_bytes:
        raise HTTPException(413, f"the job's spec takes {size} bytes (topics drawn as prompts); the limit is {settings.max_spec_bytes}")
    await asyncio.to_thread(_redis, store.expire_queued, settings.queued_ttl_s, settings.job_retention_s)  # frees their slots
    # the hash, the index entry and the queue entry are written in one transaction, with the caps checked in it
    try:
        job_id = await asyncio.to_thread(_redis, store.create, prepared.spec, owner=_owner(request, settings.api_keys),
                                         max_active=settings.max_active_jobs, max_per_owner=settings.max_active_jobs_per_key)
    except QuotaExceeded as e:
        raise HTTPException(429, f"{e}: wait for some to finish, or cancel some", headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)}) from None
    return Submitted(id=job_id, status="queued")


@router.get("", response_model=JobList, responses=ERRORS, summary="Jobs, newest first (summaries)")
def list_jobs(store: StoreDep, offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    total, jobs = _redis(store.list, offset, limit)
    return JobList(total=total, offset=offset, limit=limit, jobs=[JobSummary(**j) for j in jobs])


@router.get("/{job_id}", response_model=JobStatus, responses=ERRORS, summary="A job's status, progress and metrics")
def get_job(job_id: JobId, store: StoreDep) -> JobStatus:
    return JobStatus(**_job(store, job_id))


@router.post("/{job_id}/cancel", response_model=Submitted, responses=ERRORS, summary="Cancel a job")
def cancel_job(job_id: JobId, store: StoreDep, settings: SettingsDep) -> Submitted:
    status = _redis(store.cancel, job_id, settings.job_retention_s)
    if status is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or finished longer ago than the retention)")
    return Submitted(id=job_id, status=status)


@router.get("/{job_id}/artifacts/{name:path}", responses=ERRORS, summary="Download one artifact of a job")
def artifact(job_id: JobId, name: str, store: StoreDep, settings: SettingsDep) -> FileResponse:
    job = _job(store, job_id)
    if name not in job["artifacts"]:
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}")
    try:
        path = confined(name, settings.jobs_dir / job_id, "artifact")
    except ValueError as e:
        raise HTTPException(404, str(e)) from None
    if not path.is_file():
        raise HTTPException(404, f"artifact {name!r} is gone")
    return FileResponse(path)

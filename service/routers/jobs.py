"""Fine-tuning jobs over REST: submit, list, inspect, cancel, download artifacts."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Optional

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from finetune.jobs import JobStore
from finetune.prepare import prepare_job
from finetune.spec import JobSpec, confined

from ..deps import AuthDep, OptionalPrompterDep, SettingsDep, StoreDep
from ..schemas import ErrorResponse

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[AuthDep])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 422, 503)}


class Progress(BaseModel):
    step: int = Field(..., description="Steps done.")
    total: int = Field(..., description="Steps in the job.")
    eta_s: Optional[float] = Field(None, description="Estimated seconds left.")


class JobStatus(BaseModel):
    id: str
    status: str = Field(..., description="queued | running | succeeded | failed | cancelled")
    progress: Progress
    metrics: dict[str, Any] = Field(..., description="Per step: reward, loss, kl; eval (base and fine-tuned) once done; resumed_at.")
    artifacts: list[str] = Field(..., description="Files under the job directory, for GET /jobs/{id}/artifacts/{name}.")
    error: Optional[str] = None


class JobList(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[JobStatus]


class Submitted(BaseModel):
    id: str
    status: str


def _status(job: dict) -> JobStatus:
    return JobStatus(**{k: job[k] for k in ("id", "status", "progress", "metrics", "artifacts", "error")})


def _job(store: JobStore, job_id: str) -> dict:
    job = store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


@router.post("", status_code=202, response_model=Submitted, responses=ERRORS, summary="Submit a fine-tuning job")
async def submit(spec: JobSpec, store: StoreDep, settings: SettingsDep, prompter: OptionalPrompterDep) -> Submitted:
    if spec.prompts is None and prompter is None:
        raise HTTPException(503, "the prompt index is not loaded yet; retry, or give prompts", headers={"Retry-After": "5"})
    try:  # defaults, limits, paths, and topics turned into prompts now, so the job is reproducible
        prepared = await asyncio.to_thread(prepare_job, spec, settings, prompter)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    job_id = await asyncio.to_thread(store.create, prepared.spec)
    return Submitted(id=job_id, status="queued")


@router.get("", response_model=JobList, responses=ERRORS, summary="Jobs, newest first")
def list_jobs(store: StoreDep, offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
    total, jobs = store.list(offset, limit)
    return JobList(total=total, offset=offset, limit=limit, jobs=[_status(j) for j in jobs])


@router.get("/{job_id}", response_model=JobStatus, responses=ERRORS, summary="A job's status, progress and metrics")
def get_job(job_id: str, store: StoreDep) -> JobStatus:
    return _status(_job(store, job_id))


@router.post("/{job_id}/cancel", response_model=Submitted, responses=ERRORS, summary="Cancel a job")
def cancel_job(job_id: str, store: StoreDep) -> Submitted:
    _job(store, job_id)
    return Submitted(id=job_id, status=store.cancel(job_id))


@router.get("/{job_id}/artifacts/{name:path}", responses=ERRORS, summary="Download one artifact of a job")
def artifact(job_id: str, name: str, store: StoreDep, settings: SettingsDep) -> FileResponse:
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

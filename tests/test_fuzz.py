"""Schema-driven fuzzing of every operation of the HTTP API (schemathesis), short, seeded and derandomized.

The app (tiny rewarder, API key configured, jobs in Redis db 13) is served by uvicorn on loopback
(`running_server`); schemathesis generates cases from the app's own /openapi.json, positive and negative,
with realistic JSON, multipart and safetensors bodies (strategies in benchmarks/fuzz.py, where the long
run lives: `python benchmarks/fuzz.py --examples 500`). Every case carries the valid key.

Checks ON for every response (`fuzz.CHECKS`):
  - not_a_server_error          no 5xx
  - status_code_conformance     the status code is documented for the operation
  - content_type_conformance    the Content-Type is the documented one
  - response_schema_conformance the body validates against the documented response schema
Checks OFF: schemathesis's other defaults (negative_data_rejection, positive_data_acceptance,
missing_required_header, unsupported_method, ignored_auth, ...): the schema cannot express every rule the
service enforces (limits from settings, cross-field checks), so they would flag correct refusals.

No worker of this test runs, and submitted jobs must not train anywhere: other tests may run workers on the
same Redis db, so every job the fuzzing gets accepted is cancelled at once (a worker skips a job cancelled
while queued), the job limits are tiny, and the keys of every job this test created are deleted after.
"""

import os

import pytest
import requests
from hypothesis import HealthCheck, settings
from t2i_reward.finetune.spec import JobLimits
from t2i_reward.rewarders.mllm import MLLMConfig
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

from benchmarks import fuzz

from .conftest import running_server

redis = pytest.importorskip("redis")
REDIS_URL = os.environ.get("T2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
EXAMPLES = 10  # per operation (positive and negative): about 40 s on 2 CPU cores
TIMEOUT_S = 30  # no answer within this: a hang, the test fails

# the schema is the app's own (it does not depend on the settings); built eagerly, because schemathesis's
# lazy `from_fixture` does not run under pytest 9
schema = fuzz.schema_from(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def created_jobs():
    """Ids of the jobs the fuzzing submitted; their Redis keys and rq entries are deleted at the end."""
    from rq.job import Job
    from t2i_reward.finetune.jobs import EXPIRY, INDEX, PREFIX, RUNNING

    ids: list[str] = []
    yield ids
    db = redis.Redis.from_url(REDIS_URL)
    for job_id in ids:
        db.delete(f"{PREFIX}{job_id}", f"{PREFIX}{job_id}:lease")
        db.zrem(INDEX, job_id)
        db.zrem(EXPIRY, job_id)
        db.srem(RUNNING, job_id)
        for rq_id in Job.fetch_many([f"{job_id}-1"], connection=db):
            if rq_id is not None:
                rq_id.delete()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory, created_jobs):
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    root = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(profile="tiny", api_keys=[fuzz.KEY], redis_url=REDIS_URL, jobs_dir=root / "jobs",
                              models_dir=root / "models", data_dir=root / "data", max_images=4,
                              job_limits=JobLimits(max_steps=4, max_batch_size=2, max_resolution=64, max_lora_rank=8),
                              mllm=MLLMConfig(model="tiny", image_size=56), enhance_max_tokens=8,  # the tiny VLM in-process
                              flow_grpo_compat=True),  # fuzz the Flow-GRPO endpoints themselves, not their 404
                     rewarder=tiny)
    with running_server(app, timeout=300) as url:
        created_jobs += fuzz.submit_jobs(url, fuzz.KEY)  # real jobs for the job routes: one queued, one cancelled
        yield url


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, server, created_jobs):
    fuzz.authorize(case)  # past the API key check; the bodies are what is fuzzed here
    fuzz.use_known_job(case, created_jobs[:2])  # half of the positive job ids name a real job
    fuzz.strict_ints(case, schema.integer_fields)  # 4.0 -> 4 in positive cases (see fuzz.strict_ints)
    response = case.call(base_url=server, timeout=TIMEOUT_S)  # a hang raises requests.Timeout: a failure
    if response.status_code == 202 and case.path == "/jobs":
        created_jobs.append(response.json()["id"])
        requests.post(f"{server}/jobs/{created_jobs[-1]}/cancel", headers={"x-api-key": fuzz.KEY}, timeout=TIMEOUT_S)
    case.validate_response(response, checks=fuzz.CHECKS)

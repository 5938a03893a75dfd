"""Hostile input to /prompts and /jobs: every bad value gets a 4xx with a message in `{"detail": ...}`,
never a 500; every numeric field is bounded in the schema; base_model never leaves the models directory;
a job whose loss turns non-finite fails."""

import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from t2i_reward.finetune.spec import JobLimits, JobSpec
from t2i_reward.prompter import PromptIndex, build_index
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

REDIS_URL = os.environ.get("T2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
NAN, INF = float("nan"), float("inf")
SPEC = {"method": "refl", "base_model": "tiny", "prompts": ["a cat"], "steps": 3, "resolution": 32, "num_inference_steps": 6,
        "refl_step_range": [3, 6], "guidance_scale": 1.0, "eval_images_per_prompt": 1}
JOB_FLOATS = ["learning_rate", "lora_alpha", "guidance_scale", "reward_weight", "kl_weight", "pretrain_weight"]
JOB_INTS = ["n_prompts", "steps", "lora_rank", "batch_size", "resolution", "num_inference_steps", "seed", "checkpoint_every",
            "eval_images_per_prompt"]
RTL = "\u05e9\u05dc\u05d5\u05dd \u200f a red fox \u202bمرحبا\u202c"  # Hebrew, Arabic and direction marks: ordinary text
BAD_BASE_MODEL = "is not 'tiny', 'tiny-sdxl', 'tiny-sd3', a hub id"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    for d in ("jobs", "models", "data", "index"):
        (root / d).mkdir()
    return root


@pytest.fixture(scope="module")
def api(root, tiny):
    build_index(["a red fox sleeping in the snow", "a bowl of ramen", "a lighthouse at dusk"], root / "index")
    settings = Settings(redis_url=REDIS_URL, jobs_dir=root / "jobs", models_dir=root / "models", data_dir=root / "data",
                        job_limits=JobLimits(max_steps=1000))
    with TestClient(create_app(settings, rewarder=tiny, prompter=PromptIndex.load(root / "index"))) as client:
        end = time.time() + 30
        while client.get("/readyz").status_code != 200 and time.time() < end:
            time.sleep(0.05)
        yield client


def post(api, path: str, body: dict):
    # json.dumps as Python writes it: NaN/Infinity literals, lone surrogates as \ud800 escapes
    return api.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def job_cases():
    for name in JOB_FLOATS:
        yield {name: NAN}, "finite"
        yield {name: -INF}, "finite"
        yield {name: 1e308}, "less than or equal"
        yield {name: True}, "valid number"
    for name in JOB_INTS:
        yield {name: 2**70}, "less than or equal"
        yield {name: 1e9}, "valid integer"
        yield {name: NAN}, "valid integer"
        yield {name: True}, "valid integer"
    yield {"reward_weights": {"aesthetic": NAN}}, "finite"
    yield {"reward_weights": {"aesthetic": 1e4}}, "less than or equal"
    yield {"reward_weights": {f"e{k}": 1.0 for k in range(33)}}, "at most 32"
    yield {"reward_weights": {"\ud800": 1.0}}, "valid string"
    yield {"refl_step_range": [NAN, 6]}, "valid integer"
    yield {"refl_step_range": [0, 2**70]}, "less than or equal"
    yield {"seed": -1}, "greater than or equal"
    yield {"resolution": 63}, "multiple of 8"
    yield {"guidance_scale": 1e6}, "less than or equal to 30"
    yield {"prompts": ["x" * 1_000_000]}, "at most 2000 characters"
    yield {"prompts": ["a cat"] * 10_001}, "at most 10000"
    yield {"prompts": []}, "empty"
    yield {"prompts": None, "topics": ["x" * 1_000_000]}, "at most 2000 characters"
    yield {"prompts": None, "topics": ["fox"] * 17}, "at most 16"
    yield {"eval_prompts": ["a cat"] * 17}, "at most 16"
    yield {"target_modules": [f"m{k}" for k in range(33)]}, "at most 32"
    yield {"target_modules": ["to_q; rm -rf"]}, "pattern"
    yield {"target_modules": ["x" * 65]}, "at most 64"
    for field in ("prompts", "topics", "eval_prompts"):
        yield {field: ["a \ud800 cat"]}, "unicode"
        yield {field: ["a \x00 cat"]}, "NUL"
    yield {"base_model": "\ud800/x"}, "unicode"
    yield {"base_model": "x\x00"}, "NUL"
    yield {"pretrain_data": "\udfff"}, "unicode"
    yield {"base_model": "x" * 5000}, "at most 256 characters"
    yield {"pretrain_data": "x" * 5000}, "at most 256 characters"
    for name in ("x/..", "../../etc", "/etc", "missing-local-dir", "org/../../etc", "./x", "a--b/c", ".hidden/x"):
        yield {"base_model": name}, BAD_BASE_MODEL


@pytest.mark.parametrize("change, fragment", list(job_cases()))
def test_bad_job_specs_get_422(api, change, fragment):
    spec = {k: v for k, v in {**SPEC, **change}.items() if v is not None}
    r = post(api, "/jobs", spec)
    assert r.status_code == 422, r.text[:500]
    assert fragment in json.dumps(r.json()["detail"]), r.text[:500]
    assert len(r.content) < 10_000  # the input is never echoed back


def prompts_cases():
    for value, fragment in [(NAN, "valid integer"), (INF, "valid integer"), (1e9, "valid integer"), (10**9, "less than or equal"),
                            (2**70, "less than or equal"), (True, "valid integer"), ("3", "valid integer"), (0, "greater than")]:
        yield {"n_prompts": value}, fragment
    for value, fragment in [(NAN, "finite"), (INF, "finite"), (-INF, "finite"), (1e308, "less than or equal"), (True, "valid number")]:
        yield {"diversity": value}, fragment
    for name in ("min_length", "max_length"):
        for value, fragment in [(False, "valid integer"), (NAN, "valid integer"), (2**70, "less than or equal"), (-1, "greater than")]:
            yield {name: value}, fragment
    for topics, fragment in [(["a \ud800 fox"], "unicode"), (["\udc00"], "unicode"), (["a\x00b"], "NUL"),
                             (["x" * 1_000_000], "at most 2000 characters"), (["fox"] * 17, "at most 16"), ([], "empty"),
                             ([5], "valid string"), (["  "], "non-empty")]:
        yield {"topics": topics}, fragment


@pytest.mark.parametrize("change, fragment", list(prompts_cases()))
def test_bad_prompts_requests_get_422(api, change, fragment):
    r = post(api, "/prompts", {"topics": ["red fox"], "n_prompts": 2, **change})
    assert r.status_code == 422, r.text[:500]
    assert fragment in json.dumps(r.json()["detail"]), r.text[:500]
    assert len(r.content) < 10_000


def test_right_to_left_text_is_accepted(api):
    r = post(api, "/prompts", {"topics": [RTL], "n_prompts": 1})
    assert r.status_code == 200, r.text
    r = post(api, "/jobs", {**SPEC, "prompts": [RTL], "eval_prompts": [RTL]})
    assert r.status_code == 202, r.text
    api.post(f"/jobs/{r.json()['id']}/cancel")


def test_one_message_for_missing_and_outside_paths(api, root):
    """Whether a path is missing, outside, or walks up and back, the answer is the same and names no directory."""
    (root / "models" / "real").mkdir()  # exists, but is no pipeline: same answer as a missing one
    details = []
    for name in ("x/..", "../../etc", "/etc", "/", "missing", "real", str(root / "models" / "missing"), "../models"):
        r = post(api, "/jobs", {**SPEC, "base_model": name})
        assert r.status_code == 422
        details.append(r.json()["detail"].replace(repr(name), "NAME"))
    assert len(set(details)) == 1 and str(root) not in details[0] and "outside" in details[0], details
    answers = {post(api, "/jobs", {**SPEC, "pretrain_data": p}).json()["detail"].replace(repr(p), "P") for p in ("/tmp", "nope", "..")}
    assert len(answers) == 1 and str(root) not in answers.pop()


def test_hub_ids_are_never_loaded_from_the_working_directory(api, root, cache_dir, tmp_path, monkeypatch):
    from t2i_reward.finetune.pipeline import load_pipeline
    from t2i_reward.finetune.prepare import prepare_job
    from t2i_reward.finetune.tiny import ensure_tiny_sd

    pipe = ensure_tiny_sd(cache_dir)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "pipe").symlink_to(pipe)  # a loadable pipeline at ./outside/pipe
    monkeypatch.chdir(tmp_path)
    r = post(api, "/jobs", {**SPEC, "base_model": "outside/pipe"})  # a well-formed hub id: accepted as one
    assert r.status_code == 202, r.text
    api.post(f"/jobs/{r.json()['id']}/cancel")
    settings = api.app.state.service.settings
    assert prepare_job(JobSpec(**{**SPEC, "base_model": "outside/pipe"}), settings).base_model == "outside/pipe"
    with pytest.raises(ValueError, match="cannot get it from the hub"):  # offline: not in the hub cache, and never ./outside/pipe
        load_pipeline("outside/pipe", cache_dir)
    # a pipeline under the models directory, even with a hub-like name, is loaded from there
    local = root / "models" / "org" / "sd"
    local.mkdir(parents=True)
    (local / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert prepare_job(JobSpec(**{**SPEC, "base_model": "org/sd"}), settings).base_model == str(local.resolve())


def unbounded(node: dict, schemas: dict, where: str):
    """Yield where a schema node lets a number, string, list or map grow without bound."""
    if "$ref" in node:
        node = schemas[node["$ref"].rsplit("/", 1)[-1]]
    for sub in node.get("anyOf", []) + node.get("prefixItems", []):
        yield from unbounded(sub, schemas, where)
    kind = node.get("type")
    if kind in ("integer", "number"):
        if not ({"minimum", "exclusiveMinimum"} & set(node) and {"maximum", "exclusiveMaximum"} & set(node)):
            yield where
    elif kind == "string" and "enum" not in node and "const" not in node and "maxLength" not in node:
        yield where
    elif kind == "array":
        if "maxItems" not in node:
            yield where
        if "items" in node:
            yield from unbounded(node["items"], schemas, where + "[]")
    elif kind == "object" and "properties" not in node:  # a map
        if "maxProperties" not in node:
            yield where
        for sub in list(node.get("patternProperties", {}).values()) + [node.get("additionalProperties") or {}]:
            yield from unbounded(sub, schemas, where + "{}")
        if "propertyNames" in node:
            yield from unbounded({"type": "string", **node["propertyNames"]}, schemas, where + " key")


def test_every_field_is_bounded_in_the_schema(api):
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    for model in ("JobSpec", "PromptsRequest"):
        props = schemas[model]["properties"]
        missing = [w for name, node in props.items() for w in unbounded(node, schemas, f"{model}.{name}")]
        assert not missing, missing
    # where empty is refused, the schema says so
    assert schemas["PromptsRequest"]["properties"]["topics"]["minItems"] == 1
    assert schemas["JobSpec"]["properties"]["target_modules"]["minItems"] == 1
    assert schemas["JobSpec"]["properties"]["resolution"]["multipleOf"] == 8


def test_operator_limits_tighten_never_loosen():
    with pytest.raises(ValueError):
        JobLimits(max_steps=10**9)
    with pytest.raises(ValueError):
        JobLimits(max_resolution=4096)
    assert JobLimits(max_steps=10).max_steps == 10


def test_non_finite_loss_fails_the_job(tiny, cache_dir, tmp_path):
    from t2i_reward.finetune import JobContext, run_job
    from t2i_reward.finetune.rewards import LocalReward

    class NanReward(LocalReward):  # what an exploding guidance or learning rate ends in
        def __call__(self, images, prompts, metadata=None):
            total, components = super().__call__(images, prompts, metadata)
            return total * NAN, components

    spec = JobSpec(**{**SPEC, "steps": 3, "num_inference_steps": 4, "refl_step_range": (2, 4)})
    ctx = JobContext(out_dir=tmp_path, reward=NanReward(tiny), prompts=spec.prompts, base_model="tiny", cache_dir=cache_dir)
    with pytest.raises(FloatingPointError, match="step 1: .* not finite"):
        run_job(spec, ctx)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()

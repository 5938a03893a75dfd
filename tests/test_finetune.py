"""Fine-tuning jobs end to end: REST, a real Redis, a real worker process, the tiny SD pipeline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from t2i_reward.finetune.spec import JobLimits
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

from .conftest import running_server

REDIS_URL = os.environ.get("T2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
FAST = dict(base_model="tiny", resolution=32, num_inference_steps=6, refl_step_range=[3, 6], guidance_scale=1.0,
            eval_images_per_prompt=1, learning_rate=2e-2, checkpoint_every=5)


@pytest.fixture(scope="module")
def env(tmp_path_factory, cache_dir):
    redis.Redis.from_url(REDIS_URL).flushdb()
    root = tmp_path_factory.mktemp("jobs-env")
    for d in ("jobs", "models", "data"):
        (root / d).mkdir()
    return {**os.environ, "T2I_SERVICE_REDIS_URL": REDIS_URL, "T2I_SERVICE_JOBS_DIR": str(root / "jobs"),
            "T2I_SERVICE_MODELS_DIR": str(root / "models"), "T2I_SERVICE_DATA_DIR": str(root / "data"),
            "T2I_SERVICE_PROFILE": "tiny", "T2I_REWARD_CACHE_DIR": str(cache_dir), "T2I_SERVICE_HEARTBEAT_TIMEOUT_S": "3",
            "T2I_SERVICE_JOB_LIMITS__MAX_STEPS": "1000"}


class Worker:
    def __init__(self, env, log: Path):
        self.env, self.log_path = env, log
        self.start()

    def start(self):
        exe = Path(sys.executable).parent / "t2i-reward"
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([str(exe), "worker"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory):
    w = Worker(env, tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def api(env, tiny):
    settings = Settings(redis_url=REDIS_URL, jobs_dir=Path(env["T2I_SERVICE_JOBS_DIR"]), models_dir=Path(env["T2I_SERVICE_MODELS_DIR"]),
                        data_dir=Path(env["T2I_SERVICE_DATA_DIR"]), job_limits=JobLimits(max_steps=1000))
    with TestClient(create_app(settings, rewarder=tiny)) as client:
        yield client


def wait_for(api, job_id, statuses, timeout=240, step=None):
    end = time.time() + timeout
    while time.time() < end:
        job = api.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses and (step is None or job["progress"]["step"] >= step):
            return job
        if job["status"] == "failed":
            raise AssertionError(f"job failed: {job['error']}")
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_refl_job_succeeds_reward_rises_and_lora_loads(api, worker, env, tmp_path):
    spec = {"method": "refl", "prompts": ["a red apple", "a blue car"], "steps": 24, **FAST}
    r = api.post("/jobs", json=spec)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job_id = r.json()["id"]
    assert len(job_id) >= 20  # unguessable
    job = wait_for(api, job_id, {"succeeded"})
    rewards = job["metrics"]["reward"]
    assert len(rewards) == 24 and job["progress"] == {"step": 24, "total": 24, "eta_s": 0}
    third = len(rewards) // 3
    assert sum(rewards[-third:]) / third > sum(rewards[:third]) / third  # the reward curve rises
    assert {"pytorch_lora_weights.safetensors", "metrics.json", "report.png"} <= set(job["artifacts"])
    assert any(a.startswith("samples/") for a in job["artifacts"])
    assert set(job["metrics"]["eval"]["base"]) == {"total", "imagereward", "aesthetic", "mlp"}
    lora = api.get(f"/jobs/{job_id}/artifacts/pytorch_lora_weights.safetensors")
    assert lora.status_code == 200
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(lora.content)
    assert api.get(f"/jobs/{job_id}/artifacts/report.png").content[:4] == b"\x89PNG"

    from diffusers import StableDiffusionPipeline
    from t2i_reward.finetune.tiny import ensure_tiny_sd

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_sd(env["T2I_REWARD_CACHE_DIR"]), safety_checker=None)
    kwargs = dict(num_inference_steps=6, height=32, width=32, guidance_scale=1.0, output_type="pt")
    before = pipe("a red apple", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path)
    after = pipe("a red apple", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (after - before).abs().max() > 1e-3  # the LoRA changes the output


def test_reward_weighted_job(api, worker):
    spec = {"method": "reward_weighted", "prompts": ["a green field"], "steps": 4, "regularizer": "kl", **FAST,
            "reward_weights": {"aesthetic": 1.0, "mlp": 0.5}, "target_modules": ["to_q", "to_v"]}  # both checked at submission
    job = wait_for(api, api.post("/jobs", json=spec).json()["id"], {"succeeded"})
    assert len(job["metrics"]["reward"]) == 4 and all(v > 0 for v in job["metrics"]["kl"][1:])
    assert "pytorch_lora_weights.safetensors" in job["artifacts"]


def test_api_restarted_mid_job(env, worker, tiny):
    """The API holds no job state: a job submitted through one API process finishes while that process is
    gone, and a new one reports it."""
    settings = Settings(redis_url=REDIS_URL, jobs_dir=Path(env["T2I_SERVICE_JOBS_DIR"]), models_dir=Path(env["T2I_SERVICE_MODELS_DIR"]),
                        data_dir=Path(env["T2I_SERVICE_DATA_DIR"]), job_limits=JobLimits(max_steps=1000))
    with TestClient(create_app(settings, rewarder=tiny)) as first:
        job_id = first.post("/jobs", json={"method": "refl", "prompts": ["a lighthouse"], "steps": 8, **FAST}).json()["id"]
        wait_for(first, job_id, {"running", "succeeded"}, step=1)
    # the first API is shut down (lifespan closed); the worker goes on
    with TestClient(create_app(settings, rewarder=tiny)) as second:
        job = wait_for(second, job_id, {"succeeded"})
        assert job["attempt"] == 1 and len(job["metrics"]["reward"]) == 8


def test_cancel_a_running_job(api, worker):
    spec = {"method": "refl", "prompts": ["a castle"], "steps": 500, **FAST}
    job_id = api.post("/jobs", json=spec).json()["id"]
    wait_for(api, job_id, {"running"}, step=1)
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = wait_for(api, job_id, {"cancelled"}, timeout=60)
    assert job["progress"]["step"] < 500


def test_cancel_a_queued_job(api, env, worker, tmp_path):
    worker.stop()  # no worker reads the queue: the job stays queued until it is cancelled
    try:
        spec = {"method": "refl", "prompts": ["a boat"], "steps": 3, **FAST}
        job_id = api.post("/jobs", json=spec).json()["id"]
        assert api.get(f"/jobs/{job_id}").json()["status"] == "queued"
        assert api.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        # a worker that drains the queue afterwards must not run it
        exe = Path(sys.executable).parent / "t2i-reward"
        done = subprocess.run([str(exe), "worker", "--burst"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        worker.start()
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["step"] == 0 and job["artifacts"] == []
    assert not (Path(env["T2I_SERVICE_JOBS_DIR"]) / job_id).exists()  # it never started


def kill_and_resume(api, env, worker, tmp_path, spec: dict, kill_at: int) -> dict:
    """Submit `spec` to a worker of its own, SIGKILL that worker once the job passed step `kill_at`, let a
    second worker finish it; the module's worker runs again afterwards. Returns the finished job."""
    worker.stop()
    first = Worker(env, tmp_path / "w1.log")
    job_id = api.post("/jobs", json=spec).json()["id"]
    try:
        wait_for(api, job_id, {"running"}, step=kill_at)
        first.kill()
    finally:
        first.stop()
    second = Worker(env, tmp_path / "w2.log")
    try:
        return wait_for(api, job_id, {"succeeded"}, timeout=300)
    finally:
        second.stop()
        worker.start()  # the module's worker, for the tests after this one


def test_killed_worker_resumes_from_checkpoint(api, env, worker, tmp_path):
    spec = {"method": "refl", "prompts": ["a lighthouse"], "steps": 30, **FAST}
    job = kill_and_resume(api, env, worker, tmp_path, spec, kill_at=8)  # past the checkpoint at step 5
    assert job["metrics"]["resumed_at"] and job["metrics"]["resumed_at"][0] >= 5  # not from zero
    assert len(job["metrics"]["reward"]) == 30
    assert "resuming from" in (tmp_path / "w2.log").read_text()


def test_a_killed_grpo_job_on_sd3_resumes_where_it_was(api, env, worker, tmp_path):
    """GRPO on the flow-matching pipeline over REST with a real worker: killed after a checkpoint, a new
    worker resumes it (LoRA, optimiser, per-prompt statistics, the seeded sampler noise), and the resumed
    job's reward curve is the uninterrupted job's."""
    spec = {**FAST, "method": "ddpo", "base_model": "tiny-sd3", "group_size": 2, "prompts": ["a lighthouse", "a red car"],
            "batch_size": 2, "steps": 16, "num_inference_steps": 4, "stat_min_count": 2, "learning_rate": 0.05}
    whole = wait_for(api, api.post("/jobs", json=spec).json()["id"], {"succeeded"})
    assert "pytorch_lora_weights.safetensors" in whole["artifacts"] and len(whole["metrics"]["clip_fraction"]) == 16
    job = kill_and_resume(api, env, worker, tmp_path, spec, kill_at=7)  # past the checkpoint at step 5
    assert job["metrics"]["resumed_at"] and job["metrics"]["resumed_at"][0] >= 5
    assert job["metrics"]["reward"] == pytest.approx(whole["metrics"]["reward"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"method": "dpo"}, "method"),
        ({"steps": -1}, "steps"),
        ({"steps": 5000}, "limit is 1000"),
        ({"prompts": None}, "prompts"),
        ({"prompts": [" "]}, "non-empty"),
        ({"base_model": "../../etc"}, "outside"),
        ({"base_model": "/etc"}, "outside"),
        ({"base_model": "missing-local-dir"}, "base_model"),
        ({"pretrain_data": "/tmp"}, "outside"),
        ({"pretrain_data": "no-such-folder"}, "no such folder"),
        ({"output_dir": "/tmp/x"}, "output_dir"),
        ({"refl_step_range": [5, 50]}, "refl_step_range"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"base_model": "tiny-sd3"}, "cannot run on a sd3 pipeline"),  # ReFL on flow matching
        ({"method": "grpo", "group_size": 1}, "group_size >= 2"),
        ({"method": "grpo", "group_size": 33}, "group_size is 33; the limit is 32"),
        ({"method": "grpo", "batch_size": 16, "group_size": 32}, "images per step"),
        ({"method": "active_learning", "n_images": 1}, "n_images >= 2"),
        ({"method": "active_learning", "eval_every": 2}, "eval_every and stop_on_hacking do not apply"),
        ({"lora_from": "abc"}, "apply to method 'generate' only"),
        ({"method": "active_learning", "select_prompts": 5, "round_prompts": 4}, "select_prompts (5) must be at most"),
        ({"method": "active_learning", "eval_prompts": ["a cat"]}, "training prompts besides the held-out"),
        ({"method": "active_learning", "rounds": 101}, "rounds"),
        ({"method": "active_learning", "round_prompts": 17, "select_prompts": 1}, "round_prompts is 17; the limit is 16"),
        ({"method": "active_learning", "n_images": 33}, "n_images is 33; the limit is 32"),
        ({"method": "active_learning", "rounds": 100, "steps": 11}, "rounds * steps is 1100; the limit is 1000"),
        ({"method": "active_learning", "learner": "refl", "base_model": "tiny-sd3", "prompts": ["a", "b"]}, "'refl' cannot run on a sd3"),
        ({"method": "active_learning", "learner": "grpo", "group_size": 1, "prompts": ["a", "b"]}, "group_size >= 2"),
        # checked at submission, not failed later by the worker (issue 30)
        ({"target_modules": ["to_q", "to_qq"]}, "target_modules ['to_qq'] match no Linear or Conv layer of the unet of 'tiny'"),
        ({"method": "grpo", "base_model": "tiny-sd3", "target_modules": ["to_q", "conv1"]}, "['conv1'] match no Linear or Conv layer"),
        ({"reward_weights": {"aesthetic": 1.0, "pickscore": 2.0}}, "experts that are not configured: 'pickscore'; configured: imagereward, aesthetic, mlp"),
        ({"topics": ["a fox"]}, "give prompts or topics, not both"),
    ],
)
def test_bad_specs_get_422(api, change, fragment):
    spec = {"method": "refl", "prompts": ["a cat"], "steps": 3, **FAST, **change}
    spec = {k: v for k, v in spec.items() if v is not None}
    r = api.post("/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert fragment in json.dumps(r.json()["detail"])


def test_unknown_jobs_and_artifacts_404(api):
    assert api.get("/jobs/nope").status_code == 404
    assert api.post("/jobs/nope/cancel").status_code == 404
    assert api.get("/jobs/nope/artifacts/report.png").status_code == 404
    job_id = api.post("/jobs", json={"method": "refl", "prompts": ["a cat"], "steps": 3, **FAST}).json()["id"]
    assert api.get(f"/jobs/{job_id}/artifacts/../../../etc/passwd").status_code == 404
    assert api.get(f"/jobs/{job_id}/artifacts/metrics.json").status_code == 404  # not written (yet)
    listing = api.get("/jobs", params={"limit": 2}).json()
    assert listing["total"] >= 1 and len(listing["jobs"]) <= 2 and listing["jobs"][0]["id"] == job_id
    api.post(f"/jobs/{job_id}/cancel")


def test_finetune_command_runs_a_job_directly(env, tmp_path):
    spec = tmp_path / "job.json"
    # no base_model: under the tiny profile (env) the default is the tiny pipeline
    spec.write_text(json.dumps({"method": "refl", "prompts": ["a red apple"], "steps": 2,
                                **{k: v for k, v in FAST.items() if k != "base_model"}}))
    exe = Path(sys.executable).parent / "t2i-reward"
    done = subprocess.run([str(exe), "finetune", "--spec", str(spec), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == "succeeded"
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "refl"}')
    done = subprocess.run([str(exe), "finetune", "--spec", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "prompts" in done.stderr


def test_finetune_under_torchrun_with_two_processes(env, tmp_path):
    """`accelerate launch --multi_gpu` starts processes through torchrun; two CPU processes (gloo) share
    the prompts and average their LoRA gradients, and the main process writes the artifacts."""
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"method": "refl", "prompts": ["a red apple", "a blue car"], "steps": 2, **FAST}))
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "t2i_reward.cli", "finetune",
                           "--spec", str(spec), "--out", str(tmp_path / "out")],
                          env={**env, "T2I_SERVICE_DEVICE": "cpu"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["processes"] == 2 and summaries[0]["status"] == "succeeded"
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_remote_reward_matches_local_autograd(tiny):
    """The chain rule across the network: rewards and pixel gradients from /reward/gradient equal autograd in-process."""
    from t2i_reward.finetune.rewards import LocalReward, RemoteReward

    with running_server(create_app(Settings(), rewarder=tiny)) as url:
        remote = RemoteReward(url, weights={"aesthetic": 2.0})
        prompts = ["a red apple", "a blue car"]
        x = torch.rand(2, 3, 40, 48, requires_grad=True)
        y = x.detach().clone().requires_grad_(True)
        r, comps = remote(x, prompts)
        (3 * r.sum()).backward()
        local = LocalReward(tiny, weights={"aesthetic": 2.0})
        l_, local_comps = local(y, prompts)
        (3 * l_.sum()).backward()
        assert torch.allclose(r, l_.detach(), atol=1e-5)
        assert torch.allclose(x.grad, y.grad, atol=1e-6, rtol=1e-4) and x.grad.abs().sum() > 0
        # every expert's scores come back with the same call (the evaluation reuses them)
        assert set(comps) == {"imagereward", "aesthetic", "mlp"} and r.shape == (2,)
        assert all(torch.allclose(comps[n], local_comps[n], atol=1e-5) for n in comps)


@pytest.mark.parametrize("method, extra", [("reward_weighted", {"regularizer": "pretrain"}),
                                           ("refl", {"reward_loss": "hinge", "kl_weight": 0.0})])
def test_pretrain_regulariser(tiny, cache_dir, tmp_path, method, extra):
    from PIL import Image
    from t2i_reward.finetune import JobContext, JobSpec, run_job
    from t2i_reward.finetune.rewards import LocalReward

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for k, (colour, caption) in enumerate([((200, 30, 30), "a red square"), ((30, 30, 200), "a blue square")]):
        Image.new("RGB", (48, 48), colour).save(pairs / f"{k}.png")
        (pairs / f"{k}.txt").write_text(caption)
    spec = JobSpec(method=method, prompts=["a square"], steps=2, pretrain_data="pairs", pretrain_weight=1.0, **extra, **FAST)
    ctx = JobContext(out_dir=tmp_path / "out", reward=LocalReward(tiny), prompts=spec.prompts, base_model="tiny",
                     cache_dir=cache_dir, pretrain_dir=pairs)
    result = run_job(spec, ctx)
    assert result["status"] == "succeeded" and len(result["metrics"]["loss"]) == 2
    # with no caption-paired image the regulariser cannot run: a clear error
    (tmp_path / "empty").mkdir()
    ctx.pretrain_dir, ctx.out_dir = tmp_path / "empty", tmp_path / "out2"
    with pytest.raises(ValueError, match="no image with a caption"):
        run_job(spec, ctx)


PAIRS = {"pretrain_data": "pairs", "pretrain_weight": 1.0}


@pytest.mark.parametrize("method, extra", [("reward_weighted", {"regularizer": "kl"}),
                                           ("reward_weighted", {"regularizer": "pretrain", **PAIRS}),
                                           ("refl", {"kl_weight": 0.0, **PAIRS}),
                                           ("grpo", {"group_size": 2, "batch_size": 1}),
                                           ("ddpo", {"batch_size": 2, "per_prompt_stats": True, "stat_min_count": 2})])
def test_a_cut_job_resumes_exactly(tiny, cache_dir, tmp_path, method, extra):
    """A job cut off after step 2 and run again ends with the uninterrupted job's losses and LoRA: every random
    draw of a step (its denoising noise and timesteps, the VAE's posterior sample of a pre-training pair, GRPO's
    sampling noise and transition subsets) comes from that step's seed, not from the process's global generator
    (which the run before the cut had moved); DDPO's per-prompt statistics come back from the checkpoint."""
    from PIL import Image
    from safetensors.torch import load_file
    from t2i_reward.finetune import JobCancelled, JobContext, JobSpec, run_job
    from t2i_reward.finetune.rewards import LocalReward

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for k, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (48, 48), colour).save(pairs / f"{k}.png")
        (pairs / f"{k}.txt").write_text(f"square {k}")
    spec = JobSpec(method=method, prompts=["a square", "a circle"], steps=4, **{"batch_size": 2, **extra}, **FAST)

    def job(out, should_stop=None):
        return JobContext(out_dir=tmp_path / out, reward=LocalReward(tiny), prompts=spec.prompts, base_model="tiny",
                          cache_dir=cache_dir, pretrain_dir=pairs if "pretrain_data" in extra else None, should_stop=should_stop)

    whole = run_job(spec, job("whole"))
    calls = iter(range(100))
    cut = job("cut", should_stop=lambda: next(calls) >= 2)  # stops before step 2, after saving a checkpoint
    with pytest.raises(JobCancelled):
        run_job(spec, cut)
    cut.should_stop = None
    resumed = run_job(spec, cut)
    assert resumed["metrics"]["resumed_at"] == [2]
    assert resumed["metrics"]["loss"] == whole["metrics"]["loss"]
    a, b = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors"), load_file(tmp_path / "cut" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_method_has_its_job_and_every_training_method_its_step():
    """`run_job` looks the spec's method up in `train.METHODS`, `train_step` the training method in `step.STEPS`:
    the first holds exactly the names the spec admits (it refuses any other with a 422), the second a step for
    every method that trains, active learning's learners included."""
    from typing import get_args

    from pydantic import ValidationError
    from t2i_reward.finetune.spec import JobSpec
    from t2i_reward.finetune.step import STEPS
    from t2i_reward.finetune.train import METHODS, run_training

    methods = set(get_args(JobSpec.model_fields["method"].annotation))
    learners = set(get_args(JobSpec.model_fields["learner"].annotation))
    assert set(METHODS) == methods
    training = {m for m in methods if METHODS[m] is run_training}
    assert training == {"refl", "reward_weighted", "grpo", "ddpo"}
    assert set(STEPS) == training | learners
    specs = [JobSpec(method=m, prompts=["x"], **FAST) for m in training]
    specs += [JobSpec(method="active_learning", learner=m, prompts=["x"], **FAST) for m in learners]
    assert all(s.training_method in STEPS for s in specs)
    with pytest.raises(ValidationError, match="method"):
        JobSpec(method="dpo", prompts=["x"])


def test_client_job_calls(api, worker, tiny):
    from t2i_reward.service.client import RewardClient

    with running_server(create_app(api.app.state.service.settings, rewarder=tiny)) as url:
        check_job_calls(api, RewardClient(url))


def check_job_calls(api, client):
    from t2i_reward.service.client import RewardServiceError

    job_id = client.submit_job({"method": "refl", "prompts": ["a kite"], "steps": 2, **FAST})
    assert client.job(job_id)["status"] in ("queued", "running", "succeeded")
    assert any(j["id"] == job_id for j in client.jobs(limit=100)["jobs"])
    wait_for(api, job_id, {"succeeded"})
    assert client.artifact(job_id, "report.png")[:4] == b"\x89PNG"
    assert client.cancel_job(job_id) == "succeeded"  # a finished job stays finished
    with pytest.raises(RewardServiceError) as e:
        client.job("unknown")
    assert e.value.status == 404
    with pytest.raises(RewardServiceError) as e:
        client.submit_job({"method": "refl", "steps": 2, **FAST})
    assert e.value.status == 422


GENERATE = {"method": "generate", "base_model": "tiny", "prompts": ["a red apple", "a blue car"], "n_images": 3,
            "resolution": 32, "num_inference_steps": 4, "guidance_scale": 1.0}


def test_a_generate_job_keeps_the_images_ranked_by_the_rewards(api, worker, tiny):
    job_id = api.post("/jobs", json=GENERATE).json()["id"]
    job = wait_for(api, job_id, {"succeeded"})
    assert job["progress"] == {"step": 2, "total": 2, "eta_s": 0} and "results.json" in job["artifacts"]
    results = api.get(f"/jobs/{job_id}/artifacts/results.json").json()["prompts"]
    assert [r["prompt"] for r in results] == GENERATE["prompts"] == [r["used"] for r in results]  # no enhancement
    for r in results:
        totals = [im["total"] for im in r["images"]]
        assert [im["rank"] for im in r["images"]] == [0, 1, 2] and totals == sorted(totals, reverse=True)
        assert len(set(totals)) == 3 and set(r["images"][0]["components"]) == set(tiny.experts)
        # the mixture's own order: the kept files, scored again in-process (8-bit PNGs: within 0.02)
        files = [api.get(f"/jobs/{job_id}/artifacts/{im['file']}").content for im in r["images"]]
        again = [s.total for s in tiny.score(r["prompt"], files).images]
        assert again == pytest.approx(totals, abs=0.02)
    assert job["metrics"]["best"] == [r["images"][0]["total"] for r in results]


def test_generate_loads_the_lora_of_an_earlier_job(api, worker):
    tuned = wait_for(api, api.post("/jobs", json={"method": "refl", "prompts": ["a red apple"], "steps": 3, **FAST}).json()["id"],
                     {"succeeded"})
    one = {**GENERATE, "prompts": ["a red apple"]}
    base = wait_for(api, api.post("/jobs", json=one).json()["id"], {"succeeded"})
    with_lora = wait_for(api, api.post("/jobs", json={**one, "lora_from": tuned["id"]}).json()["id"], {"succeeded"})
    assert with_lora["metrics"]["best"] != base["metrics"]["best"]  # the same seeds, another model


def test_generate_specs_are_checked(api):
    assert "no finished job with a LoRA" in api.post("/jobs", json={**GENERATE, "lora_from": "nope"}).text
    r = api.post("/jobs", json={**GENERATE, "enhance": True})  # this API has no MLLM peer configured
    assert r.status_code == 422 and "enhance needs an MLLM peer" in r.text
    assert api.post("/jobs", json={**GENERATE, "lora_from": "../x"}).status_code == 422


ACTIVE = {"method": "active_learning", "base_model": "tiny", "prompts": ["a red apple", "a blue car", "a green field", "a yellow sun"],
          "eval_prompts": ["a black cat"], "rounds": 2, "steps": 2, "round_prompts": 3, "select_prompts": 1, "n_images": 3,
          "learner": "grpo", "group_size": 2, "resolution": 32, "num_inference_steps": 4, "guidance_scale": 1.0,
          "eval_images_per_prompt": 2, "learning_rate": 0.05, "clip_range": 0.2}


def test_an_active_learning_job_runs_two_rounds_end_to_end(api, worker, tiny):
    """Two rounds through REST, Redis and the worker: each round draws from the training prompts only, keeps
    the candidate with the largest spread of its K candidates' totals (recomputed here from the round's
    feedback.json), trains GRPO on it, and evaluates the held-out prompt; the by-round curve has the base
    and both rounds for every expert; the report and the LoRA are there."""
    job_id = api.post("/jobs", json=ACTIVE).json()["id"]
    job = wait_for(api, job_id, {"succeeded"})
    assert job["progress"] == {"step": 4, "total": 4, "eta_s": 0, "round": 2}
    m = job["metrics"]
    assert len(m["reward"]) == 4 and len(m["rounds"]) == 2
    experts = {"total", *tiny.experts}
    assert set(m["eval"]["by_round"]) == experts and all(len(v) == 3 for v in m["eval"]["by_round"].values())
    assert m["eval"]["prompts"] == ["a black cat"]
    assert [set(rnd) for rnd in m["rounds"]] == [{"round", "train_reward", "eval"}] * 2  # Redis keeps the scores; the prompts:
    full = api.get(f"/jobs/{job_id}/artifacts/metrics.json").json()
    assert [rnd["eval"] for rnd in full["rounds"]] == [rnd["eval"] for rnd in m["rounds"]]
    for r, rnd in enumerate(full["rounds"], start=1):
        assert rnd["round"] == r and len(rnd["drawn"]) == 3 and set(rnd["drawn"]) <= set(ACTIVE["prompts"])
        feedback = api.get(f"/jobs/{job_id}/artifacts/rounds/{r:02d}/feedback.json").json()
        assert feedback["round"] == r and [p["prompt"] for p in feedback["prompts"]] == rnd["drawn"]
        spreads = [torch.tensor([im["total"] for im in p["images"]]).std(unbiased=False).item() for p in feedback["prompts"]]
        assert spreads == pytest.approx(rnd["informativeness"], abs=1e-5)
        best = rnd["drawn"][spreads.index(max(spreads))]
        assert rnd["selected"] == [best] and [p["prompt"] for p in feedback["prompts"] if p["selected"]] == [best]
        for p in feedback["prompts"]:
            assert len(p["images"]) == 3 and set(p["images"][0]["components"]) == set(tiny.experts)
            assert api.get(f"/jobs/{job_id}/artifacts/{p['images'][0]['file']}").content[:4] == b"\x89PNG"
        assert set(rnd["eval"]) == experts
    # the LoRA moved between rounds: the held-out evaluation (same seeds) changes
    assert m["eval"]["by_round"]["total"][0] != m["eval"]["by_round"]["total"][2]
    assert {"pytorch_lora_weights.safetensors", "metrics.json", "report.png"} <= set(job["artifacts"])
    assert api.get(f"/jobs/{job_id}/artifacts/report.png").content[:4] == b"\x89PNG"

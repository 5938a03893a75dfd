"""Fine-tuning jobs whose prompts carry metadata: inline (`prompt_metadata`, `eval_prompt_metadata`) or from a
prompts file (`prompts_file`: .jsonl records, .txt lines) under the data directory; every method hands each
image its prompt's metadata; GRPO skips the images without a reward (null totals).

`meta_probe`, defined here, needs the metadata field `value`: it scores each pair with its value (a negative
value is a failure of that pair: the pair's total is NaN) and records every (prompt, metadata) pair it sees,
so the tests check what reached the reward, in-process and through the real service, rq worker and Redis.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from t2i_reward.finetune import grpo
from t2i_reward.finetune.advantages import PromptStats, advantages
from t2i_reward.finetune.prepare import prepare_job
from t2i_reward.finetune.prompts import PromptMetadata, load_prompts_file
from t2i_reward.finetune.rewards import LocalReward
from t2i_reward.finetune.settings import FinetuneSettings
from t2i_reward.finetune.spec import JobLimits, JobSpec
from t2i_reward.finetune.train import JobContext, run_job
from t2i_reward.rewarders import create_rewarder
from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.rewarders.images import Preprocess
from t2i_reward.rewarders.registry import EXPERTS, Expert, ExpertConfig, ExpertOutput, register_expert

from .conftest import running_server

REDIS_URL = os.environ.get("T2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repository
FAST = dict(base_model="tiny", resolution=32, num_inference_steps=4, guidance_scale=1.0, eval_images_per_prompt=1,
            learning_rate=1e-2, checkpoint_every=100, kl_weight=0.0)
PROMPTS = ["a red ball", "a blue car", "a broken sign"]
META = [{"value": 1.0, "tag": "single_object"}, {"value": 3.0}, {"value": -1.0}]  # the sign's pairs fail


class ProbeConfig(ExpertConfig):
    pass


class MetaProbe(Expert):
    """Each pair's `metadata["value"]` (whatever the image); a negative value fails that pair. Records what it
    was given."""

    name = "meta_probe"
    Config = ProbeConfig
    uses_metadata = True
    metadata_fields = ("value",)
    seen: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def __init__(self):
        super().__init__(Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "none", False)

    @classmethod
    def from_config(cls, cfg, ctx):
        return cls()

    def check_pair(self, prompt, metadata):
        if not isinstance(metadata["value"], (int, float)) or isinstance(metadata["value"], bool):
            raise InvalidRequestError("expert 'meta_probe': metadata field 'value' must be a number")

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None, metadata=None):
        with self.lock:
            MetaProbe.seen += list(zip(prompts, metadata))
        values = torch.tensor([float(m["value"]) for m in metadata], device=pixels.device)
        values = values + 0.0 * pixels.float().mean(dim=(1, 2, 3))  # a graph for ReFL's backward (a zero gradient)
        return ExpertOutput(values, errors={i: "negative value" for i, m in enumerate(metadata) if m["value"] < 0})


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_expert(MetaProbe)
    yield
    EXPERTS.pop("meta_probe", None)


@pytest.fixture(scope="module")
def probe(cache_dir):
    """The probe alone, raw scores (no normalisation): a pair's total is its value."""
    return create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", normalize=False,
                           experts={"imagereward": None, "aesthetic": None, "mlp": None, "meta_probe": {}})


@pytest.fixture
def seen():
    MetaProbe.seen.clear()
    return MetaProbe.seen


def settings(data_dir: Path, tmp_path: Path) -> FinetuneSettings:
    return FinetuneSettings(profile="tiny", redis_url=REDIS_URL, jobs_dir=tmp_path / "jobs", models_dir=tmp_path / "models",
                            data_dir=data_dir)


def write_jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# ---- the spec and the prompts files

def shared(name: str) -> Path:
    if not (SHARED / name).is_file():
        pytest.skip(f"the shared data file {name} is not at {SHARED}")
    return SHARED / name


def test_genevals_and_flow_grpos_prompt_files_load_as_they_are(tmp_path):
    """GenEval's records (each line's whole object is its prompt's metadata) and Flow-GRPO's OCR prompt list
    (a prompt a line, no metadata), read from the shared data folder as the data directory."""
    path = shared("geneval/evaluation_metadata.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts, metadata = load_prompts_file("geneval/evaluation_metadata.jsonl", SHARED)
    assert len(prompts) == 553 and prompts == [r["prompt"] for r in records] and metadata == records
    assert metadata[0] == {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
    ocr = shared("ocr/flow_grpo_test.txt").read_text().splitlines()
    prompts, metadata = load_prompts_file("ocr/flow_grpo_test.txt", SHARED)
    # 1,018 prompts (its README says 1,017: `wc -l` of a file without a final newline)
    assert metadata is None and len(prompts) == 1018 and prompts == [p.strip() for p in ocr if p.strip()]
    assert '"Spring Collection 2024"' in prompts[0]
    # the job's spec holds them once prepared: a prompt's metadata by its text, for every image of it
    prepared = prepare_job(JobSpec(method="grpo", prompts_file="geneval/evaluation_metadata.jsonl"), settings(SHARED, tmp_path))
    assert prepared.spec.prompts[:2] == ["a photo of a bench", "a photo of a cow"] and prepared.spec.prompt_metadata == records
    assert prepared.spec.prompts_file == "geneval/evaluation_metadata.jsonl"
    table = PromptMetadata.of_spec(prepared.spec)
    assert table(["a photo of a cow", "a photo of a cow", "not a prompt"]) == [records[1], records[1], {}]
    assert prepare_job(prepared.spec, settings(SHARED, tmp_path)).spec == prepared.spec  # idempotent: not read again


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "prompts_file 'missing.jsonl': no such file in the data directory"),
    ("../outside.jsonl", None, "prompts_file '../outside.jsonl': no such file in the data directory (paths outside it are refused)"),
    ("/etc/hostname", None, "no such file in the data directory"),
    ("prompts.csv", "a cat\n", "must be .jsonl"),
    ("bad.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog",\n', "prompts_file 'bad.jsonl' line 2 is not JSON"),
    ("list.jsonl", '["a cat"]\n', "line 1 must be a JSON object with a 'prompt', got list"),
    ("noprompt.jsonl", '{"text": "a cat"}\n', "line 1 has no 'prompt' string"),
    ("deep.jsonl", json.dumps({"prompt": "a", "x": [[[[[[[[[1]]]]]]]]]}) + "\n", "line 1: the record.x[0][0][0][0][0][0][0] is nested too deeply"),
    ("long.txt", "a" * 2001 + "\n", "line 1: the prompt has 2001 characters; the limit is 2000"),
    ("empty.txt", "\n  \n", "holds no prompts"),
    ("twice.jsonl", '{"prompt": "a cat", "value": 1}\n{"prompt": "a cat", "value": 2}\n', "'a cat' is given twice with different metadata"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
])
def test_bad_prompts_files_are_refused_when_the_job_is_prepared(tmp_path, name, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "outside.jsonl").write_text('{"prompt": "a cat"}\n')
    if content is not None:
        (data / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as err:
        prepare_job(JobSpec(method="grpo", prompts_file=name), settings(data, tmp_path))
    assert message in str(err.value)
    assert str(tmp_path) not in str(err.value)  # no server path in the answer


@pytest.mark.parametrize("spec, message", [
    ({"prompts": ["a", "b"], "prompt_metadata": [{"value": 1}]}, "1 prompt_metadata objects for 2 prompts"),
    ({"topics": ["a fox"], "prompt_metadata": [{"value": 1}]}, "prompt_metadata needs prompts"),
    ({"prompts": ["a"], "prompt_metadata": [{"value": float("nan")}]}, "prompt_metadata[0].value must be a finite number"),
    ({"prompts": ["a"], "prompt_metadata": [{"blob": "x" * 20000}]}, "prompt_metadata[0] is 20011 bytes as JSON; the limit is 16384"),
    ({"prompts": ["a"], "prompt_metadata": [7]}, "Input should be a valid dictionary"),
    ({"prompts": ["a", "a"], "prompt_metadata": [{"value": 1}, {"value": 2}]}, "'a' is given twice with different metadata"),
    ({"prompts": ["a"], "prompt_metadata": [{"value": 1}], "eval_prompts": ["a"], "eval_prompt_metadata": [{"value": 2}]}, "given twice"),
    ({"prompts": ["a"], "eval_prompt_metadata": [{"value": 2}]}, "eval_prompt_metadata needs eval_prompts"),
    ({"topics": ["a fox"], "prompts_file": "x.jsonl"}, "give topics or prompts_file, not both"),
    ({}, "give prompts, topics and n_prompts, or prompts_file"),
])
def test_spec_metadata_rules(spec, message):
    with pytest.raises(ValidationError) as err:
        JobSpec(method="grpo", **spec)
    assert message in str(err.value)


# ---- advantages without a reward

def test_grpo_advantages_skip_null_totals():
    spec = JobSpec(method="grpo", prompts=["a"], group_size=3)
    nan = math.nan
    prompts = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    total = torch.tensor([1.0, nan, 3.0, 5.0, 5.0, nan, nan, nan, nan])
    adv = advantages(spec, prompts, total, {"meta_probe": total}, {"meta_probe": 1.0}, None)
    # "a": z-scored over its two scored images (mean 2, std 1); no reward: advantage 0; "c" has none at all
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    # per_expert: an optional expert's failure leaves the other's z-score, renormalised to the whole weight
    per = spec.model_copy(update={"advantage_normalization": "per_expert"})
    x, y = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([2.0, nan, 4.0])
    adv = advantages(per, ["a"] * 3, x + torch.nan_to_num(y), {"x": x, "y": y}, {"x": 1.0, "y": 1.0}, None)
    zx, zy = 1 / ((2 / 3) ** 0.5 + 1e-4), 1 / (1 + 1e-4)  # x's z-scores are -zx, zx, 0; y's -zy, (none), zy
    assert adv.tolist() == pytest.approx([-zx - zy, 2 * zx, zy], abs=1e-4)  # image 1: x's alone, times (1 + 1) / 1
    # DDPO's per-prompt statistics: a missing reward enters no buffer; its advantage is 0
    stats = PromptStats(buffer_size=4, min_count=2)
    out = advantages(JobSpec(method="ddpo", prompts=["a"]), ["a", "a", "a"], torch.tensor([1.0, nan, 3.0]), {}, {}, stats)
    assert stats.buffers == {"a": [1.0, 3.0]} and out.tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-3)



def test_local_scores_run_the_batch_once_with_nan_where_a_pair_failed(cache_dir, seen, monkeypatch):
    """`LocalReward.scores` on a batch where the required meta_probe fails two pairs: one forward call of each
    expert and of the CLIP backbone for the whole batch (never scored a second time), NaN exactly at those pairs
    (their totals too), the other expert's scores kept; the service's raw-tensor `/reward` (`RemoteReward.scores`)
    gives the same numbers, bit for bit."""
    from t2i_reward.finetune.rewards import RemoteReward
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    mixture = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", calibration=None,
                              experts={"imagereward": None, "mlp": None, "aesthetic": {"clip": "tiny", "head": "tiny"},
                                       "meta_probe": {"mean": 0.0, "std": 1.0}})
    calls: dict[str, int] = {}

    def count(obj, method: str, name: str):
        run = getattr(obj, method)
        monkeypatch.setattr(obj, method, lambda *a, **k: (calls.__setitem__(name, calls.get(name, 0) + 1), run(*a, **k))[1])

    for name, e in mixture.experts.items():
        count(e, "forward", name)
    for clip in mixture.clips.values():
        count(clip, "encode_images", "clip")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompts = ["a red ball", "a blue car"] * 3
    meta = [{"value": v} for v in (1.0, -1.0, 2.0, 3.0, -1.0, 4.0)]
    total, components = LocalReward(mixture).scores(images, prompts, meta)
    assert calls == {"clip": 1, "aesthetic": 1, "meta_probe": 1} and len(seen) == 6  # one pass over the batch
    failed = [False, True, False, False, True, False]
    assert torch.isnan(total).tolist() == failed and torch.isnan(components["meta_probe"]).tolist() == failed
    assert components["meta_probe"][[0, 2, 3, 5]].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert not torch.isnan(components["aesthetic"]).any()
    with running_server(create_app(Settings(), rewarder=mixture)) as url:
        remote_total, remote_components = RemoteReward(url).scores(images, prompts, meta)
    assert torch.equal(remote_total.nan_to_num(-99.0), total.nan_to_num(-99.0))
    assert remote_components.keys() == components.keys()
    for name, s in components.items():
        assert torch.equal(remote_components[name].nan_to_num(-99.0), s.nan_to_num(-99.0)), name


# ---- jobs in-process

def run(tmp_path, cache_dir, probe, spec: JobSpec, prompts=None):
    ctx = JobContext(out_dir=tmp_path / "out", reward=LocalReward(probe), prompts=prompts or spec.prompts, base_model="tiny",
                     cache_dir=cache_dir, device="cpu")
    return run_job(spec, ctx)


def test_a_grpo_job_hands_each_image_its_prompts_metadata(tmp_path, cache_dir, probe, seen, monkeypatch):
    """Inline metadata: every pair the expert saw carries its own prompt's object (GRPO groups, the evaluation);
    the broken sign's images get no reward: no policy-gradient term, counted in `unscored`."""
    advs = []
    policy_loss = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda ratio, adv, clip: advs.append(adv.detach().cpu()) or policy_loss(ratio, adv, clip))
    spec = JobSpec(**{**FAST, "method": "grpo", "prompts": PROMPTS, "prompt_metadata": META, "steps": 2, "batch_size": 3,
                      "group_size": 2, "seed": 1})
    out = run(tmp_path, cache_dir, probe, spec)
    assert out["status"] == "succeeded"
    table = dict(zip(PROMPTS, META))
    assert seen and all(meta == table[prompt] for prompt, meta in seen)
    order = [p for p, _ in seen]
    group = [p for p in PROMPTS for _ in range(2)]  # a step's images: each prompt's group of 2
    assert any(order[i:i + 6] == group for i in range(len(order))) and set(order) == set(PROMPTS)
    m = out["metrics"]
    assert m["reward"] == [2.0, 2.0]  # the mean over the scored images: (1 + 1 + 3 + 3) / 4
    assert m["unscored"] == [2, 2] and m["components"]["meta_probe"] == [2.0, 2.0]
    assert all(a[4:].abs().max() == 0 for a in advs)  # the sign's two images: advantage 0 in every update
    ev = m["eval"]["base"]["total"]
    assert ev["mean"] == 2.0 and ev["unscored"] == 1  # the evaluation leaves the unscored image out
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["unscored"] == [2, 2]


def test_a_grpo_job_reads_its_prompts_and_metadata_from_a_jsonl_file(tmp_path, cache_dir, probe, seen):
    """prompts_file in the data directory, prepared as the API and the worker prepare it; evaluation prompts
    with their own metadata."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "probe.jsonl", [{"prompt": "a red ball", "value": 4.0, "tag": "colors"}, {"prompt": "a blue car", "value": 6.0}])
    spec = JobSpec(**{**FAST, "method": "grpo", "prompts_file": "probe.jsonl", "steps": 1, "batch_size": 2, "group_size": 2,
                      "eval_prompts": ["a green field"], "eval_prompt_metadata": [{"value": 5.0}]})
    prepared = prepare_job(spec, settings(data, tmp_path))
    out = run(tmp_path, cache_dir, probe, prepared.spec)
    assert out["metrics"]["reward"] == [5.0] and out["metrics"]["unscored"] == [0]
    assert out["metrics"]["eval"]["base"]["total"]["mean"] == 5.0 and out["metrics"]["eval"]["tuned"]["meta_probe"]["mean"] == 5.0
    table = {"a red ball": {"prompt": "a red ball", "value": 4.0, "tag": "colors"}, "a blue car": {"prompt": "a blue car", "value": 6.0},
             "a green field": {"value": 5.0}}
    assert {p for p, _ in seen} == set(table) and all(meta == table[p] for p, meta in seen)


def test_the_other_methods_hand_over_the_metadata_too(tmp_path, cache_dir, probe, seen):
    """ReFL (the differentiable call), reward-weighted likelihood and best-of-n generation: each pair with its
    prompt's metadata. A step with no reward at all fails the job with the reason."""
    table = {"a red ball": {"value": 1.0}, "a blue car": {"value": 3.0}}
    base = {**FAST, "prompts": list(table), "prompt_metadata": list(table.values()), "steps": 1, "batch_size": 2}
    for method, extra in (("refl", {"refl_step_range": [1, 3]}), ("reward_weighted", {}), ("generate", {"n_images": 2})):
        seen.clear()
        out = run(tmp_path / method, cache_dir, probe, JobSpec(**{**base, "method": method, **extra}))
        assert out["status"] == "succeeded" and seen, method
        assert all(meta == table[p] for p, meta in seen), method
    best = json.loads((tmp_path / "generate" / "out" / "results.json").read_text())["prompts"]
    assert [[im["total"] for im in p["images"]] for p in best] == [[1.0, 1.0], [3.0, 3.0]]
    with pytest.raises(RuntimeError, match="step 1: no image got a reward"):
        run(tmp_path / "none", cache_dir, probe, JobSpec(**{**FAST, "method": "grpo", "prompts": ["a broken sign"],
                                                          "prompt_metadata": [{"value": -1.0}], "steps": 1, "group_size": 2}))


# ---- through the service, an rq worker and Redis

def test_a_grpo_job_with_a_prompts_file_through_the_service_and_a_worker(tmp_path, cache_dir, probe, seen):
    """The API reads the prompts file at submission (422s for what cannot run), the worker scores through the
    service (RemoteReward): the metadata crosses the wire with each image."""
    import httpx
    import redis
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    redis.Redis.from_url(REDIS_URL).flushdb()
    for d in ("jobs", "models", "data"):
        (tmp_path / d).mkdir()
    data = tmp_path / "data"
    write_jsonl(data / "probe.jsonl", [{"prompt": p, **m} for p, m in zip(PROMPTS, META)])
    (data / "plain.txt").write_text("a red ball\na blue car\n")
    write_jsonl(data / "broken.jsonl", [{"prompt": "a cat", "value": 1}])
    (data / "broken.jsonl").write_text((data / "broken.jsonl").read_text() + "{oops\n")
    app_settings = Settings(redis_url=REDIS_URL, jobs_dir=tmp_path / "jobs", models_dir=tmp_path / "models", data_dir=data,
                            job_limits=JobLimits(max_steps=1000), max_wait_ms=2)
    with running_server(create_app(app_settings, rewarder=probe)) as url:
        env = {**os.environ, "T2I_SERVICE_REDIS_URL": REDIS_URL, "T2I_SERVICE_JOBS_DIR": str(tmp_path / "jobs"),
               "T2I_SERVICE_MODELS_DIR": str(tmp_path / "models"), "T2I_SERVICE_DATA_DIR": str(data), "T2I_SERVICE_PROFILE": "tiny",
               "T2I_REWARD_CACHE_DIR": str(cache_dir), "T2I_SERVICE_REWARD_SERVICE_URL": url, "T2I_SERVICE_DEVICE": "cpu"}
        http = httpx.Client(base_url=url, timeout=60)
        spec = {**FAST, "method": "grpo", "steps": 2, "batch_size": 3, "group_size": 2}
        for change, message in (
            ({"prompts_file": "nope.jsonl"}, "prompts_file 'nope.jsonl': no such file in the data directory"),
            ({"prompts_file": "../jobs"}, "no such file in the data directory (paths outside it are refused)"),
            ({"prompts_file": "broken.jsonl"}, "prompts_file 'broken.jsonl' line 2 is not JSON"),
            ({"prompts_file": "probe.jsonl", "prompts": ["a cat"]}, "give prompts or prompts_file, not both"),
            ({"prompts": ["a", "b"], "prompt_metadata": [{"value": 1}]}, "1 prompt_metadata objects for 2 prompts"),
            # the served mixture's expert needs `value`: a .txt file's prompts have none
            ({"prompts_file": "plain.txt"}, "expert 'meta_probe' needs the metadata field 'value'"),
            ({"prompts": ["a"], "prompt_metadata": [{"value": "high"}]}, "metadata field 'value' must be a number"),
        ):
            r = http.post("/jobs", json={**spec, **change})
            assert r.status_code == 422, (change, r.text)
            assert message in r.text and str(tmp_path) not in r.text
        r = http.post("/jobs", json={**spec, "prompts_file": "probe.jsonl"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        exe = Path(sys.executable).parent / "t2i-reward"
        log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen([str(exe), "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            end, job = time.time() + 300, None
            while time.time() < end:
                job = http.get(f"/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed"):
                    break
                time.sleep(0.5)
        finally:
            worker.terminate()
            worker.wait(30)
            log.close()
        assert job["status"] == "succeeded", (job, (tmp_path / "worker.log").read_text()[-3000:])
        assert job["metrics"]["reward"] == [2.0, 2.0] and job["metrics"]["unscored"] == [2, 2]
        records = {p: {"prompt": p, **m} for p, m in zip(PROMPTS, META)}
        assert len(seen) >= 3 + 12 and all(meta == records[p] for p, meta in seen)  # every pair scored by the service
        http.close()


# ---- the verifiable rewards themselves: geneval (tiny detector) and ocr (real PP-OCR weights) in GRPO jobs

@pytest.mark.parametrize("expert, folder, file", [
    ("geneval", "geneval", "evaluation_metadata.jsonl"),  # GenEval's records, each the metadata of its prompt
    ("ocr", "ocr", "flow_grpo_test.txt"),                 # Flow-GRPO's OCR prompts: the target in the quotes
])
def test_a_grpo_job_with_a_verifiable_reward_from_the_shared_prompt_files(tmp_path, cache_dir, expert, folder, file):
    """The prompts file read from the shared data folder as it is, GRPO sampling, the reward scoring each
    pair with its record (learning is not expected from random weights: the plumbing is)."""
    shared(f"{folder}/{file}")
    experts = {"geneval": {"detector": "tiny", "clip": "tiny", "image_size": 64}, "ocr": {"size": 64}}
    rewarder = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu",
                               experts={"imagereward": None, "aesthetic": None, "mlp": None, expert: experts[expert]})
    spec = JobSpec(**{**FAST, "method": "grpo", "prompts_file": file, "steps": 1, "batch_size": 2, "group_size": 2,
                      "eval_prompts": None})
    prepared = prepare_job(spec, settings(SHARED / folder, tmp_path))
    assert prepared.spec.prompts
    if expert == "geneval":
        assert len(prepared.spec.prompts) == len(prepared.spec.prompt_metadata) == 553
        assert prepared.spec.prompt_metadata[0]["tag"] == "single_object"
    else:  # a .txt file: prompts only, the target between each prompt's quotes
        assert prepared.spec.prompt_metadata is None and '"' in prepared.spec.prompts[0]
    out = run(tmp_path, cache_dir, rewarder, prepared.spec)
    assert out["status"] == "succeeded", out
    m = out["metrics"]
    assert m["unscored"] == [0] and 0.0 <= m["components"][expert][0] <= 1.0
    assert set(m["eval"]["tuned"]) >= {expert}

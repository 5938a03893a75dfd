"""Per-pair metadata through the library, and one expert's per-pair failures that do not fail the request.

Two experts defined here read metadata: `echo_meta` scores each pair with its metadata's `value` (and
fails on negative values, per pair), `flaky` raises for every batch it sees. With the tiny profile's
real experts beside them, the tests check what the answer says: components, extras, errors, totals
over the experts that answered, advantages over the scored pairs.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from pydantic import Field

from t2i_reward.rewarders import RewardConfig, create_rewarder
from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.rewarders.images import Preprocess
from t2i_reward.rewarders.registry import EXPERTS, Expert, ExpertConfig, ExpertOutput, register_expert


class EchoConfig(ExpertConfig):
    offset: float = Field(0.0, description="Added to each pair's value.")


class EchoMeta(Expert):
    """Each pair's `metadata["value"]` plus `offset`; a negative value is a failure of that pair only."""

    name = "echo_meta"
    Config = EchoConfig
    uses_metadata = True
    metadata_fields = ("value",)
    extras = ("double",)

    def __init__(self, offset: float):
        super().__init__(Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "none", False)
        self.offset = offset

    @classmethod
    def from_config(cls, cfg, ctx):
        return cls(cfg.offset)

    def check_pair(self, prompt, metadata):
        if not isinstance(metadata["value"], (int, float)) or isinstance(metadata["value"], bool):
            raise InvalidRequestError("expert 'echo_meta': metadata field 'value' must be a number")

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None, metadata=None):
        values = torch.tensor([float(m["value"]) for m in metadata]) + self.offset
        errors = {i: "negative value" for i, m in enumerate(metadata) if m["value"] < 0}
        return ExpertOutput(values, extras={"double": 2 * values}, errors=errors)


class Flaky(Expert):
    """Raises on every call: a judge whose peer is down."""

    name = "flaky"

    def __init__(self):
        super().__init__(Preprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "none", False)

    @classmethod
    def from_config(cls, cfg, ctx):
        return cls()

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None):
        raise TimeoutError("the peer did not answer in 30 s")


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_expert(EchoMeta)
    register_expert(Flaky)
    yield
    EXPERTS.pop("echo_meta", None)
    EXPERTS.pop("flaky", None)


def images(n):
    return [Image.new("RGB", (24 + i, 20), (40 * i % 255, 90, 200)) for i in range(n)]


def rewarder(cache_dir, **experts):
    base = {"aesthetic": {"clip": "tiny", "head": "tiny", "mean": 0.0, "std": 1.0}}
    return create_rewarder(RewardConfig(profile="tiny", cache_dir=cache_dir, calibration=None, experts={**base, **experts}))


def test_each_pair_gets_its_own_metadata(cache_dir):
    r = rewarder(cache_dir, echo_meta={"offset": 0.5, "mean": 0.0, "std": 1.0})
    res = r.score("a cat", images(3), metadata=[{"value": 1}, {"value": 2.5}, {"value": 0, "note": ["x", {"y": None}]}])
    assert [im.components["echo_meta"] for im in res.images] == [1.5, 3.0, 0.5]
    assert [im.extras["echo_meta.double"] for im in res.images] == [3.0, 6.0, 1.0]
    aes = [im.components["aesthetic"] for im in res.images]
    assert [im.total for im in res.images] == pytest.approx([a + e for a, e in zip(aes, [1.5, 3.0, 0.5])], abs=1e-6)
    # one object stands for every image; several requests in one call keep their own
    one = r.score("a cat", images(2), metadata={"value": 4})
    assert [im.components["echo_meta"] for im in one.images] == [4.5, 4.5]
    many = r.score_many([("a", images(2), None, [{"value": 1}, {"value": 2}]), ("b", images(1), None, {"value": 7})])
    assert [im.components["echo_meta"] for res in many for im in res.images] == [1.5, 2.5, 7.5]


@pytest.mark.parametrize("metadata, message", [
    (None, "needs the metadata field 'value' for every image; image 0 has no metadata"),
    ([{"value": 1}, {"other": 1}], "image 1's metadata lacks it"),
    ([{"value": 1}, None], "image 1 has no metadata"),
    ([{"value": "high"}, {"value": 1}], "image 0: expert 'echo_meta': metadata field 'value' must be a number"),
    ([{"value": 1}], "1 metadata objects for 2 images"),
    ([{"value": 1}, [1]], "metadata[1] must be a JSON object"),
    ("value", "metadata must be a JSON object per image"),
    ([{"value": 1}, {"value": float("nan")}], "metadata[1].value must be a finite number"),
    ([{"value": 1}, {"value": 1, "deep": [[[[[[[[[1]]]]]]]]]}], "nested too deeply"),
    ([{"value": 1}, {"value": 1, "blob": "x" * 20000}], "bytes as JSON; the limit is 16384"),
    ([{"value": 1}, {"value": 1, 3: 4}], "keys must be strings"),
    ([{"value": 1}, {"value": 1, "f": object()}], "must be a JSON value"),
])
def test_metadata_an_expert_cannot_use_is_refused_before_any_model_runs(cache_dir, metadata, message):
    r = rewarder(cache_dir, echo_meta={})
    with pytest.raises(InvalidRequestError, match=None) as err:
        r.score("a cat", images(2), metadata=metadata)
    assert message in str(err.value)
    # the same checks on the tensor paths
    with pytest.raises(InvalidRequestError) as err:
        r.check_tensor_request("a cat", torch.rand(2, 3, 16, 16), metadata=metadata)
    assert message in str(err.value)


def test_metadata_reaches_the_differentiable_path(cache_dir):
    r = rewarder(cache_dir, echo_meta={"mean": 0.0, "std": 1.0})
    x = torch.rand(2, 3, 32, 32)
    out = r.reward_and_gradient(x, "a cat", metadata=[{"value": 1.0}, {"value": 3.0}])
    assert out["components.echo_meta"].tolist() == [1.0, 3.0]
    with pytest.raises(InvalidRequestError, match="needs every score"):
        r.reward_and_gradient(x, "a cat", metadata=[{"value": -1.0}, {"value": 3.0}])


def test_a_required_expert_failing_on_a_pair_leaves_that_pair_without_a_total(cache_dir):
    r = rewarder(cache_dir, echo_meta={"mean": 0.0, "std": 1.0})
    res = r.score("a cat", images(3), metadata=[{"value": 1}, {"value": -1}, {"value": 2}])
    second = res.images[1]
    assert second.components["echo_meta"] is None and second.total is None
    assert second.errors == {"echo_meta": "negative value"}
    assert res.images[0].errors is None and res.images[0].total is not None
    assert res.mean_reward == pytest.approx((res.images[0].total + res.images[2].total) / 2)
    assert res.component_rewards["echo_meta"] == pytest.approx(1.5)


def test_an_optional_expert_failing_renormalises_the_weights_of_the_others(cache_dir):
    r = rewarder(cache_dir, echo_meta={"mean": 0.0, "std": 1.0, "weight": 2.0, "required": False})
    res = r.score("a cat", images(2), metadata=[{"value": 1}, {"value": -1}], weights={"aesthetic": 1.0})
    ok, failed = res.images
    assert ok.total == pytest.approx(ok.components["aesthetic"] + 2.0, abs=1e-6)
    # aesthetic alone answered for the second pair: its weight 1 scaled to the full |w| sum 3
    assert failed.total == pytest.approx(3.0 * failed.components["aesthetic"], rel=1e-6)
    assert failed.errors == {"echo_meta": "negative value"} and failed.components["echo_meta"] is None


def test_an_optional_expert_that_raises_fails_its_pairs_not_the_request(cache_dir):
    r = rewarder(cache_dir, flaky={"required": False})
    res = r.score("a cat", images(2))
    for im in res.images:
        assert im.components["flaky"] is None
        assert im.errors == {"flaky": "TimeoutError: the peer did not answer in 30 s"}
        assert im.total == pytest.approx(2.0 * im.components["aesthetic"], rel=1e-6)  # weights 1 + 1 -> aesthetic's scaled by 2
    assert res.component_rewards["flaky"] is None
    required = rewarder(cache_dir, flaky={})
    with pytest.raises(TimeoutError):
        required.score("a cat", images(2))


def test_advantages_skip_pairs_without_a_total(cache_dir):
    r = rewarder(cache_dir, echo_meta={"mean": 0.0, "std": 1.0, "weight": 1.0}, aesthetic={"clip": "tiny", "head": "tiny", "weight": 0.0})
    meta = [{"value": v} for v in (1.0, -1.0, 3.0, 5.0, 5.0, 7.0)]
    checked = r.check_request("a cat", images(6), group_ids=["a", "a", "a", "b", "b", "b"], metadata=meta)
    res = r.score_checked([checked])[0]
    adv = res.advantages["total"]
    assert adv[1] is None
    # group a is scored over its two pairs (1 and 3): z-scores +-1 (population std 1, eps 1e-4)
    assert adv[0] == pytest.approx(-1 / (1 + 1e-4)) and adv[2] == pytest.approx(1 / (1 + 1e-4))
    assert all(a is not None for a in adv[3:])
    assert not any(isinstance(a, float) and math.isnan(a) for a in adv if a is not None)


# ---- over HTTP: each body carries metadata, the clients and the trainers' reward functions send it

@pytest.fixture(scope="module")
def served(cache_dir, registered):
    """A real uvicorn server with echo_meta (required) and flaky (optional) beside the tiny aesthetic expert."""
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    from .conftest import running_server

    r = rewarder(cache_dir, echo_meta={"mean": 0.0, "std": 1.0}, flaky={"required": False})
    with running_server(create_app(Settings(max_wait_ms=2), rewarder=r)) as url:
        yield url, r


def png(i):
    import io
    buf = io.BytesIO()
    images(3)[i].save(buf, format="PNG")
    return buf.getvalue()


def test_json_multipart_and_safetensors_bodies_carry_metadata(served):
    import base64
    import json

    import httpx

    from t2i_reward.rewarders import wire

    url, _ = served
    meta = [{"value": 1.0}, {"value": -2.0}]
    with httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "a cat", "images": [base64.b64encode(png(i)).decode() for i in range(2)], "metadata": meta}
        a = http.post("/reward", json=body)
        files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(2)]
        b = http.post("/reward", data={"prompt": "a cat", "metadata": [json.dumps(m) for m in meta]}, files=files)
        x = torch.stack([torch.from_numpy(__import__("numpy").asarray(images(3)[i].resize((32, 32)))) for i in range(2)])
        c = http.post("/reward", content=wire.encode_tensor_request(x, "a cat", metadata=meta), headers=wire.TENSOR_HEADERS)
        for r in (a, b):
            assert r.status_code == 200, r.text
            got = r.json()
            assert [im["components"]["echo_meta"] for im in got["images"]] == [1.0, None]
            assert got["images"][1]["total"] is None
            assert got["images"][1]["errors"] == {"echo_meta": "negative value", "flaky": "TimeoutError: the peer did not answer in 30 s"}
            assert got["images"][0]["errors"] == {"flaky": "TimeoutError: the peer did not answer in 30 s"}
            assert got["images"][0]["extras"] == {"echo_meta.double": 2.0}
            assert got["component_rewards"]["flaky"] is None
        assert c.status_code == 200, c.text
        s = wire.decode_scores(wire.OCTET, c.content)
        assert s.components["echo_meta"][0] == 1.0 and math.isnan(float(s.components["echo_meta"][1]))
        assert math.isnan(float(s.rewards[1])) and not math.isnan(float(s.rewards[0]))
        assert s.extras["echo_meta.double"].tolist()[0] == 2.0
        assert s.errors[1]["echo_meta"] == "negative value"
        # one multipart field for every image
        one = http.post("/reward", data={"prompt": "a cat", "metadata": json.dumps({"value": 3})}, files=files)
        assert [im["components"]["echo_meta"] for im in one.json()["images"]] == [3.0, 3.0]
        # refused with a 422 that names the expert and the field
        for bad in ({**body, "metadata": None}, {**body, "metadata": [{"value": 1}, {"other": 2}]},
                    {**body, "metadata": [{"value": 1}, {"value": 1, "x": [[[[[[[[[0]]]]]]]]]}]}):
            r = http.post("/reward", json=bad)
            assert r.status_code == 422, r.text
        assert "expert 'echo_meta' needs the metadata field 'value'" in http.post("/reward", json={**body, "metadata": None}).text
        r = http.post("/reward", data={"prompt": "a cat", "metadata": ["{not json", "{}"]}, files=files)
        assert r.status_code == 422 and "multipart field 'metadata' #0" in r.text
        r = http.post("/reward", content=wire.encode_tensor_request(x, "a cat", metadata=[{"value": 1}]), headers=wire.TENSOR_HEADERS)
        assert r.status_code == 422 and "1 metadata objects for 2 images" in r.text
        metrics = http.get("/metrics").text
        assert 't2i_expert_failures_total{expert="flaky"}' in metrics and 't2i_expert_failures_total{expert="echo_meta"}' in metrics


def test_clients_and_reward_functions_send_metadata(served):
    import asyncio

    from t2i_reward.rewarders.client import AsyncRewardClient, RewardClient
    from t2i_reward.rewarders.reward_fns import dance_grpo_reward_fn, ddpo_reward_fn, flow_grpo_reward_fn

    url, r = served
    x = torch.rand(4, 3, 32, 32)
    meta = tuple({"value": float(v)} for v in (1, 2, 3, 4))
    with RewardClient(url) as client:
        s = client.score_batch("a cat", x, metadata=meta, chunk_size=2)
        assert s.components["echo_meta"].tolist() == [1.0, 2.0, 3.0, 4.0]
        assert s.extras["echo_meta.double"].tolist() == [2.0, 4.0, 6.0, 8.0]
        assert s.errors is not None and all(e == {"flaky": "TimeoutError: the peer did not answer in 30 s"} for e in s.errors)
        j = client.reward("a cat", [png(0)], metadata=[{"value": 5}])
        assert j["images"][0]["components"]["echo_meta"] == 5.0

    async def run():
        async with AsyncRewardClient(url) as client:
            return await client.score_batch(["a", "b", "c", "d"], x, metadata=list(meta), chunk_size=3)

    assert asyncio.run(run()).components["echo_meta"].tolist() == [1.0, 2.0, 3.0, 4.0]

    for target in (url, r):  # the service and the rewarder in this process answer alike
        scores, info = ddpo_reward_fn(target, quantize=False)(x, ["a cat"] * 4, meta)
        assert info["echo_meta"].tolist() == [1.0, 2.0, 3.0, 4.0]
        details, _ = flow_grpo_reward_fn(target, quantize=False)(x, ["a cat"] * 4, meta, only_strict=True)
        assert details["echo_meta"].tolist() == [1.0, 2.0, 3.0, 4.0] and details["echo_meta.double"].tolist() == [2.0, 4.0, 6.0, 8.0]
        np_avg = details["avg"]
        assert np_avg.shape == (4,) and not __import__("numpy").isnan(np_avg).any()
        rewards = dance_grpo_reward_fn(target, quantize=False)(x, "a cat", list(meta))
        assert torch.allclose(rewards, torch.as_tensor(scores), atol=1e-5)

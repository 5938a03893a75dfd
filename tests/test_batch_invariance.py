"""Issue 31: with `batch_invariant: true`, a pair's scores are bit-identical whatever it is batched with.

Randomised compositions and orders (alone, pooled with other requests in shuffled order, across forward-pass
boundaries) through the library for every expert that runs a model (the tiny checkpoints, ocr's real PP-OCR
weights), on the PIL path and on the raw-tensor path each against itself; the differentiable path; GRPO
advantages; and the running service (uvicorn) under concurrent clients. Every comparison is `torch.equal`.
"""

from __future__ import annotations

import os
import random
import threading

import httpx
import pytest
import torch
from PIL import Image

from t2i_reward.rewarders import create_rewarder
from t2i_reward.rewarders.advantages import group_advantages
from t2i_reward.rewarders.invariance import fixed_passes, mixed_requests, pad_rows, tiny_experts

from .conftest import running_server

EVERY_MODEL = tiny_experts()  # every expert that runs a model, in its tiny form (ocr: the wheel's real weights)
# prompts of different token lengths (PickScore and HPSv3 pad to the longest of a batch without the mode)
PROMPTS = ['a sign that says "open"', "a red apple", 'a poster reading "hello world" in blue letters on a wall',
           "two dogs playing in the snow under a grey winter sky, photographed from far away"]


def requests(n: int, seed: int, sizes=(2, 3)) -> list[tuple]:
    """n requests (prompts, uint8 (B, H, W, 3), metadata) of 2-3 pairs, image sizes varying between requests."""
    return mixed_requests(n, seed, sizes, [(64, 64), (80, 64), (64, 96)], PROMPTS)


def values(result) -> dict[str, torch.Tensor]:
    """Every number of a request's answer that belongs to a pair: components, extras, totals."""
    out = {f"c:{n}": torch.tensor([im.components[n] for im in result.images]) for n in result.images[0].components}
    for k in result.images[0].extras or {}:
        out[f"x:{k}"] = torch.tensor([im.extras[k] for im in result.images])
    out["total"] = torch.tensor([im.total for im in result.images])
    return out


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {differ} differ: {[(a[k] - b[k]).abs().max().item() for k in differ]}"


@pytest.fixture(scope="module")
def invariant(cache_dir):
    return create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", calibration=None, max_batch_size=4,
                           batch_invariant=True, experts=EVERY_MODEL)


@pytest.mark.parametrize("path", ["pil", "tensor"])
def test_every_expert_bit_identical_alone_and_pooled(invariant, path):
    r = invariant

    def check(reqs):
        if path == "tensor":
            return [r.check_tensor_request(p, t, metadata=m) for p, t, m in reqs]
        return [r.check_request(p, [Image.fromarray(a.numpy()) for a in t], metadata=m) for p, t, m in reqs]

    mine, strangers = requests(3, 1, sizes=(2,)), requests(2, 2, sizes=(2, 3))  # max_batch_size 4: pairs straddle passes
    alone = [values(r.score_checked(check([q]))[0]) for q in mine]
    assert set(alone[0]) >= {f"c:{n}" for n in EVERY_MODEL} | {"x:hpsv3.sigma", "x:geneval.flow_grpo_score"}
    rng = random.Random(7)
    for trial in range(2):  # random compositions and orders: each of mine among strangers, across pass boundaries
        pool = [("mine", i) for i in range(len(mine))] + [("stranger", j) for j in rng.sample(range(2), rng.randint(1, 2))]
        rng.shuffle(pool)
        results = r.score_checked(check([mine[i] if k == "mine" else strangers[i] for k, i in pool]))
        for (kind, i), res in zip(pool, results):
            if kind == "mine":
                assert_bit_equal(alone[i], values(res), f"{path} path, trial {trial}, request {i}")


def test_the_padding_never_reaches_an_answer(invariant):
    """A request of 5 pairs at max_batch_size 4: two passes, the second padded with 3 copies of pair 4; the
    answer has 5 pairs, and pair 4 scores as it does alone in a pass padded differently."""
    (p, t, m), = requests(1, 3, sizes=(5,))
    whole = invariant.score_checked([invariant.check_tensor_request(p, t, metadata=m)])[0]
    assert len(whole.images) == 5
    tail = invariant.score_checked([invariant.check_tensor_request(p[3:], t[3:], metadata=m[3:])])[0]
    per_pair = lambda v: {k: x for k, x in v.items() if k not in ("c:diversity", "total")}  # noqa: E731  (those read the request)
    assert_bit_equal({k: v[3:] for k, v in per_pair(values(whole)).items()}, per_pair(values(tail)), "pairs 4-5")


def test_fixed_passes_pad_and_drop():
    x = torch.arange(10.0).view(5, 2)
    assert pad_rows(x[:2], 4).tolist() == [[0, 1], [2, 3], [2, 3], [2, 3]]
    seen = []
    out = fixed_passes(lambda b: (seen.append(b.shape[0]), b * 2)[1], x, 3)
    assert seen == [3, 3] and torch.equal(out, x * 2)
    y = torch.ones(1, 2, requires_grad=True)
    pad_rows(y, 3).sum().backward()
    assert y.grad.tolist() == [[1.0, 1.0]]  # the padding's copies send no gradient


def test_differentiable_path_bit_identical(cache_dir):
    """`reward_and_gradient_many` pooling requests and `forward` alone: rewards, components and gradients."""
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", calibration=None, max_batch_size=4,
                        batch_invariant=True, experts={"clip_score": {"clip": "tiny"}, "pickscore": {"checkpoint": "tiny"}})
    g = torch.Generator().manual_seed(0)
    reqs = [(torch.rand(n, 3, 64, 64, generator=g), [PROMPTS[(i + j) % 4] for j in range(n)], None) for i, n in enumerate((2, 3, 1))]
    alone = [r.reward_and_gradient_many([q])[0] for q in reqs]
    for order in ([2, 0, 1], [1, 2, 0]):
        pooled = r.reward_and_gradient_many([reqs[i] for i in order])
        for i, got in zip(order, pooled):
            assert got.keys() == alone[i].keys()
            for k in got:
                assert torch.equal(got[k], alone[i][k]), (order, i, k)
    x, prompts, _ = reqs[1]
    scores = r(x, prompts)
    assert torch.equal(scores.total.detach(), alone[1]["rewards"])


def test_advantages_bit_identical_in_any_composition():
    """GRPO advantages from the same scores: the group's order and the other groups change no bit."""
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(12, generator=g) * 1e3 + 1e4).float()  # large values: float sums would round by order
    ids = [i // 4 for i in range(12)]
    ref = group_advantages(scores, {"e": scores * 0.5}, ids)
    rng = random.Random(0)
    for _ in range(5):
        perm = list(range(12))
        rng.shuffle(perm)
        got = group_advantages(scores[perm], {"e": scores[perm] * 0.5}, [ids[p] for p in perm])
        for k in ref:
            assert torch.equal(got[k], ref[k][perm])
    alone = group_advantages(scores[4:8], {"e": scores[4:8] * 0.5}, ids[4:8])  # one group by itself
    assert torch.equal(alone["total"], ref["total"][4:8])


def test_service_concurrent_clients_bit_identical(cache_dir, tmp_path, monkeypatch):
    """The running service (uvicorn) with T2I_SERVICE_BATCH_INVARIANT=true: requests sent one at a time, then
    all at once from threads (micro-batched with each other): the same bits on the raw-tensor and PIL paths."""
    from t2i_reward.rewarders.client import RewardClient
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    config = tmp_path / "reward.yaml"
    config.write_text("profile: tiny\ncalibration: null\nexperts:\n  imagereward: {}\n  aesthetic: {}\n  mlp: {}\n"
                      "  pickscore: {checkpoint: tiny}\n  clip_score: {clip: tiny}\n")
    monkeypatch.setenv("T2I_SERVICE_BATCH_INVARIANT", "true")
    settings = Settings(reward_config=config, max_batch_images=8, max_wait_ms=300, max_images=8,
                        redis_url=os.environ.get("T2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    assert settings.rewarder_config(**settings.rewarder_overrides()).batch_invariant is True
    assert "batch_invariant" not in Settings(reward_config=config, batch_invariant=None).rewarder_overrides()  # the config decides
    reqs = requests(6, 4)
    with running_server(create_app(settings)) as url, RewardClient(url) as client:
        assert client.models()  # loaded
        alone = [(client.score_batch(p, t), client.reward(p, [Image.fromarray(a.numpy()) for a in t])) for p, t, _ in reqs]
        got: dict[int, tuple] = {}
        start = threading.Barrier(len(reqs))

        def send(i):
            p, t, _ = reqs[i]
            with RewardClient(url) as c:
                start.wait()
                got[i] = (c.score_batch(p, t), c.reward(p, [Image.fromarray(a.numpy()) for a in t]))

        threads = [threading.Thread(target=send, args=(i,)) for i in random.Random(3).sample(range(len(reqs)), len(reqs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        metrics = httpx.get(f"{url}/metrics").text
    assert len(got) == len(reqs)
    for i, ((tensor_alone, json_alone), (tensor_got, json_got)) in enumerate(zip(alone, [got[i] for i in range(len(reqs))])):
        assert torch.equal(tensor_got.rewards, tensor_alone.rewards), i
        for name in tensor_alone.components:
            assert torch.equal(tensor_got.components[name], tensor_alone.components[name]), (i, name)
        assert [im["components"] for im in json_got["images"]] == [im["components"] for im in json_alone["images"]], i
        assert [im["total"] for im in json_got["images"]] == [im["total"] for im in json_alone["images"]], i
    # the concurrent requests were really micro-batched together: some batch held more than one request
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("t2i_batch_requests_count")))
    ones = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith('t2i_batch_requests_bucket{le="1.0"}')))
    assert ones < count

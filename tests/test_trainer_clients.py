"""Clients that trainers drop in: `RewardClient.score_batch` (raw tensors), `AsyncRewardClient`, and the
reward functions of `t2i_reward.rewarders.reward_fns` in ddpo-pytorch's, Flow-GRPO's and DanceGRPO's conventions,
against real uvicorn servers and in-process; every number is compared with the library's tensor path
(`check_tensor_request` + `score_checked`) on the same pixels."""

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from t2i_reward.rewarders.client import (
    AsyncRewardClient,
    BatchScores,
    RewardClient,
    RewardServiceError,
    batch_scores_from_result,
)
from t2i_reward.rewarders.reward_fns import dance_grpo_reward_fn, ddpo_reward_fn, flow_grpo_reward_fn, score_in_process
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

from .conftest import free_port, running_server, smooth_image

PROMPTS = ["a red apple", "a blue car", "a green forest", "a city at night", "a cat on a sofa"]
MAX_IMAGES = 6


@pytest.fixture(scope="module")
def url(tiny):
    with running_server(create_app(Settings(max_images=MAX_IMAGES), rewarder=tiny)) as u:
        yield u


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def u8_batch(n: int, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(smooth_image(seed + i, h, w)) for i in range(n)]))


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def reference(tiny, prompts, images, group_ids=None, explain=False) -> BatchScores:
    """The library on the same pixels, through the tensor path."""
    return batch_scores_from_result(tiny.score_checked([tiny.check_tensor_request(prompts, images, group_ids=group_ids,
                                                                                  explain=explain)])[0])


def assert_same(got: BatchScores, ref: BatchScores, atol=1e-5):
    assert torch.allclose(got.rewards, ref.rewards, atol=atol), (got.rewards, ref.rewards)
    assert set(got.components) == set(ref.components)
    for n in ref.components:
        assert torch.allclose(got.components[n], ref.components[n], atol=atol), n
    assert (got.advantages is None) == (ref.advantages is None)
    if ref.advantages is not None:
        assert set(got.advantages) == set(ref.advantages)
        for k in ref.advantages:
            assert torch.allclose(got.advantages[k], ref.advantages[k], atol=1e-4), k
    assert (got.percentiles is None) == (ref.percentiles is None)
    if ref.percentiles is not None:
        for n in ref.percentiles:
            assert torch.allclose(got.percentiles[n], ref.percentiles[n], atol=1e-4, equal_nan=True), n
    assert got.mean_reward == pytest.approx(float(ref.rewards.mean()), abs=atol)


def test_score_batch_takes_every_layout_and_equals_the_library(url, tiny):
    u8 = u8_batch(4)
    prompts, groups = prompts_for(4), ["a", "a", "b", "b"]
    ref = reference(tiny, prompts, u8, group_ids=groups, explain=True)
    f32 = (u8.permute(0, 3, 1, 2).float() / 255).contiguous()
    pil = [smooth_image(i, 48, 64) for i in range(4)]
    with RewardClient(url) as client:
        got = client.score_batch(prompts, u8.numpy(), group_ids=groups, explain=True)
        assert_same(got, ref)
        assert got.rewards.dtype == torch.float32 and got.rewards.shape == (4,)
        assert set(got.advantages) == {"total", *tiny.experts} and set(got.percentiles) == set(tiny.experts)
        assert got.experts == tiny.sources()
        # uint8 layouts are resized in 8 bits on a CPU host, float ones in float: each against its own kind
        ref_f = reference(tiny, prompts, f32)
        for images, expected, atol in ((u8, ref, 1e-5), (pil, ref, 1e-5), ([np.asarray(im) for im in pil], ref, 1e-5),
                                       (f32, ref_f, 1e-5), (f32.numpy(), ref_f, 1e-5), (f32.half(), ref_f, 1e-3)):
            plain = client.score_batch(prompts, images)
            assert plain.advantages is None and plain.percentiles is None
            assert torch.allclose(plain.rewards, expected.rewards, atol=atol), (plain.rewards, expected.rewards)
        one_prompt = client.score_batch("a red apple", u8, weights={"mlp": 0.0})
        assert_same(one_prompt, batch_scores_from_result(tiny.score_checked([tiny.check_tensor_request(
            "a red apple", u8, {"mlp": 0.0})])[0]))


def test_bad_inputs(url):
    with RewardClient(url, backoff_s=0.01) as client:
        with pytest.raises(ValueError, match="different sizes .*64x48, 40x40"):
            client.score_batch("x", [smooth_image(0, 48, 64), smooth_image(1, 40, 40)])
        with pytest.raises(ValueError, match="3 prompts for 2 images"):
            client.score_batch(["a", "b", "c"], u8_batch(2))
        with pytest.raises(ValueError, match="1 group_ids for 2 images"):
            client.score_batch("a", u8_batch(2), group_ids=[0])
        with pytest.raises(ValueError, match="no images"):
            client.score_batch("a", [])
        with pytest.raises(RewardServiceError) as e:  # more than the server takes in one call
            client.score_batch("a", u8_batch(MAX_IMAGES + 1))
        assert e.value.status == 422 and f"the limit is {MAX_IMAGES} per call" in str(e.value.detail)
        with pytest.raises(RewardServiceError) as e:  # the server checks the values
            client.score_batch("a", torch.full((1, 3, 16, 16), 2.0))
        assert e.value.status == 422 and "[0, 1]" in e.value.detail


def test_chunks_keep_groups_whole(url, tiny):
    n = 10
    u8, prompts = u8_batch(n, seed=10), prompts_for(n)
    groups = [0, 1, 2, 0, 1, 2, 3, 3, 0, 1]  # interleaved: sizes 3, 3, 2, 2
    ref = reference(tiny, prompts, u8, group_ids=groups)  # the whole batch in one library call
    with RewardClient(url) as client:
        got = client.score_batch(prompts, u8, group_ids=groups, chunk_size=MAX_IMAGES)
        assert_same(got, ref)
        plain = client.score_batch(prompts, u8, chunk_size=4)  # 4 + 4 + 2, in order
        assert_same(plain, reference(tiny, prompts, u8))
        with pytest.raises(ValueError, match="group 0 has 3 images, more than chunk_size=2"):
            client.score_batch(prompts, u8, group_ids=groups, chunk_size=2)
    assert_same(score_in_process(tiny, prompts, u8, group_ids=groups, chunk_size=MAX_IMAGES), ref)


def test_failover_over_a_dead_replica(url, tiny):
    u8, prompts = u8_batch(3), prompts_for(3)
    ref = reference(tiny, prompts, u8)
    with RewardClient([dead_url(), url, dead_url()], backoff_s=0.01) as client:
        for _ in range(3):  # whichever replica a call starts on, it ends on the live one
            assert_same(client.score_batch(prompts, u8), ref)
    with RewardClient([dead_url(), dead_url()], retries=1, backoff_s=0.01) as client:
        with pytest.raises(RewardServiceError) as e:
            client.score_batch(prompts, u8)
        assert e.value.status == 0 and "gave up after 2 attempts" in str(e.value)


def test_async_client(url, tiny):
    u8, prompts = u8_batch(8, seed=20), prompts_for(8)
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    ref = reference(tiny, prompts, u8, group_ids=groups)
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))

    async def main():
        async with AsyncRewardClient([url, dead_url()], backoff_s=0.01) as client:
            with pytest.raises(httpx.ConnectError):  # as RewardClient.ready: a replica that is down raises
                await client.ready()
            async with AsyncRewardClient(url) as live:
                await live.wait_ready(timeout=10)
                assert await live.ready()
            chunked = await client.score_batch(prompts, u8, group_ids=groups, chunk_size=4)
            several = await asyncio.gather(*(client.score_batch(prompts[:2], u8[:2]) for _ in range(3)))
            answer = await client.reward("a red apple", [smooth_image(1, 48, 48)])
            rewards, grad = await client.reward_gradient(x, ["a cat", "a dog"])
        async with AsyncRewardClient([dead_url()], retries=1, backoff_s=0.01) as gone:
            with pytest.raises(RewardServiceError, match="gave up after 2 attempts"):
                await gone.score_batch(prompts, u8)
        return chunked, several, answer, rewards, grad

    chunked, several, answer, rewards, grad = asyncio.run(main())
    assert_same(chunked, ref)
    two = reference(tiny, prompts[:2], u8[:2])
    for s in several:
        assert_same(s, two)
    assert answer["mean_reward"] == pytest.approx(tiny.score("a red apple", [smooth_image(1, 48, 48)]).mean_reward, abs=1e-5)
    expected = tiny.reward_and_gradient(x, ["a cat", "a dog"])
    assert torch.allclose(rewards, expected["rewards"], atol=1e-5)
    assert torch.allclose(grad, expected["grad"], atol=1e-6, rtol=1e-4)


def test_a_full_queue_is_retried_after_retry_after(tiny):
    """A real 429 (the queue is full while the model is held): the client waits the server's Retry-After
    (1 s) rather than its own 10 ms back-off, and the retry succeeds once the queue has drained."""
    app = create_app(Settings(max_queue_images=2), rewarder=tiny)
    with running_server(app) as url:
        batcher, metrics = app.state.service.batcher, app.state.service.metrics
        gate = threading.Event()
        batcher.executor.submit(gate.wait, 60)  # keep the model thread busy

        def until(condition, timeout=30):
            end = time.time() + timeout
            while not condition():
                assert time.time() < end, "the batcher never reached the expected state"
                time.sleep(0.005)

        u8, prompts = u8_batch(2), prompts_for(2)
        others, out = [], {}

        def fill(n):
            with RewardClient(url) as c:
                others.append(c.score_batch("a cat", u8[:n]).rewards)

        def ours():
            with RewardClient(url, retries=1, backoff_s=0.01) as c:
                try:
                    out["scores"] = c.score_batch(prompts, u8)
                except Exception as e:  # reported by the assertion below
                    out["error"] = e
            out["done"] = time.monotonic()

        try:
            first = threading.Thread(target=fill, args=(1,))
            first.start()
            until(lambda: metrics.batch_images._sum.get() >= 1)  # taken into a batch, blocked behind the gate
            second = threading.Thread(target=fill, args=(2,))
            second.start()
            until(lambda: batcher.waiting_images == 2)  # waits in the queue: the queue is full
            t = threading.Thread(target=ours)
            t.start()
            until(lambda: metrics.rejected._value.get() >= 1)
            refused = time.monotonic()
            time.sleep(0.2)
        finally:
            gate.set()
        t.join(30)
        for th in (first, second):
            th.join(30)
    assert "error" not in out, out.get("error")
    assert out["done"] - refused >= 0.9  # waited for Retry-After: 1
    assert metrics.rejected._value.get() == 1  # one refusal, then one successful retry
    assert_same(out["scores"], reference(tiny, prompts, u8))
    assert len(others) == 2


@pytest.mark.parametrize("where", ["remote", "in-process"])
def test_reward_fns_in_each_trainers_convention(url, tiny, where):
    target = url if where == "remote" else tiny
    u8, prompts = u8_batch(4, seed=30), tuple(prompts_for(4))  # ddpo-pytorch's prompts are a tuple
    ref = reference(tiny, list(prompts), u8)
    f32 = (u8.permute(0, 3, 1, 2).float() / 255).contiguous()  # what the pipelines give (output_type="pt")
    noisy = (f32 + torch.rand(f32.shape, generator=torch.Generator().manual_seed(1)) / 600).clamp(0, 1)

    # ddpo-pytorch: (numpy scores, info) from the pipeline's float tensor, rounded to uint8 as ddpo does
    ddpo = ddpo_reward_fn(target)
    scores, info = ddpo(noisy, prompts, ({},) * 4)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (4,)
    assert np.allclose(scores, ref.rewards.numpy(), atol=1e-5)  # noisy rounds back to the same uint8 pixels
    assert set(info) == set(tiny.experts) and np.allclose(info["mlp"], ref.components["mlp"].numpy(), atol=1e-5)
    scores_np, _ = ddpo(u8.numpy(), prompts, ({},) * 4)  # the uint8 NHWC array branch
    assert np.allclose(scores_np, ref.rewards.numpy(), atol=1e-5)
    exact, _ = ddpo_reward_fn(target, quantize=False)(noisy, prompts, ({},) * 4)
    assert np.allclose(exact, reference(tiny, list(prompts), noisy).rewards.numpy(), atol=1e-5)

    # Flow-GRPO multi_score: ({"avg": ..., <expert>: ...}, {})
    flow = flow_grpo_reward_fn(target, weights={"aesthetic": 2.0})
    details, meta = flow(noisy, list(prompts), [{}] * 4, only_strict=True)
    weighted = batch_scores_from_result(tiny.score_checked([tiny.check_tensor_request(list(prompts), u8, {"aesthetic": 2.0})])[0])
    assert meta == {} and set(details) == {"avg", *tiny.experts}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (4,) for v in details.values())
    assert np.allclose(details["avg"], weighted.rewards.numpy(), atol=1e-5)
    assert np.allclose(torch.as_tensor(details["aesthetic"]).numpy(), ref.components["aesthetic"].numpy(), atol=1e-5)

    # DanceGRPO: a float32 tensor on the images' device, from the postprocessed PIL images or a tensor
    dance = dance_grpo_reward_fn(target, device="cpu")
    pil = [smooth_image(30 + i, 48, 64) for i in range(4)]
    rewards = dance(pil, list(prompts))
    assert isinstance(rewards, torch.Tensor) and rewards.dtype == torch.float32 and rewards.device.type == "cpu"
    assert torch.allclose(rewards, ref.rewards, atol=1e-5)
    assert torch.allclose(dance(f32, list(prompts)), ref.rewards, atol=1e-5)
    one = dance(pil[0], prompts[0])  # DanceGRPO scores one decoded image at a time
    assert one.shape == (1,) and one.item() == pytest.approx(reference(tiny, prompts[0], u8[:1]).rewards.item(), abs=1e-5)
    if where == "remote":
        assert ddpo.client is not None and ddpo.client.urls == [url]
    else:
        assert ddpo.rewarder is tiny


def test_clients_do_not_import_fastapi():
    code = "import t2i_reward.rewarders.client, t2i_reward.rewarders.reward_fns, sys; assert 'fastapi' not in sys.modules; " \
           "assert not [m for m in sys.modules if m.startswith('t2i_reward.service')]"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

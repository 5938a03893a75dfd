"""RewardClient over several replicas: calls spread over them, a replica that is down or busy is skipped
with bounded retries, and a service that comes back is used again. Real uvicorn servers only."""

import threading
import time

import pytest
import torch
import uvicorn
from t2i_reward.finetune.rewards import RemoteReward
from t2i_reward.rewarders.client import RewardClient, RewardServiceError
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

from .conftest import free_port, running_server, smooth_image


def test_calls_spread_over_replicas_and_skip_a_dead_one(tiny):
    app_a, app_b = create_app(Settings(), rewarder=tiny), create_app(Settings(), rewarder=tiny)
    with running_server(app_a) as a, running_server(app_b) as b:
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        with RewardClient(f"{a},{dead},{b}", backoff_s=0.05) as client:
            assert client.urls == [a, dead, b]
            expected = tiny.score("a red cube", [smooth_image(1, 48, 48)]).mean_reward
            for _ in range(6):
                assert client.reward("a red cube", [smooth_image(1, 48, 48)])["mean_reward"] == pytest.approx(expected, abs=1e-5)
        served = [sum(s.value for s in metric.collect()[0].samples if s.labels.get("endpoint") == "/reward"
                      and s.name.endswith("_total")) for metric in (app_a.state.service.metrics.requests, app_b.state.service.metrics.requests)]
        assert served[0] >= 2 and served[1] >= 2  # both replicas took calls


def test_all_replicas_down_gives_up_with_a_clear_error():
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with RewardClient(urls, retries=3, backoff_s=0.05) as client:
        t = time.monotonic()
        with pytest.raises(RewardServiceError) as e:
            client.reward("p", [smooth_image(0, 32, 32)])
        assert e.value.status == 0 and "gave up after 4 attempts" in str(e.value) and "unreachable" in str(e.value)
        assert time.monotonic() - t < 10


def test_a_busy_replica_answer_is_reported_after_the_retries():
    # a service whose models failed to load answers 503 on every work endpoint
    app = create_app(Settings(profile="no-such-profile"))
    with running_server_unready(app) as url, RewardClient(url, retries=1, backoff_s=0.05) as client:
        with pytest.raises(RewardServiceError) as e:
            client.reward("p", [smooth_image(0, 32, 32)])
        assert e.value.status == 503 and "gave up after 2 attempts" in str(e.value) and "models failed to load" in str(e.value)


def test_a_job_submission_to_an_unreachable_queue_fails_clearly(tiny):
    with running_server(create_app(Settings(redis_url="redis://127.0.0.1:1/0"), rewarder=tiny)) as url:
        with RewardClient(url, retries=3, backoff_s=0.05) as client:
            with pytest.raises(RewardServiceError) as e:  # Redis is unreachable: 503, after the retries
                client.submit_job({"prompts": ["a cat"], "base_model": "tiny", "steps": 1})
            assert e.value.status == 503 and "Redis" in str(e.value)


def test_a_worker_rides_out_a_reward_service_restart(tiny):
    """The reward service is down when the worker calls, and back two seconds later: the call succeeds."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Settings(), rewarder=tiny), host="127.0.0.1", port=port, log_level="warning"))
    starter = threading.Timer(2.0, server.run)
    starter.start()
    try:
        reward = RemoteReward(f"http://127.0.0.1:{port}")
        images = torch.rand(2, 3, 32, 32)
        total, components = reward(images, ["a red cube", "a blue ball"])
        expected = tiny.forward(images, ["a red cube", "a blue ball"]).total
        assert torch.allclose(total.detach(), expected.detach(), atol=1e-4)
        assert set(components) == set(tiny.experts)
    finally:
        server.should_exit = True
        starter.join(30)


class running_server_unready:
    """uvicorn on a free port without waiting for /readyz (the app never becomes ready)."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="critical"))

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.server.config.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

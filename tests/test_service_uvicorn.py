"""The service as users run it: `t2i-reward serve` in its own process, over loopback."""

import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from t2i_reward.service.client import RewardClient, RewardServiceError, Validator

from .conftest import smooth_image

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(cache_dir, tmp_path_factory):
    exe = Path(sys.executable).parent / "t2i-reward"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    port = free_port()
    env = {**os.environ, "T2I_REWARD_CACHE_DIR": str(cache_dir), "T2I_SERVICE_API_KEYS": f'["{KEY}"]',
           "T2I_SERVICE_MAX_WAIT_MS": "30", "T2I_SERVICE_MAX_BATCH_IMAGES": "64"}
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "w")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([str(exe), "serve", "--profile", "tiny", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 120
        while time.time() < end:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("server never became ready:\n" + log_path.read_text()[-3000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_concurrent_clients_get_their_own_results(server, tiny):
    prompts = [f"a {c} {o}" for c in ("red", "blue", "green", "yellow") for o in ("apple", "car", "house", "bird")]
    jobs = [(p, [smooth_image(i, 96 + 8 * i, 128), smooth_image(100 + i, 120, 90)]) for i, p in enumerate(prompts)]
    client = RewardClient(server, api_key=KEY)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: client.reward(*job), jobs))
    for (prompt, images), answer in zip(jobs, answers):
        local = tiny.score(prompt, images)
        assert [i["total"] for i in answer["images"]] == pytest.approx([s.total for s in local.images], abs=1e-4)
    metrics = httpx.get(f"{server}/metrics").text
    count = float(re.search(r"^t2i_batch_requests_count (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^t2i_batch_requests_sum (\S+)", metrics, re.M).group(1))
    assert total == 16 and count < 16  # some forward passes served several requests at once


def test_auth_over_http(server):
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert httpx.get(f"{server}/models").status_code == 401
    assert httpx.get(f"{server}/models", headers={"X-API-Key": "wrong"}).status_code == 403
    with pytest.raises(RewardServiceError) as e:
        RewardClient(server).reward("a cat", [smooth_image(0, 32, 32)])
    assert e.value.status == 401


def test_validator_remote_and_local_agree(server, cache_dir):
    from t2i_reward.rewarders import load_config

    images = [smooth_image(i, 80, 80) for i in range(3)]
    remote = Validator(base_url=server, api_key=KEY).get_reward_score(images, "a castle at night")
    local = Validator(config=load_config(profile="tiny", cache_dir=cache_dir)).get_reward_score(images, "a castle at night")
    assert remote[0] == pytest.approx(local[0], abs=1e-4)
    assert remote[1] == pytest.approx(local[1], abs=1e-4)
    # the served default corpus and the local one are the same index
    topics = ["a landscape with mountains", "an anime character"]
    remote_prompts = Validator(base_url=server, api_key=KEY).generate_prompt(topics, n_prompts=2)
    local_prompts = Validator(config=load_config(profile="tiny", cache_dir=cache_dir)).generate_prompt(topics, n_prompts=2)
    assert remote_prompts == local_prompts
    assert len(remote_prompts) == 2 and all(len(p) == 2 for p in remote_prompts)

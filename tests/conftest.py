import contextlib
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail fast with our error, never download


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One model cache for the whole run: the tiny models are built once, on first use. Code that
    reads the cache location from the environment (a served app, the CLI) uses it too."""
    path = tmp_path_factory.mktemp("t2i-cache")
    os.environ["T2I_REWARD_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny(cache_dir):
    from t2i_reward.rewarders import create_rewarder

    return create_rewarder(profile="tiny", cache_dir=cache_dir)


def smooth_image(seed: int, h: int, w: int) -> Image.Image:
    """A smooth random RGB image: resizing matters, but it is not pure noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture
def images():
    return [smooth_image(i, 200 + 37 * i, 260 - 20 * i) for i in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 60):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL once /readyz is 200."""
    import uvicorn
    from t2i_reward.rewarders.client import RewardClient

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        with RewardClient(url) as client:
            client.wait_ready(timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


# ---- the service in-process (FastAPI's TestClient)

LIMITS = dict(max_images=4, max_body_bytes=2_000_000, max_image_pixels=1_000_000, max_prompt_chars=300, max_wait_ms=2)


def wait_ready(client, timeout: float = 30) -> None:
    """Until a TestClient's app has loaded its models (/readyz)."""
    end = time.time() + timeout
    while time.time() < end:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("service never became ready")


def client_maker(rewarder, defaults: dict):
    """A fixture body: yields `make(**settings)`, a ready TestClient of the app serving `rewarder` with
    `defaults` and `settings`; closes every client made when the test ends. (The service is imported here,
    after HF_HUB_OFFLINE is set.)"""
    from fastapi.testclient import TestClient
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    clients = []

    def make(**settings):
        client = TestClient(create_app(Settings(**{**defaults, **settings}), rewarder=rewarder))
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def make_client(tiny):
    """`make(**settings)`: a TestClient of the app serving the session's tiny rewarder, with LIMITS."""
    yield from client_maker(tiny, LIMITS)

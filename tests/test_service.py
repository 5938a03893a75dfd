import base64
import io
import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from t2i_reward.service import app as app_module
from t2i_reward.service.app import create_app
from t2i_reward.service.client import RewardClient, RewardServiceError
from t2i_reward.service.settings import Settings

from .conftest import LIMITS, running_server, smooth_image, wait_ready
from .test_images import bomb_png, png_bytes


@pytest.fixture
def client(make_client):
    return make_client()


def b64(im) -> str:
    return base64.b64encode(png_bytes(im)).decode()


def test_reward_json_matches_the_library(client, tiny, images):
    r = client.post("/reward", json={"prompt": "a red apple", "images": [b64(im) for im in images[:3]]})
    assert r.status_code == 200, r.text
    body = r.json()
    local = tiny.score("a red apple", images[:3])
    assert body["mean_reward"] == pytest.approx(local.mean_reward, abs=1e-5)
    assert [i["total"] for i in body["images"]] == pytest.approx([s.total for s in local.images], abs=1e-5)
    assert body["component_rewards"] == pytest.approx(local.component_rewards, abs=1e-5)
    assert body["experts"]["imagereward"] == {"checkpoint": "tiny", "random_weights": True}


def test_reward_multipart_and_data_urls_agree(client, images):
    data_urls = [f"data:image/png;base64,{b64(im)}" for im in images[:2]]
    as_json = client.post("/reward", json={"prompt": "a cat", "images": data_urls, "weights": {"mlp": 0}}).json()
    files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images[:2])]
    as_form = client.post("/reward", data={"prompt": "a cat", "weights": '{"mlp": 0}'}, files=files)
    assert as_form.status_code == 200, as_form.text
    assert as_form.json()["mean_reward"] == pytest.approx(as_json["mean_reward"], abs=1e-6)
    for img in as_json["images"]:
        assert img["total"] == pytest.approx(img["components"]["imagereward"] + img["components"]["aesthetic"], abs=1e-5)


def _truncated_png():
    data = png_bytes(smooth_image(1, 300, 300))
    return base64.b64encode(data[: len(data) // 2]).decode()


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 422, "json"),
        (dict(json={"prompt": 5, "images": ["x"]}), 422, "string"),
        (dict(json={"images": ["x"]}), 422, "prompt"),
        (dict(json={"prompt": "a cat", "images": []}), 422, "no images"),
        (dict(json={"prompt": "a cat", "images": "abc"}), 422, "list"),
        (dict(json={"prompt": "a cat", "images": ["@@not base64@@"]}), 400, "base64"),
        (dict(json={"prompt": "a cat", "images": [base64.b64encode(b"hello, world").decode()]}), 400, "not a recognised image"),
        (dict(json={"prompt": "a cat", "images": [_truncated_png()]}), 400, "truncated"),
        (dict(json={"prompt": "a cat", "images": [base64.b64encode(bomb_png(50_000, 50_000)).decode()]}), 413, "pixels"),
        (dict(json={"prompt": "a cat", "images": ["data:image/png,abc"]}), 400, "base64"),
        (dict(json={"prompt": "", "images": ["eA=="]}), 422, "empty"),
        (dict(json={"prompt": "x" * 301, "images": ["eA=="]}), 422, "limit is 300"),
        (dict(content=b"prompt=a", headers={"content-type": "text/plain"}), 415, "content type"),
        (dict(content=b"x" * 2_100_000, headers={"content-type": "application/json"}), 413, "over the limit"),
        (dict(data={"prompt": "a cat"}, files=[("other", ("a.png", b"x", "image/png"))]), 422, "no images"),
        (dict(data={"images": "x"}, files=[("images", ("a.png", b"x", "image/png"))]), 422, "prompt"),
    ],
)
def test_bad_requests_get_clear_4xx(client, kwargs, status, fragment):
    r = client.post("/reward", **kwargs)
    assert r.status_code == status, r.text
    assert fragment.lower() in json.dumps(r.json()["detail"]).lower()
    assert client.get("/readyz").status_code == 200  # the server stays healthy


def test_too_many_images_and_unknown_weights(client, images):
    r = client.post("/reward", json={"prompt": "a cat", "images": [b64(images[0])] * 5})
    assert r.status_code == 422 and "limit is 4" in r.json()["detail"]
    r = client.post("/reward", json={"prompt": "a cat", "images": [b64(images[0])], "weights": {"clipscore": 1}})
    assert r.status_code == 422 and "unknown expert 'clipscore'" in r.json()["detail"]


def test_health_models_metrics(client, images):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "mllm": {"state": "not configured"}}  # the peer apart
    models = client.get("/models").json()
    assert models["random_weights"] is True and set(models["experts"]) == {"imagereward", "aesthetic", "mlp"}
    assert models["experts"]["aesthetic"]["dtype"] == "float32" and models["experts"]["aesthetic"]["weight"] == 1.0
    client.post("/reward", json={"prompt": "a cat", "images": [b64(images[0])]})
    client.post("/reward", json={"prompt": "a cat", "images": []})
    text = client.get("/metrics").text
    assert 't2i_requests_total{endpoint="/reward",status="200"} 1.0' in text
    assert 't2i_requests_total{endpoint="/reward",status="422"} 1.0' in text
    assert 't2i_request_seconds_count{endpoint="/reward"} 2.0' in text
    assert 't2i_expert_seconds_count{expert="imagereward"} 1.0' in text
    assert 't2i_expert_seconds_count{expert="clip:tiny"} 1.0' in text
    assert "t2i_batch_images_count 1.0" in text and "t2i_queue_images 0.0" in text


def test_openapi_documents_every_body_type(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/reward"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data", "application/octet-stream"}
    assert "examples" in json.dumps(content["application/json"])
    assert "/reward/gradient" in spec["paths"] and "/metrics" in spec["paths"]


def test_api_keys(make_client, images):
    client = make_client(api_keys=["s3cret", "other"])
    body = {"prompt": "a cat", "images": [b64(images[0])]}
    assert client.post("/reward", json=body).status_code == 401
    assert client.post("/reward", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.post("/reward", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/reward", json=body, headers={"X-API-Key": "other"}).status_code == 200
    assert client.get("/models").status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(open_path).status_code == 200


def test_503_until_ready_then_serves(tiny, monkeypatch, images):
    gate = threading.Event()

    def slow_load(settings):
        gate.wait(30)
        return tiny

    monkeypatch.setattr(app_module, "load_rewarder", slow_load)
    with TestClient(create_app(Settings(**LIMITS))) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        assert client.post("/reward", json={"prompt": "a", "images": [b64(images[0])]}).status_code == 503
        gate.set()
        wait_ready(client)
        assert client.post("/reward", json={"prompt": "a", "images": [b64(images[0])]}).status_code == 200


def test_failed_load_is_reported_by_readyz(cache_dir):
    settings = Settings(profile="default", **LIMITS)
    with TestClient(create_app(settings)) as client:
        end = time.time() + 30
        while time.time() < end and "failed" not in client.get("/readyz").json()["detail"]:
            time.sleep(0.05)
        r = client.get("/readyz")
        assert r.status_code == 503 and "THUDM/ImageReward" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_full_queue_answers_429(make_client, images):
    client = make_client(max_queue_images=1)
    batcher = client.app.state.service.batcher
    gate = threading.Event()
    batcher.executor.submit(gate.wait, 60)  # keep the model thread busy
    body = {"prompt": "a cat", "images": [b64(images[0])]}
    results = []

    def send():
        results.append(client.post("/reward", json=body).status_code)

    def until(condition, timeout=30):
        end = time.time() + timeout
        while not condition():
            assert time.time() < end, "the batcher never reached the expected state"
            time.sleep(0.01)

    batches = client.app.state.service.metrics.batch_images
    first, second = threading.Thread(target=send), threading.Thread(target=send)
    first.start()
    until(lambda: batches._sum.get() >= 1)  # the first request was taken into a batch (blocked behind the gate)
    second.start()
    until(lambda: batcher._waiting_images == 1)  # the second waits in the queue
    r = client.post("/reward", json=body)
    assert r.status_code == 429 and "retry later" in r.json()["detail"]
    gate.set()
    for t in (first, second):
        t.join(60)
    assert results == [200, 200]
    assert "t2i_rejected_total 1.0" in client.get("/metrics").text


def test_gradient_endpoint_matches_in_process_autograd(tiny):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 240, 200)
    prompts = ["a red apple", "a blue car"]
    with running_server(create_app(Settings(**LIMITS), rewarder=tiny)) as url:
        api = RewardClient(url)
        rewards, grad = api.reward_gradient(x, prompts, weights={"aesthetic": 2.0})
        # half precision in, float32 gradient computed, returned in the caller's dtype
        r16, g16 = api.reward_gradient(x.half(), "a red apple")
    ref = x.clone().requires_grad_(True)
    scores = tiny(ref, prompts, weights={"aesthetic": 2.0})
    scores.total.sum().backward()
    assert torch.allclose(rewards, scores.total.detach(), atol=1e-5)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert torch.allclose(grad, ref.grad, atol=1e-6, rtol=1e-4)
    assert g16.dtype == torch.float16 and r16.shape == (2,)


def test_gradient_endpoint_bad_input(client):
    ok = save_safetensors({"images": torch.rand(1, 3, 32, 32)}, metadata={"prompts": '["a cat"]'})
    octet = {"content-type": "application/octet-stream"}
    cases = [
        (dict(content=ok, headers={"content-type": "application/json"}), 415),
        (dict(content=b"garbage", headers=octet), 400),
        (dict(content=save_safetensors({"pixels": torch.rand(1, 3, 8, 8)}, metadata={"prompts": '"a"'}), headers=octet), 422),
        (dict(content=save_safetensors({"images": torch.rand(1, 3, 8, 8) * 2}, metadata={"prompts": '"a"'}), headers=octet), 422),
        (dict(content=save_safetensors({"images": torch.rand(2, 3, 8, 8)}, metadata={"prompts": '["a"]'}), headers=octet), 422),
        (dict(content=save_safetensors({"images": torch.rand(1, 3, 8, 8)}), headers=octet), 422),
        (dict(content=save_safetensors({"images": torch.rand(5, 3, 8, 8)}, metadata={"prompts": '"a"'}), headers=octet), 422),
        (dict(content=save_safetensors({"images": torch.zeros(1, 3, 8, 8, dtype=torch.int32)}, metadata={"prompts": '"a"'}), headers=octet), 422),
        (dict(content=save_safetensors({"images": torch.rand(1, 3, 8, 8)}, metadata={"prompts": json.dumps("x" * 301)}), headers=octet), 422),
    ]
    for kwargs, status in cases:
        r = client.post("/reward/gradient", **kwargs)
        assert r.status_code == status, (r.status_code, r.text)
        assert r.json()["detail"]
    too_long = save_safetensors({"images": torch.rand(1, 3, 8, 8)}, metadata={"prompts": json.dumps(["x" * 301])})
    assert "limit is 300" in client.post("/reward/gradient", content=too_long, headers=octet).json()["detail"]
    r = client.post("/reward/gradient", content=ok, headers=octet)
    assert r.status_code == 200
    out = load_safetensors(r.content)
    assert set(out) == {"rewards", "grad", "components.imagereward", "components.aesthetic", "components.mlp"}


def test_client_raises_with_status_and_detail(tiny, images):
    with running_server(create_app(Settings(**LIMITS), rewarder=tiny)) as url:
        check_client(RewardClient(url), images)


def check_client(api, images):
    with pytest.raises(RewardServiceError) as e:
        api.reward("", images[:1])
    assert e.value.status == 422 and "empty" in e.value.detail
    out = api.reward("a cat", [images[0], png_bytes(images[1]), io.BytesIO(png_bytes(images[2])).getvalue()])
    assert len(out["images"]) == 3


def test_wait_ready_times_out_on_a_closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(TimeoutError, match="not ready within"):
        RewardClient(f"http://127.0.0.1:{port}").wait_ready(timeout=0.5, interval=0.1)


def test_gradient_requests_go_through_admission_control(make_client, images):
    """/reward/gradient shares the queue with /reward: 429 when it is full, 504 after max_queue_wait_s."""
    client = make_client(max_queue_images=2, max_queue_wait_s=1.0)
    batcher = client.app.state.service.batcher
    gate = threading.Event()
    batcher.executor.submit(gate.wait, 60)  # keep the model thread busy
    octet = {"content-type": "application/octet-stream"}
    grad_body = save_safetensors({"images": torch.rand(2, 3, 16, 16)}, metadata={"prompts": '"a cat"'})
    results = {}

    def send(name, **kwargs):
        path = "/reward" if "json" in kwargs else "/reward/gradient"
        results[name] = client.post(path, **kwargs).status_code

    def until(condition, timeout=30):
        end = time.time() + timeout
        while not condition():
            assert time.time() < end, "the batcher never reached the expected state"
            time.sleep(0.01)

    try:
        running = threading.Thread(target=send, args=("running",), kwargs={"json": {"prompt": "a cat", "images": [b64(images[0])]}})
        running.start()
        until(lambda: client.app.state.service.metrics.batch_images._sum.get() >= 1)  # taken; the model thread is busy
        t = time.time()
        r = client.post("/reward/gradient", content=grad_body, headers=octet)
        assert r.status_code == 504 and "queue" in r.json()["detail"] and time.time() - t < 10
        assert batcher.waiting_images == 0  # a timed-out request leaves the queue and never runs
        waiting = threading.Thread(target=send, args=("waiting",), kwargs={"content": grad_body, "headers": octet})
        waiting.start()
        until(lambda: batcher.waiting_images == 2)
        full = client.post("/reward/gradient", content=grad_body, headers=octet)
        assert full.status_code == 429 and "retry later" in full.json()["detail"]
        assert client.post("/reward", json={"prompt": "a cat", "images": [b64(images[0])]}).status_code == 429
        waiting.join(30)
    finally:
        gate.set()
    running.join(60)
    assert results == {"running": 200, "waiting": 504}  # the request the model had taken still gets its answer
    r = client.post("/reward/gradient", content=grad_body, headers=octet)
    assert r.status_code == 200 and load_safetensors(r.content)["rewards"].shape == (2,)


def test_a_failing_request_does_not_fail_its_batch(make_client, images, monkeypatch):
    """Requests batched together keep their own fate: one that breaks the model call fails alone."""
    client = make_client(max_wait_ms=300)
    rewarder = client.app.state.service.batcher.rewarder
    real = rewarder.score_checked

    def flaky(requests, **kw):
        if any("poison" in c.prompts for c in requests):
            raise RuntimeError("the model broke on this input")
        return real(requests, **kw)

    monkeypatch.setattr(rewarder, "score_checked", flaky)
    results = {}

    def send(prompt):
        try:
            results[prompt] = client.post("/reward", json={"prompt": prompt, "images": [b64(images[0])]}).status_code
        except RuntimeError:  # the test client re-raises what the server answers 500 for
            results[prompt] = 500

    threads = [threading.Thread(target=send, args=(p,)) for p in ("a cat", "poison", "a dog")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {"a cat": 200, "poison": 500, "a dog": 200}
    batches = client.app.state.service.metrics.batch_requests
    assert batches._sum.get() == 3 and batches._buckets[0].get() < 3  # some of them shared a batch

"""The service's defences against hostile input on the reward path: bounded work per image, the API key
checked before the body, slow and concurrent uploads, the queue checked before the body, and inputs
that used to give 500s. Real uvicorn servers and raw sockets where the order of bytes on the wire matters."""

import base64
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

from .conftest import client_maker, running_server, smooth_image
from .test_images import png_bytes

KEY = "s3cret-key"


@pytest.fixture
def make_client(tiny):
    """The service's own defaults (not the other tests' smaller LIMITS): the limits are what is tested."""
    yield from client_maker(tiny, {})


def b64(im) -> str:
    return base64.b64encode(png_bytes(im)).decode()


def raw_request(url: str, head: str, body: bytes = b"", read_timeout: float = 15) -> tuple[int, str, float]:
    """Send `head` (request line and headers) and `body` on a fresh socket; return the status, the raw
    answer and the seconds until it came. A body shorter than its Content-Length stalls the upload."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        start = time.monotonic()
        s.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.find(b"\r\n\r\n") + 4 + _length(answer):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        text = answer.decode("latin-1")
        return int(text.split(" ", 2)[1]), text, time.monotonic() - start


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def post_head(path: str, length: int, ctype: str = "application/json", key: str | None = None) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Type: {ctype}", f"Content-Length: {length}"]
    if key:
        lines.append(f"X-API-Key: {key}")
    return "\r\n".join(lines) + "\r\n"


# ---- bounded work per image


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (3300, 100)])
def test_extreme_aspect_ratios_are_refused_before_decoding(make_client, size):
    client = make_client()
    t = time.perf_counter()
    r = client.post("/reward", json={"prompt": "a strip", "images": [b64(Image.new("RGB", size, "red"))]})
    assert r.status_code == 400, r.text
    assert "aspect ratio" in r.json()["detail"] and "32:1" in r.json()["detail"]
    assert time.perf_counter() - t < 5  # no gigapixel intermediate (a bound, not a benchmark)


def test_a_panorama_within_the_limit_scores(make_client, tiny):
    client = make_client()
    im = smooth_image(3, 64, 2000)  # 31:1
    r = client.post("/reward", json={"prompt": "a panorama", "images": [b64(im)]})
    assert r.status_code == 200, r.text
    assert r.json()["mean_reward"] == pytest.approx(tiny.score("a panorama", [im]).mean_reward, abs=1e-5)


def test_the_aspect_limit_is_a_setting(make_client):
    client = make_client(max_aspect_ratio=2)
    r = client.post("/reward", json={"prompt": "p", "images": [b64(Image.new("RGB", (300, 100)))]})
    assert r.status_code == 400 and "the limit is 2:1" in r.json()["detail"]


def test_gradient_with_a_two_million_pixel_strip_is_refused(make_client):
    client = make_client()
    body = save_safetensors({"images": torch.zeros(1, 3, 1, 2_000_000, dtype=torch.float16)}, metadata={"prompts": '"p"'})
    r = client.post("/reward/gradient", content=body, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400, r.text
    assert "aspect ratio" in r.json()["detail"]


# ---- inputs that used to be 500s


@pytest.mark.parametrize("weights,fragment", [
    ({"imagereward": 1e308}, "must be a finite number in"),
    ({"imagereward": -1e7}, "must be a finite number in"),
])
def test_weights_that_would_overflow_the_total_are_422(make_client, weights, fragment):
    client = make_client()
    r = client.post("/reward", json={"prompt": "p", "images": [b64(smooth_image(0, 32, 32))], "weights": weights})
    assert r.status_code == 422 and fragment in r.json()["detail"]


@pytest.mark.parametrize("prompt,fragment", [("a \ud800 cat", "surrogate"), ("a\x00cat", "NUL")])
def test_prompts_that_are_not_text_are_422(make_client, prompt, fragment):
    client = make_client()
    body = json.dumps({"prompt": prompt, "images": [b64(smooth_image(0, 32, 32))]})  # ASCII JSON keeps \ud800 escaped
    r = client.post("/reward", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert fragment in str(r.json()["detail"]) or "Invalid JSON" in str(r.json()["detail"])  # the JSON parser may refuse first


@pytest.mark.parametrize("prompt,fragment", [("a \ud800 cat", "surrogate"), ("a\x00cat", "NUL")])
def test_the_library_refuses_prompts_that_are_not_text(tiny, prompt, fragment):
    from t2i_reward.rewarders import InvalidPromptError

    with pytest.raises(InvalidPromptError, match=fragment):
        tiny.check_request(prompt, [smooth_image(0, 32, 32)])


def test_right_to_left_marks_are_text(make_client):
    client = make_client()
    r = client.post("/reward", json={"prompt": "\u200fقطة حمراء\u200e", "images": [b64(smooth_image(0, 32, 32))]})
    assert r.status_code == 200, r.text


def test_empty_weights_mean_no_override(make_client):
    client = make_client()
    r = client.post("/reward", json={"prompt": "p", "images": [b64(smooth_image(0, 32, 32))], "weights": {}})
    assert r.status_code == 200, r.text


# ---- the key before the body, and the body's own limits (real server, raw sockets)


@pytest.fixture
def server(tiny):
    servers = []

    def start(**settings):
        cm = running_server(create_app(Settings(**settings), rewarder=tiny))
        servers.append(cm)
        return cm.__enter__()

    yield start
    for cm in servers:
        cm.__exit__(None, None, None)


@pytest.mark.parametrize("path", ["/reward", "/reward/gradient", "/prompts", "/jobs"])
def test_the_key_is_checked_before_the_body_is_read(server, path):
    url = server(api_keys=[KEY])
    # 60 MB announced, nothing sent: the answer comes from the headers alone
    status, text, _ = raw_request(url, post_head(path, 60_000_000))
    assert status == 401 and "missing API key" in text
    status, text, _ = raw_request(url, post_head(path, 60_000_000, key="wrong"))
    assert status == 403
    # malformed JSON without a key: 401, not 422
    status, _, _ = raw_request(url, post_head(path, 5), b"{oops")
    assert status == 401


@pytest.mark.parametrize("path, ctype, start", [
    ("/reward", "application/json", b'{"prompt": "a'),
    ("/reward", "multipart/form-data; boundary=xyz", b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na'),
    ("/reward", "application/octet-stream", b"\x40\x00\x00\x00\x00\x00\x00\x00{"),
    ("/reward/gradient", "application/octet-stream", b"\x40\x00\x00\x00\x00\x00\x00\x00{"),
])
def test_a_stalled_upload_times_out_with_408(server, path, ctype, start):
    url = server(api_keys=[KEY], body_timeout_s=1.0)
    status, text, elapsed = raw_request(url, post_head(path, 1000, ctype, key=KEY), start)
    assert status == 408 and "did not arrive within 1 s" in text
    assert elapsed < 10
    # the deadline was the body's alone: a request that sends its body in time is served as before
    status, _, _ = raw_request(url, post_head("/reward", 5, key=KEY), b"{oops")
    assert status == 422


def test_concurrent_uploads_are_bounded(server):
    url = server(max_concurrent_uploads=2, body_timeout_s=5.0)
    host, port = url.removeprefix("http://").split(":")
    stalled = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        for s in stalled:  # two uploads in progress, each waiting for the rest of its body
            s.sendall(post_head("/reward", 1000).encode() + b"\r\n" + b'{"prompt": "a')
        # until both stalled uploads hold their slots (a loaded machine takes a while to read their heads), a
        # small complete request is read and refused for its body (422); then it finds no slot (429). Within
        # 4 s, before body_timeout_s lets the stalled ones go
        deadline = time.monotonic() + 4.0
        while True:
            status, text, _ = raw_request(url, post_head("/reward", 10), b'{"prompt"}')
            if status != 422 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 429 and "request bodies are being received" in text
    finally:
        for s in stalled:
            s.close()
    time.sleep(0.5)  # the slots come back when the stalled clients go away
    status, _, _ = raw_request(url, post_head("/prompts", 2), b"{}")
    assert status in (422, 503)


def test_an_oversized_body_without_content_length_is_413(server):
    url = server(max_body_bytes=10_000)
    chunk = b"x" * 4000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    head = "POST /reward HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    status, text, _ = raw_request(url, head, body)
    assert status == 413 and "over the limit of 10000 bytes" in text


def test_a_full_queue_answers_429_before_the_body(tiny):
    app = create_app(Settings(max_queue_images=1, max_queue_wait_s=20), rewarder=tiny)
    with running_server(app) as url:
        batcher = app.state.service.batcher
        release = threading.Event()
        batcher.executor.submit(release.wait, 60)  # the model is busy (a slow batch) until released
        send = lambda: httpx.post(url + "/reward", timeout=60, json={"prompt": "p", "images": [b64(smooth_image(0, 32, 32))]})  # noqa: E731
        held = [threading.Thread(target=send) for _ in range(2)]
        # the first request reaches the (busy) model, the second then waits in the queue; one at a time,
        # or the batch loop would take both into one batch
        held[0].start()
        wait_until(lambda: _batches_started(app) >= 1)
        held[1].start()
        wait_until(lambda: batcher.waiting_images >= 1)
        assert batcher.waiting_images == 1
        # 50 MB announced, not one byte of body sent: refused from the queue state alone
        status, text, _ = raw_request(url, post_head("/reward", 50_000_000))
        assert status == 429 and "already waiting" in text and "retry-after" in text.lower()
        status, _, _ = raw_request(url, post_head("/reward/gradient", 50_000_000, "application/octet-stream"))
        assert status == 429
        release.set()
        for t in held:
            t.join(30)


# ---- structure: deep nesting and lying safetensors headers


@pytest.mark.parametrize("path", ["/reward", "/prompts", "/jobs"])
def test_deeply_nested_json_is_a_4xx(make_client, path):
    client = make_client(redis_url="redis://127.0.0.1:6379/13")
    body = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert r.json()["detail"]


@pytest.mark.parametrize("header_len,header", [
    (10**12, b"{}"),  # claims a terabyte of header
    (60, b'{"images": {"dtype": "F32", "shape": [1, 3, 64, 64], "data_offsets": [0, 49152]}}'),  # length lies
    (None, b'{"images": {"dtype": "F32", "shape": [1, 3, 64, 64], "data_offsets": [0, 999999999]}}'),  # offsets past the end
    (None, b'{"images": {"dtype": "F32", "shape": [100000, 3, 100000, 100000], "data_offsets": [0, 16]}}'),  # shape lies
])
def test_lying_safetensors_headers_are_400(make_client, header_len, header):
    client = make_client()
    n = len(header) if header_len is None else header_len
    body = n.to_bytes(8, "little") + header + b"\0" * 16
    r = client.post("/reward/gradient", content=body, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400 and "not a valid safetensors file" in r.json()["detail"]


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def _batches_started(app) -> float:
    """Micro-batches handed to the model so far (the batcher's own histogram count)."""
    return sum(s.value for s in app.state.service.metrics.batch_requests.collect()[0].samples if s.name.endswith("_count"))

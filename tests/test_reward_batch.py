"""Many (prompt, image) pairs per /reward request: JSON, multipart and raw safetensors tensors; group
advantages; preprocessing off the model thread; /reward/gradient requests batched together."""

import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from t2i_reward.rewarders import InvalidRequestError
from t2i_reward.rewarders.advantages import EPS, group_advantages, zscore_in_groups
from t2i_reward.rewarders.images import Preprocess

from .conftest import smooth_image
from .test_images import png_bytes
from .test_service import b64

PROMPTS = ["a red apple", "a blue car", "a green forest", "a city at night"]


@pytest.fixture
def client(make_client):
    return make_client(max_images=8)


def as_uint8(images) -> torch.Tensor:
    """PIL images of one size -> uint8 (B, H, W, 3), the layout a trainer sends."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))


def tensor_body(images: torch.Tensor, **meta) -> bytes:
    return save_safetensors({"images": images}, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})


def post_tensors(client, body: bytes, accept: str | None = None):
    headers = {"content-type": "application/octet-stream"}
    if accept:
        headers["accept"] = accept
    return client.post("/reward", content=body, headers=headers)


def alone(tiny, prompt, image) -> dict:
    return tiny.score(prompt, [image]).images[0].components


def test_json_pairs_each_equal_scoring_alone(client, tiny, images):
    r = client.post("/reward", json={"prompts": PROMPTS, "images": [b64(im) for im in images[:4]]})
    assert r.status_code == 200, r.text
    body = r.json()
    for prompt, image, got in zip(PROMPTS, images, body["images"]):
        assert got["components"] == pytest.approx(alone(tiny, prompt, image), abs=1e-5)
    assert body["advantages"] is None and body["images"][0]["percentiles"] is None
    # the prompts matter: the same images under one prompt score differently on the text experts
    same = client.post("/reward", json={"prompt": PROMPTS[0], "images": [b64(im) for im in images[:4]]}).json()
    assert [i["components"]["imagereward"] for i in same["images"]][1:] != pytest.approx(
        [i["components"]["imagereward"] for i in body["images"]][1:], abs=1e-6)


def test_multipart_repeated_prompts_and_group_ids(client, tiny, images):
    files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images[:4])]
    data = {"prompts": PROMPTS, "group_ids": ["a", "a", "b", "b"]}
    r = client.post("/reward", data=data, files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    for prompt, image, got in zip(PROMPTS, images, body["images"]):
        assert got["components"] == pytest.approx(alone(tiny, prompt, image), abs=1e-5)
    adv = body["advantages"]["total"]
    assert adv[0] == pytest.approx(-adv[1], abs=1e-5) and adv[2] == pytest.approx(-adv[3], abs=1e-5)  # two per group: +-1
    half = abs(body["images"][0]["total"] - body["images"][1]["total"]) / 2  # two images: z = +-half / (half + eps)
    assert abs(adv[0]) == pytest.approx(half / (half + EPS), abs=1e-4)


@pytest.mark.parametrize("body, match", [
    ({"prompt": "x", "prompts": ["x"]}, "either"),
    ({}, "'prompt' .* or 'prompts' .* is required"),
    ({"prompts": ["x", "y", "z"]}, "3 prompts for 2 images"),
    ({"prompts": ["x", ""]}, "prompt is empty"),
    ({"prompts": ["x", "y"], "group_ids": ["g"]}, "1 group_ids for 2 images"),
    ({"prompts": ["x", "y"], "group_ids": [1.5, 2]}, "group_ids"),
])
def test_bad_json_pairs_are_422(client, images, body, match):
    r = client.post("/reward", json={"images": [b64(im) for im in images[:2]], **body})
    assert r.status_code == 422, r.text
    assert pytest.approx(0) == 0 and __import__("re").search(match, json.dumps(r.json()["detail"]))


def test_uint8_tensor_path_is_pils_and_each_alone(client, tiny, images):
    ims = [smooth_image(i, 96, 128) for i in range(4)]
    u8 = as_uint8(ims)
    r8 = post_tensors(client, tensor_body(u8, prompts=PROMPTS))
    assert r8.status_code == 200, r8.text
    # each pair as if sent alone
    for k in range(4):
        one = post_tensors(client, tensor_body(u8[k : k + 1], prompts=PROMPTS[k])).json()
        assert one["images"][0]["components"] == pytest.approx(r8.json()["images"][k]["components"], abs=1e-5)
    # on a CPU host uint8 is resized in 8 bits, as PIL does: the reference pipeline's scores but for a
    # level or two on a few pixels (ImageReward 1e-4 apart here); float tensors are resized in float,
    # the GPU path's arithmetic (3e-3 apart here)
    png = client.post("/reward", json={"prompts": PROMPTS, "images": [b64(im) for im in ims]}).json()
    f32 = (u8.permute(0, 3, 1, 2).float() / 255).contiguous()
    rf = post_tensors(client, tensor_body(f32, prompts=PROMPTS)).json()
    off8 = off_float = 0.0
    for a, f, b in zip(r8.json()["images"], rf["images"], png["images"]):
        assert a["components"] == pytest.approx(b["components"], abs=5e-4)
        assert f["components"] == pytest.approx(b["components"], rel=0.02, abs=0.01)
        off8 += abs(a["components"]["imagereward"] - b["components"]["imagereward"])
        off_float += abs(f["components"]["imagereward"] - b["components"]["imagereward"])
    assert off8 < off_float / 5, (off8, off_float)


def test_safetensors_answer_with_advantages(client, images):
    ims = [smooth_image(i, 64, 64) for i in range(6)]
    groups = [0, 0, 0, 1, 1, 2]
    r = post_tensors(client, tensor_body(as_uint8(ims), prompts=PROMPTS[:2] * 3, group_ids=groups),
                     accept="application/octet-stream")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    out = load_safetensors(r.content)
    assert set(out) >= {"rewards", "components.imagereward", "components.aesthetic", "components.mlp",
                        "advantages", "advantages.imagereward", "advantages.aesthetic", "advantages.mlp"}
    as_json = post_tensors(client, tensor_body(as_uint8(ims), prompts=PROMPTS[:2] * 3, group_ids=groups)).json()
    assert out["rewards"].tolist() == pytest.approx([i["total"] for i in as_json["images"]], abs=1e-6)
    expected = zscore_in_groups(out["rewards"], torch.tensor(groups))
    assert out["advantages"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert out["advantages"][5] == 0  # alone in its group
    assert out["advantages"][:3].mean() == pytest.approx(0, abs=1e-5)
    ir = out["components.imagereward"][3:5]
    assert out["advantages.imagereward"][3:5].tolist() == pytest.approx(
        ((ir - ir.mean()) / (ir.std(unbiased=False) + EPS)).tolist(), abs=1e-4)


@pytest.mark.parametrize("make, meta, status, match", [
    (lambda: torch.zeros(2, 32, 32, 3, dtype=torch.int32), {"prompts": ["a", "b"]}, 422, "uint8 .* or float16"),
    (lambda: torch.zeros(2, 32, 32, 4, dtype=torch.uint8), {"prompts": ["a", "b"]}, 422, r"\(B, H, W, 3\)"),
    (lambda: torch.zeros(2, 4, 32, 32), {"prompts": ["a", "b"]}, 422, r"\(B, 3, H, W\)"),
    (lambda: torch.full((2, 3, 32, 32), 2.0), {"prompts": ["a", "b"]}, 422, r"in \[0, 1\]"),
    (lambda: torch.zeros(2, 32, 32, 3, dtype=torch.uint8), {}, 422, "metadata 'prompts'"),
    (lambda: torch.zeros(2, 32, 32, 3, dtype=torch.uint8), {"prompts": ["a"]}, 422, "1 prompts for 2 images"),
    (lambda: torch.zeros(9, 32, 32, 3, dtype=torch.uint8), {"prompts": "a"}, 422, "9 images; the limit is 8"),
    (lambda: torch.zeros(0, 32, 32, 3, dtype=torch.uint8), {"prompts": []}, 422, "empty"),
    (lambda: torch.zeros(2, 32, 32, 3, dtype=torch.uint8), {"prompts": "a", "group_ids": "{}"}, 422, "group_ids"),
])
def test_bad_tensor_bodies_are_4xx(client, make, meta, status, match):
    r = post_tensors(client, tensor_body(make(), **meta))
    assert r.status_code == status, r.text
    assert __import__("re").search(match, r.json()["detail"]), r.json()["detail"]


def test_truncated_and_garbage_tensor_bodies_are_400(client):
    body = tensor_body(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), prompts="a")
    for bad in (body[: len(body) // 2], b"not safetensors at all"):
        r = post_tensors(client, bad)
        assert r.status_code == 400 and "safetensors" in r.json()["detail"]


def test_one_string_prompt_for_every_image(client):
    u8 = as_uint8([smooth_image(i, 48, 48) for i in range(3)])
    quoted = post_tensors(client, tensor_body(u8, prompts=json.dumps("a red apple"))).json()
    bare = post_tensors(client, tensor_body(u8, prompts="a red apple")).json()  # not JSON: taken as the prompt itself
    assert [i["total"] for i in quoted["images"]] == pytest.approx([i["total"] for i in bare["images"]], abs=1e-6)


def test_preprocessing_never_runs_on_the_model_thread(client, monkeypatch, images):
    threads = []
    real_pil, real_tensor = Preprocess.pil, Preprocess.tensor
    monkeypatch.setattr(Preprocess, "pil", lambda self, ims: threads.append(threading.current_thread().name) or real_pil(self, ims))
    monkeypatch.setattr(Preprocess, "tensor", lambda self, x: threads.append(threading.current_thread().name) or real_tensor(self, x))
    assert client.post("/reward", json={"prompts": PROMPTS[:2], "images": [b64(im) for im in images[:2]]}).status_code == 200
    assert post_tensors(client, tensor_body(as_uint8([smooth_image(0, 40, 40)] * 2), prompts="a")).status_code == 200
    assert threads and all(t.startswith("t2i-prepare") for t in threads), threads


def test_a_request_is_prepared_in_parts_across_the_pool(make_client, tiny, monkeypatch, images):
    """Seven images over three pool threads: three parts of 2, 2 and 3 images, prepared in different threads,
    joined in order: each image scores as it does alone, on both the PNG and the tensor path."""
    client = make_client(max_images=8, prepare_workers=3)
    seen = []
    real = tiny.prepare_part
    monkeypatch.setattr(tiny, "prepare_part", lambda c, a, b, *gate: seen.append((a, b, threading.current_thread().name)) or real(c, a, b, *gate))
    pics = [smooth_image(i, 40, 48) for i in range(7)]
    prompts = [PROMPTS[i % 4] for i in range(7)]
    r = client.post("/reward", data={"prompts": prompts}, files=[("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(pics)])
    assert r.status_code == 200, r.text
    assert sorted((a, b) for a, b, _ in seen) == [(0, 2), (2, 4), (4, 7)]
    assert all(t.startswith("t2i-prepare") for _, _, t in seen)
    for prompt, image, got in zip(prompts, pics, r.json()["images"]):
        assert got["components"] == pytest.approx(alone(tiny, prompt, image), abs=1e-5)
    seen.clear()
    u8 = as_uint8(pics)
    r = post_tensors(client, tensor_body(u8, prompts=prompts), accept="application/octet-stream")
    assert r.status_code == 200, r.text
    assert len(seen) == 3
    whole = tiny.score_checked([tiny.check_tensor_request(prompts, u8)])[0]  # prepared in one piece, in-process
    assert load_safetensors(r.content)["rewards"].tolist() == pytest.approx([im.total for im in whole.images], abs=1e-6)


def test_parts_fill_the_whole(tiny, images):
    """Parts prepared separately (in any order) fill exactly the pixels of the request prepared in one piece."""
    u8 = as_uint8([smooth_image(i, 40, 48) for i in range(5)])
    pngs = [png_bytes(im) for im in images[:3]]
    for check, batch, bounds in ((tiny.check_tensor_request, u8, [(2, 5), (0, 2)]), (tiny.check_request, pngs, [(1, 3), (0, 1)])):
        whole = check("a", batch)
        pending = check("a", batch, prepare=False)
        assert pending.pending is not None and pending.raw is None
        for a, b in bounds:
            tiny.prepare_part(pending, a, b)
        assert set(pending.pixels) == set(whole.pixels)
        for spec, t in whole.pixels.items():
            assert torch.equal(pending.pixels[spec], t)


def test_a_bad_image_in_a_later_part_is_a_400(make_client, images):
    client = make_client(max_images=8, prepare_workers=2)
    files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images[:3])]
    files.append(("images", ("3.png", b"not an image at all", "image/png")))
    r = client.post("/reward", data={"prompt": "a"}, files=files)
    assert r.status_code == 400, r.text
    assert "image" in r.json()["detail"].lower()


def _needs_openmp_threads():
    import os

    if not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2 or torch.get_num_threads() < 2:
        pytest.skip("needs Linux's /proc and at least 2 torch threads (a team of 1 starts no threads anyway)")


def grown_by_big_op() -> tuple[int, int]:
    """(threads the process gained, this thread's OpenMP team size) after a large torch op in this thread."""
    import os

    from threadpoolctl import threadpool_info

    before = len(os.listdir("/proc/self/task"))
    torch.ones(4_000_000).mul_(2).add_(1)  # far over torch's grain size: a parallel region
    openmp = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp" and "torch" in i["filepath"]]
    return len(os.listdir("/proc/self/task")) - before, openmp[0]


def test_pool_threads_run_torch_without_an_openmp_team():
    """The pool's initializer: a large torch op in such a thread starts no OpenMP threads (the process's
    thread count stays put), where a plain thread starts its own team; other threads keep their size."""
    from concurrent.futures import ThreadPoolExecutor

    from t2i_reward.service.batcher import single_threaded_torch

    _needs_openmp_threads()
    with ThreadPoolExecutor(1, initializer=single_threaded_torch) as pool:
        assert pool.submit(grown_by_big_op).result() == (0, 1)
        assert pool.submit(grown_by_big_op).result() == (0, 1)  # the limit stays
    with ThreadPoolExecutor(1) as plain:  # the control: the same op in a thread without the initializer
        grown, size = plain.submit(grown_by_big_op).result()
        assert grown >= 1 and size == torch.get_num_threads()
    assert torch.get_num_threads() >= 2  # the process-wide setting is untouched


def test_the_apps_side_threads_run_torch_without_an_openmp_team(client):
    """asyncio.to_thread in the running app (prompt search, the MLLM judge, jobs) uses threads without OpenMP
    teams, so a /prompts call cannot get the model thread's team throttled; the prompts still come back."""
    import asyncio

    _needs_openmp_threads()
    for _ in range(2):
        assert client.portal.call(asyncio.to_thread, grown_by_big_op) == (0, 1)
    r = client.post("/prompts", json={"topics": ["a red fox"], "n_prompts": 3, "diversity": 0.3})
    assert r.status_code == 200 and len(r.json()["prompts"][0]) == 3, r.text


def test_server_timing_says_where_the_time_went(client):
    r = post_tensors(client, tensor_body(as_uint8([smooth_image(0, 40, 40)] * 2), prompts="a"))
    assert r.status_code == 200, r.text
    phases = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert list(phases) == ["read", "prepare", "queue", "model", "encode"]
    assert all(float(v) >= 0 for v in phases.values()) and float(phases["model"]) > 0
    r = client.post("/reward", json={"prompt": "a", "images": [b64(smooth_image(1, 40, 40))]})
    assert list(dict(p.split(";dur=") for p in r.headers["server-timing"].split(", "))) == ["read", "prepare", "queue", "model", "encode"]


def test_gradient_requests_share_one_pass(client, tiny, monkeypatch):
    calls = []
    real = tiny.reward_and_gradient_many
    gate = threading.Event()

    def counted(requests, **kw):
        calls.append(len(requests))
        gate.wait(10)  # hold the first pass so the next requests queue up together
        return real(requests, **kw)

    monkeypatch.setattr(tiny, "reward_and_gradient_many", counted)
    x = [torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    out = [None] * 3

    def send(i):
        body = save_safetensors({"images": x[i]}, metadata={"prompts": json.dumps(PROMPTS[i])})
        out[i] = client.post("/reward/gradient", content=body, headers={"content-type": "application/octet-stream"})

    first = threading.Thread(target=send, args=(0,))
    first.start()
    while not calls:
        threading.Event().wait(0.01)
    rest = [threading.Thread(target=send, args=(i,)) for i in (1, 2)]
    for t in rest:
        t.start()
    while client.app.state.service.batcher.waiting_images < 4:
        threading.Event().wait(0.01)
    gate.set()
    for t in [first, *rest]:
        t.join(30)
    assert calls == [1, 2]  # the two that waited ran as one pass
    for i in range(3):
        assert out[i].status_code == 200, out[i].text
        got = load_safetensors(out[i].content)
        ref = tiny.reward_and_gradient(x[i], PROMPTS[i])
        assert got["rewards"].tolist() == pytest.approx(ref["rewards"].tolist(), abs=1e-5)
        assert torch.allclose(got["grad"], ref["grad"], atol=1e-6, rtol=1e-4)


def test_gradient_requests_of_other_sizes_run_apart(tiny):
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 40, 40)
    with pytest.raises(InvalidRequestError, match="one size"):
        tiny.reward_and_gradient_many([(a, "x", None), (b, "y", None)])


def test_group_advantage_arithmetic():
    total = torch.tensor([1.0, 3.0, 5.0, 2.0, 2.0, 7.0])
    adv = group_advantages(total, {"e": total * 2}, ["p", "p", "q", "p", "r", "r"])
    # group p: 1, 3, 2 -> mean 2, population std sqrt(2/3)
    std = (2 / 3) ** 0.5
    assert adv["total"][[0, 1, 3]].tolist() == pytest.approx([-1 / (std + EPS), 1 / (std + EPS), 0.0], abs=1e-5)
    assert adv["total"][2] == 0  # q: alone
    assert adv["total"][4].item() == pytest.approx(-1, abs=1e-3) and adv["total"][5].item() == pytest.approx(1, abs=1e-3)
    assert adv["e"].tolist() == pytest.approx(adv["total"].tolist(), abs=1e-3)  # scale-free
    equal = group_advantages(torch.tensor([4.0, 4.0]), {}, [1, 1])["total"]
    assert equal.tolist() == [0.0, 0.0]


def test_explain_gives_percentiles(client, images):
    r = client.post("/reward", json={"prompts": PROMPTS[:3], "images": [b64(im) for im in images[:3]], "explain": True})
    assert r.status_code == 200, r.text
    for im in r.json()["images"]:
        assert set(im["percentiles"]) == set(im["components"])
        assert all(p is None or 0 <= p <= 100 for p in im["percentiles"].values())


def test_explain_without_calibration_is_422(make_client, tiny, images, monkeypatch):
    monkeypatch.setattr(tiny, "calibration", None)
    client = make_client()
    r = client.post("/reward", json={"prompt": "x", "images": [b64(im) for im in images[:2]], "explain": True})
    assert r.status_code == 422 and "calibration" in r.json()["detail"]

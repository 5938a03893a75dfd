"""The MLLM peer and the vlm_judge expert, against real peers only: `transformers serve` (the OpenAI-compatible
server that ships with transformers) serving the project's tiny random LLaVA on loopback, and the same model
in-process. Also the peer down, too slow, and answering garbage."""

import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from t2i_reward.rewarders import create_rewarder
from t2i_reward.rewarders.mllm import HTTPPeer, MLLMConfig, MLLMError, create_peer
from t2i_reward.rewarders.tiny_vlm import ensure_tiny_vlm

from .conftest import free_port, smooth_image

NO_OTHERS = {"imagereward": None, "aesthetic": None, "mlp": None}
IMAGES = [smooth_image(s, 64, 80) for s in (1, 2, 3)] + [Image.new("RGB", (64, 64), (200, 30, 30))]


@pytest.fixture(scope="module")
def vlm(cache_dir) -> Path:
    return ensure_tiny_vlm(cache_dir)


@pytest.fixture(scope="module")
def served(vlm, tmp_path_factory):
    """`transformers serve <tiny VLM folder>` on a free loopback port, offline, one thread (the benchmark's
    `serve`)."""
    from benchmarks.judge_latency import serve

    if not (Path(sys.executable).parent / "transformers").exists():
        pytest.skip("transformers serve is not installed (pip install 'transformers[serving]')")
    port = free_port()
    proc = serve(vlm, port, home=tmp_path_factory.mktemp("hf-home"), timeout_s=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def judge(cache_dir, **cfg):
    return create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", normalize=False,
                           experts={**NO_OTHERS, "vlm_judge": {"image_size": 56, **cfg}})


def judge_scores(rewarder, prompt="a red square"):
    return [s.components["vlm_judge"] for s in rewarder.score(prompt, IMAGES).images]


def check_scores(first, again):
    assert all(0.0 <= s <= 1.0 for s in first)
    assert first == again  # deterministic
    assert len(set(round(s, 6) for s in first)) > 1  # the images are told apart


def test_the_in_process_judge_scores_each_image(cache_dir, vlm):
    r = judge(cache_dir)  # model 'tiny': the same folder
    check_scores(judge_scores(r), judge_scores(r))
    assert judge_scores(r, "a blue circle") != judge_scores(r)  # the prompt is asked about too
    assert r.experts["vlm_judge"].describe()["peer"]["yes_no"] == "logits"


def test_the_in_process_peer_runs_in_bfloat16_as_on_a_gpu(cache_dir, vlm):
    """On a GPU the in-process peer loads the model in bfloat16 (the default there); the same dtype on the CPU
    gives nearly the float32 probability."""
    import torch

    cfg = MLLMConfig(model="tiny", image_size=56)
    full, half = create_peer(cfg, cache_dir), create_peer(cfg, cache_dir, "cpu", torch.bfloat16)
    assert full.model.dtype == torch.float32 and half.model.dtype == torch.bfloat16
    for im in IMAGES[:2]:
        assert half.yes_probability(im, "Does it match?") == pytest.approx(full.yes_probability(im, "Does it match?"), abs=0.02)


def test_the_judge_through_transformers_serve(cache_dir, vlm, served):
    """transformers serve ignores `logprobs`, so `auto` settles on its yes/no endpoint."""
    r = judge(cache_dir, url=served, model=str(vlm))
    check_scores(judge_scores(r), judge_scores(r))
    assert r.experts["vlm_judge"].peer.describe()["yes_no"] == "systemone"


def test_concurrent_first_calls_each_find_the_mode(vlm, served):
    """In `auto` mode the first calls probe the peer at the same time; one settling the mode must not turn
    another's failed probe (transformers serve has no log-probabilities) into an error. The first call's
    failed probe is held until a second call has settled the mode."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    peer = HTTPPeer(MLLMConfig(url=served, model=str(vlm), image_size=56))
    real, probing, settled = peer._yes_logprobs, threading.Event(), threading.Event()

    def first_probe_held(image, question):
        first = not probing.is_set()
        probing.set()
        try:
            return real(image, question)
        finally:
            if first:
                settled.wait(60)

    peer._yes_logprobs = first_probe_held
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(peer.yes_probability, IMAGES[0], "Is it red?")
        assert probing.wait(60)
        second = peer.yes_probability(IMAGES[1], "Is it red?")
        assert peer.mode == "systemone"
        settled.set()
        assert 0.0 <= held.result(60) <= 1.0 and 0.0 <= second <= 1.0


def test_a_peer_answering_garbage_is_a_clear_error(vlm, served):
    """The random model's chat answers are noise: a 0-10 rating cannot be read from them."""
    peer = HTTPPeer(MLLMConfig(url=served, model=str(vlm), yes_no="rating", image_size=56))
    text = peer.text(peer.messages(IMAGES[0], "Describe the image.", 56), max_tokens=4)
    assert isinstance(text, str)  # the chat path itself works
    with pytest.raises(MLLMError, match="holds no 0-10 rating") as e:
        peer.yes_probability(IMAGES[0], "Is it red?")
    assert e.value.kind == "bad_answer"
    with pytest.raises(MLLMError, match="refused /v1/chat/completions: 400"):  # another model than the one served
        HTTPPeer(MLLMConfig(url=served, model="some/other-model", yes_no="rating")).yes_probability(IMAGES[0], "Is it red?")


def test_a_slow_peer_times_out(vlm, served):
    peer = HTTPPeer(MLLMConfig(url=served, model=str(vlm), yes_no="systemone", timeout_s=0.001))
    t = time.perf_counter()
    with pytest.raises(MLLMError, match="did not answer within 0.001 s") as e:
        peer.yes_probability(IMAGES[0], "Is it red?")
    assert e.value.kind == "timeout" and time.perf_counter() - t < 5


def test_a_peer_that_is_down_is_a_clear_error_and_the_service_keeps_working(cache_dir):
    from fastapi.testclient import TestClient
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    peer = create_peer(MLLMConfig(url=url, retries=1))
    t = time.perf_counter()
    with pytest.raises(MLLMError, match="is unreachable") as e:
        peer.yes_probability(IMAGES[0], "Is it red?")
    assert e.value.kind == "unavailable" and time.perf_counter() - t < 5  # one retry after 0.2 s

    mixture = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu",
                              experts={"vlm_judge": {"url": url, "retries": 0, "weight": 0.5}})
    with TestClient(create_app(Settings(), rewarder=mixture)) as client:
        import io

        buf = io.BytesIO()
        IMAGES[0].save(buf, format="PNG")
        r = client.post("/reward", data={"prompt": "a red square"}, files={"images": ("a.png", buf.getvalue(), "image/png")})
        assert r.status_code == 502 and "MLLM peer" in r.json()["detail"] and "unreachable" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200  # the service itself is fine


def test_images_go_downscaled():
    import base64
    import io

    from t2i_reward.rewarders.mllm import data_url

    url = data_url(Image.new("RGB", (1000, 500)), 100)
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (100, 50)


@pytest.fixture(scope="module")
def app_with_peer(tiny, served, vlm):
    from fastapi.testclient import TestClient
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    settings = Settings(mllm=MLLMConfig(url=served, model=str(vlm), image_size=56), verify_threshold=0.5)
    with TestClient(create_app(settings, rewarder=tiny)) as client:
        yield client


def png_b64(im) -> str:
    import base64
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_verify_scores_reasons_and_pass_marks(app_with_peer):
    body = {"prompt": "a red square", "images": [png_b64(im) for im in IMAGES]}
    r = app_with_peer.post("/verify", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["threshold"] == 0.5 and out["peer"]["yes_no"] == "systemone" and len(out["results"]) == len(IMAGES)
    for v in out["results"]:
        assert 0 <= v["score"] <= 1 and isinstance(v["reason"], str) and v["passed"] == (v["score"] >= 0.5)
    assert app_with_peer.post("/verify", json=body).json()["results"] == out["results"]  # deterministic
    low = app_with_peer.post("/verify", json={**body, "threshold": 0.0}).json()
    assert all(v["passed"] for v in low["results"])
    assert app_with_peer.post("/verify", json={**body, "images": ["not base64!"]}).status_code == 400
    assert app_with_peer.post("/verify", json={**body, "images": []}).status_code == 422
    ready = app_with_peer.get("/readyz")
    if ready.status_code == 200:  # once the prompt index is in: the peer's state sits beside readiness
        assert ready.json()["mllm"]["state"] == "ok"


def test_enhance_returns_n_prompts(app_with_peer):
    r = app_with_peer.post("/prompts/enhance", json={"prompt": "a cat on a sofa", "n": 3})
    assert r.status_code == 200, r.text
    prompts = r.json()["prompts"]
    assert len(prompts) == 3 and all(isinstance(p, str) and p.strip() for p in prompts)
    assert app_with_peer.post("/prompts/enhance", json={"prompt": "a cat", "n": 0}).status_code == 422


def test_without_a_peer_the_endpoints_say_so(tiny):
    from fastapi.testclient import TestClient
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    with TestClient(create_app(Settings(), rewarder=tiny)) as client:
        r = client.post("/verify", json={"prompt": "x", "images": [png_b64(IMAGES[0])]})
        assert r.status_code == 503 and "no MLLM peer is configured" in r.json()["detail"]
        assert client.post("/prompts/enhance", json={"prompt": "x"}).status_code == 503


def test_in_process_enhancement_gives_n_strings(cache_dir, vlm):
    from t2i_reward.prompter.enhance import enhance_prompt

    peer = create_peer(MLLMConfig(model="tiny"), cache_dir)
    out = enhance_prompt(peer, "a cat on a sofa", 3)
    assert len(out) == 3 and all(isinstance(p, str) and p.strip() for p in out)
    assert len(set(out)) > 1  # in-process rewrites are sampled, one seed each
    assert enhance_prompt(peer, "a cat on a sofa", 3) == out  # the same seeds, the same rewrites


def test_a_generate_job_enhances_prompts_and_gives_reasons(cache_dir, tiny, tmp_path):
    """generate with `enhance` and the tiny VLM in-process: the prompts used are the peer's rewrites, and each
    kept image carries the judge's reason; the ranking is the rewards'."""
    import json

    from t2i_reward.finetune.rewards import LocalReward
    from t2i_reward.finetune.spec import JobSpec
    from t2i_reward.finetune.train import JobContext, run_job

    spec = JobSpec(method="generate", base_model="tiny", prompts=["a red apple"], n_images=2, resolution=32,
                   num_inference_steps=2, guidance_scale=1.0, enhance=True)
    peer = create_peer(MLLMConfig(model="tiny", image_size=56), cache_dir)
    out = run_job(spec, JobContext(out_dir=tmp_path, reward=LocalReward(tiny), prompts=spec.prompts, base_model="tiny",
                                   cache_dir=cache_dir, device="cpu", peer=peer))
    (result,) = json.loads((tmp_path / "results.json").read_text())["prompts"]
    assert out["status"] == "succeeded" and result["prompt"] == "a red apple" and result["used"] != "a red apple"
    assert all(isinstance(im["reason"], str) for im in result["images"])
    assert result["images"][0]["total"] >= result["images"][1]["total"]


def test_an_active_learning_round_takes_the_judge_as_feedback(cache_dir, vlm, tmp_path):
    """Stage 2 with the judge in the mixture (in-process tiny VLM) beside the tiny experts: every candidate's
    feedback carries its vlm_judge score, and the prompt kept is the one whose candidates the experts (the
    judge included) order least alike, recomputed here from feedback.json."""
    import json

    import torch
    from t2i_reward.finetune.active import informativeness
    from t2i_reward.finetune.rewards import LocalReward
    from t2i_reward.finetune.spec import JobSpec
    from t2i_reward.finetune.train import JobContext, run_job

    mixture = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu",
                              experts={"vlm_judge": {"model": "tiny", "image_size": 56, "weight": 0.5}})
    spec = JobSpec(method="active_learning", base_model="tiny", prompts=["a red apple", "a blue car", "a green field", "a dog"],
                   eval_prompts=["a dog"], rounds=1, steps=1, round_prompts=3, select_prompts=1, n_images=3,
                   learner="reward_weighted", select="disagreement", resolution=32, num_inference_steps=2, guidance_scale=1.0,
                   eval_images_per_prompt=1)
    out = run_job(spec, JobContext(out_dir=tmp_path, reward=LocalReward(mixture), prompts=spec.prompts, base_model="tiny",
                                   cache_dir=cache_dir, device="cpu"))
    assert out["status"] == "succeeded" and "vlm_judge" in out["metrics"]["eval"]["by_round"]
    feedback = json.loads((tmp_path / "rounds" / "01" / "feedback.json").read_text())["prompts"]
    images = [im for p in feedback for im in p["images"]]
    assert all(0 <= im["components"]["vlm_judge"] <= 1 for im in images)
    experts = list(images[0]["components"])
    again = informativeness("disagreement", torch.tensor([im["total"] for im in images]),
                            {n: torch.tensor([im["components"][n] for im in images]) for n in experts}, 3)
    assert again == pytest.approx([p["informativeness"] for p in feedback], abs=1e-4)
    assert [p["selected"] for p in feedback] == [i == again.index(max(again)) for i in range(3)]

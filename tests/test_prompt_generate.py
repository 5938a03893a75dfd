import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from t2i_reward.prompter import generate as gen
from t2i_reward.prompter.generate import PromptGenerator, ensure_tiny_gpt2
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

TOPICS = ["a red fox", "space travel"]


@pytest.fixture(scope="module")
def plain(cache_dir):
    return PromptGenerator("tiny", "none", device="cpu", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def expanding(cache_dir):
    return PromptGenerator("tiny", "tiny", device="cpu", cache_dir=cache_dir)


def positive_words(cache_dir) -> set[str]:
    return set((ensure_tiny_gpt2(cache_dir, "expansion") / "positive.txt").read_text().split())


def test_tiny_models_have_the_real_layout(cache_dir):
    for kind in ("magicprompt", "expansion"):
        folder = ensure_tiny_gpt2(cache_dir, kind)
        for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), (kind, name)
        assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
    assert len(positive_words(cache_dir)) == len(gen.TINY_POSITIVE_WORDS)


def test_deterministic_for_a_seed(plain):
    first = plain.generate(TOPICS, 3, seed=7, max_new_tokens=16)
    assert plain.generate(TOPICS, 3, seed=7, max_new_tokens=16) == first
    assert plain.generate(TOPICS, 3, seed=8, max_new_tokens=16) != first
    assert [len(p) for p in first] == [3, 3]
    for topic, prompts in zip(TOPICS, first):
        assert all(p.startswith(topic) and len(p) > len(topic) for p in prompts)
        assert all("\n" not in p for p in prompts)


def test_generation_leaves_the_global_rng_alone(plain):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    plain.generate(["a cat"], 1, seed=1, max_new_tokens=4)
    assert torch.equal(torch.rand(3), expected)


def test_expansion_only_adds_positive_words(plain, expanding, cache_dir):
    allowed = positive_words(cache_dir)
    base = plain.generate(TOPICS, 4, seed=3, max_new_tokens=12)
    expanded = expanding.generate(TOPICS, 4, seed=3, max_new_tokens=12)
    assert expanding.generate(TOPICS, 4, seed=3, max_new_tokens=12) == expanded
    appended = []
    for bases, longs in zip(base, expanded):
        for b, e in zip(bases, longs):
            assert e.startswith(b.rstrip(" ,") + ", ")  # the same base prompt (its own seeded scope), then the words
            appended += re.split(r"[\s,]+", e[len(b.rstrip(" ,")) + 2:].strip(" ,"))
    assert len(appended) >= 8
    assert all(w.lower() in allowed for w in appended), [w for w in appended if w.lower() not in allowed]
    for longs in expanded:  # no word twice within one expansion
        for e in longs:
            words = [w.lower() for w in re.split(r"[\s,]+", e.split(", ", 1)[1]) if w]
            assert len(words) == len(set(words))


def test_without_the_mask_the_words_are_not_positive(expanding, cache_dir, monkeypatch):
    """The check above is meaningful: with the processor replaced by a no-op, words outside positive.txt appear."""
    allowed = positive_words(cache_dir)
    monkeypatch.setattr(gen, "_as_logits_processor", lambda processor: _identity())
    expanded = expanding.generate(TOPICS, 4, seed=3, max_new_tokens=12)
    tails = [e.split(", ", 1)[1] if ", " in e else "" for longs in expanded for e in longs]
    words = [w for t in tails for w in re.split(r"[\s,]+", t) if w]
    assert any(w.lower() not in allowed for w in words)


def _identity():
    from transformers import LogitsProcessor

    class Identity(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    return Identity()


def test_positive_words_processor_masks():
    import torch

    p = gen.PositiveWordsProcessor([2, 3], [5], eos_id=0)
    scores = torch.zeros(2, 8)
    out = p(torch.tensor([[1, 3], [2, 5]]), scores)
    finite = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]
    assert finite == [{2, 5}, {3}]  # 3 was used; after a comma no comma
    assert set(torch.isfinite(p(torch.tensor([[2, 3, 5]]), torch.zeros(1, 8))[0]).nonzero().flatten().tolist()) == {0}


def test_bad_arguments(plain):
    from t2i_reward.rewarders.errors import RewardError

    for kwargs in ({"max_new_tokens": 78}, {"max_new_tokens": 0}, {"seed": -1}, {"seed": 2**32}):
        with pytest.raises(RewardError):
            plain.generate(["a cat"], 1, **kwargs)
    with pytest.raises(RewardError, match="tokens"):
        plain.generate(["word " * 300], 1)  # beyond the tiny model's 256 positions
    with pytest.raises(RewardError, match="cannot load"):
        PromptGenerator("/nonexistent/model", "none", device="cpu")


@pytest.fixture(scope="module")
def api(tiny, cache_dir):
    settings = Settings(prompt_generator="tiny", prompt_expansion="tiny", max_topics=3, max_n_prompts=5)
    with TestClient(create_app(settings, rewarder=tiny)) as client:
        yield client


def test_prompts_generate_endpoint(api, expanding, cache_dir):
    body = {"topics": TOPICS, "n_prompts": 2, "mode": "generate", "seed": 11, "max_new_tokens": 10}
    r = api.post("/prompts", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 11 and out["scores"] is None
    assert out["prompts"] == expanding.generate(TOPICS, 2, seed=11, max_new_tokens=10)
    assert api.post("/prompts", json=body).json() == out
    unseeded = api.post("/prompts", json={"topics": ["a cat"], "n_prompts": 1, "mode": "generate", "max_new_tokens": 4}).json()
    assert isinstance(unseeded["seed"], int) and unseeded["prompts"][0][0].startswith("a cat")


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"mode": "invent"}, "retrieve"),
        ({"mode": "generate", "seed": "3"}, "valid integer"),
        ({"mode": "generate", "seed": 1.5}, "valid integer"),
        ({"mode": "generate", "seed": True}, "valid integer"),
        ({"mode": "generate", "seed": -1}, "greater than or equal to 0"),
        ({"mode": "generate", "seed": 2**32}, "less than or equal to"),
        ({"mode": "generate", "max_new_tokens": 78}, "less than or equal to 77"),
        ({"mode": "generate", "n_prompts": 6}, "limit is 5"),
        ({"mode": "generate", "diversity": 0.5}, "retrieve' only"),
        ({"seed": 3}, "generate' only"),
    ],
)
def test_prompts_generate_bad_requests(api, body, fragment):
    r = api.post("/prompts", json={"topics": ["a cat"], "n_prompts": 1, **body})
    assert r.status_code == 422, r.text
    assert fragment in json.dumps(r.json()["detail"])


def test_generator_that_cannot_load_is_503(tiny, cache_dir):
    settings = Settings(prompt_generator=str(Path(cache_dir) / "no-such-model"))
    with TestClient(create_app(settings, rewarder=tiny)) as client:
        for _ in range(2):  # remembered, not retried
            r = client.post("/prompts", json={"topics": ["a cat"], "n_prompts": 1, "mode": "generate"})
            detail = r.json()["detail"]  # it says what failed, without the server's paths (the log keeps them)
            assert r.status_code == 503 and "cannot load the MagicPrompt model <path>" in detail and str(cache_dir) not in detail
        retrieved = client.post("/prompts", json={"topics": ["a cat"], "n_prompts": 1})  # retrieve does not need it
        assert retrieved.status_code in (200, 503) and "generator" not in retrieved.text


def test_cli_generate(cache_dir, expanding):
    cmd = [sys.executable, "-m", "t2i_reward.cli", "prompts", "generate", "a red fox", "space travel", "-n", "2",
           "--seed", "5", "--model", "tiny", "--expansion", "tiny", "--max-new-tokens", "8", "--device", "cpu"]
    env = {**os.environ, "T2I_REWARD_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines == [p for ps in expanding.generate(TOPICS, 2, seed=5, max_new_tokens=8) for p in ps]
    bad = subprocess.run(cmd[:-2] + ["--seed", "-3"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    missing = subprocess.run(cmd[:6] + ["--model", "/nonexistent/model"], capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 2 and "cannot load" in missing.stderr and "Traceback" not in missing.stderr

import math
from collections import Counter

import numpy as np
import pytest
import torch
from t2i_reward.rewarders import InvalidPromptError, InvalidRequestError, create_rewarder

from .conftest import smooth_image


def test_result_shape_and_random_flag(tiny, images):
    r = tiny.score("a red apple", images)
    assert len(r.images) == len(images)
    assert set(r.component_rewards) == {"imagereward", "aesthetic", "mlp"}
    assert all(set(s.components) == set(r.component_rewards) for s in r.images)
    assert all(e["random_weights"] for e in r.experts.values())
    d = r.to_dict()
    assert d["mean_reward"] == r.mean_reward and len(d["images"]) == len(images)


def test_total_is_the_weighted_sum_of_normalised_scores(cache_dir, images):
    r = create_rewarder(
        profile="tiny",
        cache_dir=cache_dir,
        experts={
            "imagereward": {"weight": 2.0, "mean": 0.1, "std": 0.5},
            "aesthetic": {"weight": 0.5, "mean": -1.0, "std": 4.0},
            "mlp": {"weight": -1.0, "mean": 0.2, "std": 2.0},
        },
    )
    res = r.score("a red apple", images)
    norm = {"imagereward": (2.0, 0.1, 0.5), "aesthetic": (0.5, -1.0, 4.0), "mlp": (-1.0, 0.2, 2.0)}
    for s in res.images:
        expected = sum(w * (s.components[n] - m) / sd for n, (w, m, sd) in norm.items())
        assert s.total == pytest.approx(expected, abs=1e-5)
    assert res.mean_reward == pytest.approx(np.mean([s.total for s in res.images]), abs=1e-6)
    by_means = sum(w * (res.component_rewards[n] - m) / sd for n, (w, m, sd) in norm.items())
    assert res.mean_reward == pytest.approx(by_means, abs=1e-5)


def test_ig_rewarding_arithmetic(cache_dir, images):
    # the ig-rewarding profile on tiny models: raw weighted sum of the four per-expert means
    r = create_rewarder(
        profile="ig-rewarding",
        cache_dir=cache_dir,
        experts={"imagereward": {"checkpoint": "tiny", "tokenizer": "packaged"}, "aesthetic": {"clip": "tiny", "head": "tiny"},
                 "pickscore": {"checkpoint": "tiny", "processor": "tiny"}, "hpsv2": {"checkpoint": "tiny"}},
    )
    assert r.config.normalize is False and set(r.experts) == {"aesthetic", "pickscore", "imagereward", "hpsv2"}
    res = r.score("an astronaut riding a horse", images)
    c = res.component_rewards
    expected = 1.0 * c["imagereward"] + 0.0125 * c["aesthetic"] + 0.1 * c["pickscore"] + 0.1 * c["hpsv2"]
    assert res.mean_reward == pytest.approx(expected, abs=1e-6)


def test_weights_override_per_call(tiny, images):
    base = tiny.score("a red apple", images)
    only_ir = tiny.score("a red apple", images, weights={"aesthetic": 0.0, "mlp": 0.0})
    for s in only_ir.images:
        assert s.total == pytest.approx(s.components["imagereward"], abs=1e-6)
    assert tiny.weights == {"imagereward": 1.0, "aesthetic": 1.0, "mlp": 1.0}  # the override did not stick
    assert base.images[0].total != pytest.approx(only_ir.images[0].total)
    with pytest.raises(InvalidRequestError, match="unknown expert 'pickscore'"):
        tiny.score("a red apple", images, weights={"pickscore": 1.0})
    with pytest.raises(InvalidRequestError, match="finite number"):
        tiny.score("a red apple", images, weights={"mlp": math.nan})


def test_one_shared_clip_pass_per_batch(cache_dir):
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, max_batch_size=2)
    calls = Counter()
    r.score("a cat", [smooth_image(i, 64, 64) for i in range(5)], on_timing=lambda name, seconds: calls.update([name]))
    # 5 images in batches of 2: three batches, one CLIP pass each, shared by aesthetic and mlp (and one
    # text pass per batch for the mlp's prompt embedding)
    assert calls == Counter({"clip:tiny": 3, "clip-text:tiny": 3, "imagereward": 3, "aesthetic": 3, "mlp": 3})


def test_batch_size_does_not_change_scores(cache_dir, tiny, images):
    small = create_rewarder(profile="tiny", cache_dir=cache_dir, max_batch_size=1)
    a = [s.total for s in tiny.score("a red apple", images).images]
    b = [s.total for s in small.score("a red apple", images).images]
    assert a == pytest.approx(b, abs=1e-5)


def test_score_many_matches_separate_calls(tiny, images):
    reqs = [("a red apple", images[:1]), ("a blue car", images[1:4], {"mlp": 0.0})]
    pooled = tiny.score_many(reqs)
    for req, res in zip(reqs, pooled):
        alone = tiny.score(*req)
        assert [s.total for s in res.images] == pytest.approx([s.total for s in alone.images], abs=1e-5)
        assert res.mean_reward == pytest.approx(alone.mean_reward, abs=1e-5)


def test_bad_input_is_refused_before_any_model_runs(tiny, images):
    with pytest.raises(InvalidRequestError, match="no images"):
        tiny.score("a cat", [])
    with pytest.raises(InvalidRequestError, match="list of images"):
        tiny.score("a cat", "cat.png")
    with pytest.raises(InvalidRequestError, match="limit is 64"):
        tiny.score("a cat", images[:1] * 65)
    with pytest.raises(InvalidPromptError, match="empty"):
        tiny.score("   ", images)
    with pytest.raises(InvalidPromptError, match="must be a string"):
        tiny.score(None, images)
    with pytest.raises(InvalidPromptError, match="limit is 2000"):
        tiny.score("x" * 2001, images)
    with pytest.raises(InvalidRequestError, match="no images"):
        tiny(torch.rand(0, 3, 32, 32), "a cat")
    with pytest.raises(InvalidRequestError, match="2 prompts for 3 images"):
        tiny(torch.rand(3, 3, 32, 32), ["a", "b"])
    with pytest.raises(InvalidPromptError, match="empty"):
        tiny(torch.rand(1, 3, 32, 32), [""])


def test_tensor_path_agrees_with_image_path(tiny):
    im = smooth_image(7, 300, 420)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255
    from_pil = tiny.score("a red apple", [im]).images[0]
    from_tensor = tiny(x, "a red apple")
    for name, value in from_pil.components.items():
        assert float(from_tensor.components[name][0]) == pytest.approx(value, abs=0.02)


def test_gradient_matches_finite_differences(tiny):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 224, 224)  # already model-sized: no resize, so the function is smooth
    x.requires_grad_(True)
    tiny(x, "a red apple").total.sum().backward()
    v = torch.randn_like(x)
    v /= v.norm()
    eps = 1e-2
    with torch.no_grad():
        up = tiny(x + eps * v, "a red apple").total.item()
        down = tiny(x - eps * v, "a red apple").total.item()
    numeric = (up - down) / (2 * eps)
    analytic = float((x.grad * v).sum())
    assert abs(analytic) > 1e-4
    assert analytic == pytest.approx(numeric, rel=0.05, abs=1e-4)


def test_per_image_prompts_in_the_tensor_path(tiny):
    x = torch.rand(2, 3, 224, 224)
    both = tiny(x, ["a red apple", "a blue car"]).total
    first = tiny(x[:1], "a red apple").total
    second = tiny(x[1:], "a blue car").total
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-5)

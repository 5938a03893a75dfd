"""The hpsv3 expert: HPSv3's input packing, its patch layout against transformers' Qwen2-VL image processor, the tiny
model through the mixture (batching, extras, bad prompts, the gradient), and parity with the hpsv3 package in its
own environment (docs/parity.md; tests/reference.py finds it, or skips, or under T2I_REQUIRE_REFERENCES=1 fails).
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from t2i_reward.rewarders import InvalidRequestError, ModelLoadError, create_rewarder
from t2i_reward.rewarders.errors import InvalidImageError
from t2i_reward.rewarders.experts import hpsv3 as H

from . import reference
from .conftest import smooth_image
from .test_experts import LONG_PROMPT, NO_DEFAULTS, PARITY_CASES

PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def rewarder(cache_dir):
    return create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", dtype="float32",
                           experts={**NO_DEFAULTS, "hpsv3": {"checkpoint": "tiny"}})


@pytest.fixture(scope="module")
def expert(rewarder):
    return rewarder.experts["hpsv3"]


def test_smart_resize_keeps_the_budget_and_the_aspect():
    assert H.smart_resize(1024, 1024, H.PIXELS, H.PIXELS) == (448, 448)
    assert H.smart_resize(200, 300, H.PIXELS, H.PIXELS) == (392, 560)  # enlarged: ceil, may overshoot the budget
    assert H.smart_resize(900, 1600, H.PIXELS, H.PIXELS) == (308, 588)  # shrunk: floor, under the budget
    with pytest.raises(InvalidImageError, match="200:1"):
        H.smart_resize(10, 2010, H.PIXELS, H.PIXELS)
    # the canvas holds the worst case the budget allows: a 200:1 strip enlarged (checked on a grid of them)
    worst = max(math.prod(H.smart_resize(h, h * r, H.PIXELS, H.PIXELS)) // 784 for h in (1, 3, 7, 30) for r in (1, 50, 199, 200))
    assert worst <= H.max_blocks(H.PIXELS, H.PIXELS)


@pytest.mark.parametrize("hw", [(200, 300), (640, 480), (60, 1800), (448, 448)])
def test_packing_is_lossless(hw):
    pre = H.HPSv3Preprocess(28 * 23)
    h, w = H.smart_resize(*hw, H.PIXELS, H.PIXELS)
    x = torch.randn(2, 3, h, w)
    canvas = pre._pack(x)
    assert canvas.shape == (2, 3, 644, 644)
    blocks, grids = pre.unpack(canvas)
    assert grids == [(h // 28, w // 28)] * 2
    back = blocks[0].reshape(h // 28, w // 28, 3, 28, 28).permute(2, 0, 3, 1, 4).reshape(3, h, w)
    assert torch.equal(back, x[0])
    with pytest.raises(InvalidImageError, match="not a packed"):
        pre.unpack(torch.zeros(1, 3, 644, 644))


def test_patches_match_transformers_qwen2vl_image_processor():
    """Our patch rows are the processor's, value for value, for an image already at the budget's size."""
    from transformers import Qwen2VLImageProcessor

    im = smooth_image(3, 224, 896)  # at the budget already: HPSv3 does not resize it
    proc = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    want = proc(images=[im], return_tensors="pt")
    pre = H.HPSv3Preprocess(28 * 23)
    blocks, grids = pre.unpack(pre.pil([im]))
    assert want["image_grid_thw"].tolist() == [[1, 2 * grids[0][0], 2 * grids[0][1]]]
    assert torch.allclose(H.patches(blocks[0]), want["pixel_values"], atol=1e-6)


def test_tiny_scores_batch_extras_and_prompts(rewarder, images):
    result = rewarder.score(PROMPT, images)
    assert list(result.component_rewards) == ["hpsv3"] and result.experts["hpsv3"]["random_weights"] is True
    mu = [s.components["hpsv3"] for s in result.images]
    sigma = [s.extras["hpsv3.sigma"] for s in result.images]
    assert all(np.isfinite(mu)) and all(s > 0 for s in sigma)
    assert max(mu) - min(mu) > 1e-3  # depends on the image ...
    single = [rewarder.score(PROMPT, [im]).images[0].components["hpsv3"] for im in images]
    assert mu == pytest.approx(single, rel=1e-5, abs=1e-6)  # batching (right padding, mixed grids) changes nothing
    other = [s.components["hpsv3"] for s in rewarder.score("a blue car at night", images).images]
    assert max(abs(a - b) for a, b in zip(mu, other)) > 1e-5  # ... and on the prompt
    mixed = rewarder.score([PROMPT, "a blue car at night"], images[:2]).images
    assert mixed[0].components["hpsv3"] == pytest.approx(mu[0], rel=1e-5)
    assert mixed[1].components["hpsv3"] == pytest.approx(other[1], rel=1e-5)


def test_expert_reads_mu_and_log_sigma_at_the_reward_token(expert):
    im = smooth_image(5, 300, 200)
    pixels = expert.preprocess.pil([im])
    out = expert(pixels, [PROMPT])
    mu, log_sigma = expert.predict(pixels, [PROMPT])
    assert torch.equal(out.scores, mu) and torch.allclose(out.extras["sigma"], log_sigma.exp())
    ids = expert.input_ids(PROMPT, 12 * 20)
    assert ids.count(expert.reward_id) == 1 and ids.count(expert.image_id) == 240


@pytest.mark.parametrize("prompt", ["best <|Reward|> ever", "an <|image_pad|> here", "<|im_end|>"])
def test_prompts_with_special_tokens_are_refused(rewarder, images, prompt):
    with pytest.raises(InvalidRequestError, match="special token"):
        rewarder.score(prompt, images[:1])


def test_gradient_reaches_the_pixels(expert):
    x = torch.rand(2, 3, 96, 80, requires_grad=True)
    mu, _ = expert.predict(expert.preprocess.tensor(x), [PROMPT, PROMPT])
    mu.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the tensor path's resize is torch's, close to PIL's: the scores are near the PIL path's
    im = Image.fromarray((x[0].detach().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    via_pil = expert.predict(expert.preprocess.pil([im]), [PROMPT])[0]
    via_u8 = expert.predict(expert.preprocess.uint8((x[:1].detach() * 255).round().to(torch.uint8)), [PROMPT])[0]
    assert via_u8.item() == pytest.approx(via_pil.item(), rel=2e-2)


def test_config_and_checkpoint_errors(cache_dir, tmp_path):
    with pytest.raises(ValueError, match="min_pixels"):
        H.HPSv3Config(min_pixels=300000, max_pixels=200704)
    with pytest.raises(ValueError, match="dtype"):
        H.HPSv3Config(dtype="int8")
    tiny = H.resolve_checkpoint("tiny", H.CHECKPOINT_FILE, "x", ("hpsv3", H.build_tiny, cache_dir)).path
    sd = load_file(str(tiny))
    headless = {k: v for k, v in sd.items() if not k.startswith("rm_head.")}
    save_file(headless, str(tmp_path / "headless.safetensors"))
    base = str(tiny.parent / H.BASE_FOLDER)
    with pytest.raises(ModelLoadError, match="not an HPSv3 checkpoint"):
        create_rewarder(profile="tiny", cache_dir=cache_dir, experts={
            **NO_DEFAULTS, "hpsv3": {"checkpoint": str(tmp_path / "headless.safetensors"), "base": base}})
    extra = {**sd, "rm_head.9.weight": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected"):
        create_rewarder(profile="tiny", cache_dir=cache_dir, experts={
            **NO_DEFAULTS, "hpsv3": {"checkpoint": str(tmp_path / "extra.safetensors"), "base": base}})
    # the released file through a local path and its base folder loads like 'tiny'
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, experts={**NO_DEFAULTS, "hpsv3": {"checkpoint": str(tiny), "base": base}})
    assert r.experts["hpsv3"].random_weights is False


# ----------------------------------------------------------------------------------------------
# parity with the hpsv3 package (1.0.0, transformers 4.45.2) in its own environment

# PARITY_CASES' modes and odd sizes, plus one enlarged well past the budget and a long strip
HPSV3_CASES = PARITY_CASES + [("small.png", "RGB", (37, 61)), ("strip.png", "RGB", (90, 1500))]


@pytest.mark.slow
def test_hpsv3_parity(cache_dir, tmp_path, rewarder):
    script, python = reference.script("hpsv3/ref_hpsv3.py"), reference.python("hpsv3")
    paths = []
    for i, (name, mode, (h, w)) in enumerate(HPSV3_CASES):
        im = smooth_image(20 + i, h, w)
        im = im.convert(mode) if mode != "P" else im.convert("P", palette=1)
        if mode == "RGBA":
            im.putalpha(smooth_image(60, h, w).convert("L"))
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    ckpt = H.resolve_checkpoint("tiny", H.CHECKPOINT_FILE, "x", ("hpsv3", H.build_tiny, cache_dir)).path
    want = reference.scores(python, script, "score", ckpt, ckpt.parent / H.BASE_FOLDER, LONG_PROMPT, *paths)
    result = rewarder.score(LONG_PROMPT, paths).images
    ours = [(s.components["hpsv3"], math.log(s.extras["hpsv3.sigma"])) for s in result]
    rel = max(abs(a - r) / abs(r) for o, w in zip(ours, want) for a, r in zip(o, w))
    print(f"hpsv3 parity: largest relative difference {rel:.3g} (mu and log sigma, {len(paths)} images)")
    mus = [w[0] for w in want]
    assert max(mus) - min(mus) > 1e-2 * max(map(abs, mus))  # the images really score differently
    assert rel <= 5e-5, (ours, want)

"""The PickScore, HPSv2 and CLIP-score experts, and the QuickGELU rule of the shared CLIP backbone.

Fast tests use the tiny models (built once into the session cache). The parity tests compare our scores
with the reference implementations on random full-size weights in the released formats (docs/parity.md;
tests/reference.py finds the reference, or skips, or under T2I_REQUIRE_REFERENCES=1 fails).
"""

import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_reward.rewarders import ModelLoadError, create_rewarder
from t2i_reward.rewarders.checkpoints import resolve_checkpoint

from . import reference
from .conftest import smooth_image

NEW = ["pickscore", "hpsv2", "clip_score"]
TINY_CFG = {"pickscore": {"checkpoint": "tiny"}, "hpsv2": {"checkpoint": "tiny"}, "clip_score": {"clip": "tiny"}}
LONG_PROMPT = (
    "a majestic castle on a hill at sunset, highly detailed digital painting, trending on artstation, by greg "
    "rutkowski and alphonse mucha, volumetric lighting, 8k, unreal engine, octane render, sharp focus, with a "
    "moat, a drawbridge, banners in the wind, a dragon circling the highest tower and crowds in the courtyard, "
    "knights on horseback crossing a stone bridge over a river, misty mountains and a pine forest behind, golden "
    "light through the clouds, birds in the sky, fishing boats on the lake"
)
NO_DEFAULTS = {"imagereward": None, "aesthetic": None, "mlp": None}


def only(cache_dir, name, cfg=None, **kw):
    """A rewarder with the one expert `name` (tiny profile's cache and settings)."""
    return create_rewarder(profile="tiny", cache_dir=cache_dir, experts={**NO_DEFAULTS, name: cfg or TINY_CFG[name]}, **kw)


def scores(rewarder, name, prompt, images):
    return [s.components[name] for s in rewarder.score(prompt, images).images]


@pytest.fixture(scope="module")
def tiny_experts(cache_dir):
    return {name: only(cache_dir, name) for name in NEW}


@pytest.mark.parametrize("name", NEW)
def test_tiny_expert_scores(tiny_experts, name, images):
    r = tiny_experts[name]
    result = r.score("a red apple", images)
    assert list(result.component_rewards) == [name] and all(list(s.components) == [name] for s in result.images)
    assert result.experts[name]["random_weights"] is True
    batch = [s.components[name] for s in result.images]
    assert all(np.isfinite(batch))
    assert batch == scores(r, name, "a red apple", images)  # deterministic
    single = [scores(r, name, "a red apple", [im])[0] for im in images]
    assert batch == pytest.approx(single, rel=1e-5, abs=1e-6)  # batching changes nothing
    assert max(batch) - min(batch) > 1e-4  # depends on the image ...
    other = scores(r, name, "a blue car at night", images)
    assert max(abs(a - b) for a, b in zip(batch, other)) > 1e-5  # ... and on the prompt


@pytest.mark.parametrize("name", NEW)
def test_prompts_are_truncated_at_77_tokens(tiny_experts, name, images):
    from open_clip.tokenizer import SimpleTokenizer

    assert len(SimpleTokenizer().encode(LONG_PROMPT)) + 2 > 77  # with the start and end tokens
    r = tiny_experts[name]
    a = scores(r, name, LONG_PROMPT, images[:2])
    b = scores(r, name, LONG_PROMPT + " and many more words that fall after the cut", images[:2])
    assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("name", NEW)
def test_differentiable_path_matches_and_has_gradients(tiny_experts, name):
    r = tiny_experts[name]
    im = smooth_image(3, 230, 301)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    s = r(x, "a red apple")
    s.total.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # the tensor path is the PIL path in torch (8-bit rounding apart)
    assert float(s.components[name][0].detach()) == pytest.approx(scores(r, name, "a red apple", [im])[0], abs=2e-2)


def test_pickscore_without_logit_scale_is_the_cosine(cache_dir, images, tiny_experts):
    r = only(cache_dir, "pickscore", {"checkpoint": "tiny", "logit_scale": False})
    e = tiny_experts["pickscore"].experts["pickscore"]
    want = [s / e.logit_scale for s in scores(tiny_experts["pickscore"], "pickscore", "a cat", images)]
    got = scores(r, "pickscore", "a cat", images)
    assert got == pytest.approx(want, rel=1e-5) and all(-1 <= g <= 1 for g in got)


def test_hpsv2_letterboxes_every_shape(tiny_experts):
    """Long side to 224, zero padding, no crop: a wide image keeps its whole width."""
    from t2i_reward.rewarders.experts.hpsv2 import HPSPreprocess

    pre = tiny_experts["hpsv2"].experts["hpsv2"].preprocess
    assert isinstance(pre, HPSPreprocess)
    for h, w in [(224, 100), (300, 301), (40, 700), (90, 100)]:
        x = pre.pil([smooth_image(1, h, w)])
        assert x.shape == (1, 3, 224, 224)
        black = -torch.tensor(pre.mean) / torch.tensor(pre.std)
        if w >= 2 * h:  # padded rows above and below are black after normalisation
            assert torch.allclose(x[0, :, 0, :], black[:, None].expand(3, 224))
    scores(tiny_experts["hpsv2"], "hpsv2", "a cat", [smooth_image(2, 224, 100)])


def test_local_files_and_folders_load_like_tiny(cache_dir, images, tiny_experts):
    from t2i_reward.rewarders.clip import TINY_CLIP_WEIGHTS, build_tiny_clip
    from t2i_reward.rewarders.experts.hpsv2 import CHECKPOINT_FILE, V2_FILE, HPSv2Expert
    from t2i_reward.rewarders.experts.pickscore import PickScoreExpert

    pick = resolve_checkpoint("tiny", "config.json", "PickScore", ("pickscore", PickScoreExpert.build_tiny, cache_dir)).path.parent
    hps = resolve_checkpoint("tiny", CHECKPOINT_FILE, "HPSv2", ("hpsv2", HPSv2Expert.build_tiny, cache_dir)).path
    clip = resolve_checkpoint("tiny", TINY_CLIP_WEIGHTS, "CLIP", ("clip", build_tiny_clip, cache_dir)).path
    v2_dir = hps.parent.parent / "hps-v2.0-only"
    v2_dir.mkdir(exist_ok=True)
    shutil.copy(hps, v2_dir / V2_FILE)
    local = {
        "pickscore": [{"checkpoint": str(pick), "processor": str(pick)}, {"checkpoint": str(pick / "model.safetensors"), "processor": str(pick)}],
        "hpsv2": [{"checkpoint": str(hps)}, {"checkpoint": str(hps.parent)}, {"checkpoint": str(v2_dir)}],
        "clip_score": [{"clip": f"t2i-reward-tiny-clip/{clip}"}],
    }
    for name, cfgs in local.items():
        want = scores(tiny_experts[name], name, "a cat", images)
        for cfg in cfgs:
            r = only(cache_dir, name, cfg)
            assert r.experts[name].random_weights is False
            assert scores(r, name, "a cat", images) == pytest.approx(want, abs=1e-6), cfg


def test_missing_checkpoints_name_the_problem(cache_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="yuvalkirstain/PickScore_v1"):
        only(cache_dir, "pickscore", {"checkpoint": "yuvalkirstain/PickScore_v1", "processor": "tiny"})
    with pytest.raises(ModelLoadError, match="no such file"):
        only(cache_dir, "hpsv2", {"checkpoint": str(tmp_path / "HPS_v2.1_compressed.pt")})
    torch.save({"state_dict": {"x": torch.zeros(2)}}, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="not an HPSv2 checkpoint"):
        only(cache_dir, "hpsv2", {"checkpoint": str(tmp_path / "bad.pt")})


def test_clip_experts_share_one_image_pass(cache_dir, images, monkeypatch):
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"imagereward": None, "clip_score": {"clip": "tiny"}})
    assert set(r.experts) == {"aesthetic", "mlp", "clip_score"} and len(r.clips) == 1
    clip = next(iter(r.clips.values()))
    calls = []
    real = clip.encode_images
    monkeypatch.setattr(clip, "encode_images", lambda px: calls.append(len(px)) or real(px))
    r.score("a cat", images)
    assert calls == [len(images)]


def test_bfloat16_gives_no_tied_scores(cache_dir):
    """Scores are computed in float32 from bfloat16 embeddings: 16 distinct images get 16 distinct scores."""
    experts = {**TINY_CFG, "imagereward": None, "mlp": None, "aesthetic": {"clip": "tiny", "head": "tiny"}}
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, dtype="bfloat16", device="cpu", experts=experts)
    ims = [smooth_image(100 + i, 180 + 7 * i, 240) for i in range(16)]
    result = r.score("a red apple on a wooden table", ims)
    for name in experts:
        if experts[name] is not None:
            got = [s.components[name] for s in result.images]
            assert len(set(got)) == 16, (name, got)


# ----------------------------------------------------------------------------------------------
# QuickGELU: OpenAI's weights must never run on GELU

def _tiny_clip_model(cache_dir, quick_gelu: bool):
    import open_clip
    from t2i_reward.rewarders.clip import TINY_CLIP_NAME

    only(cache_dir, "clip_score")  # registers the tiny CLIP's open_clip config
    torch.manual_seed(5)
    return open_clip.create_model(TINY_CLIP_NAME, pretrained=None, force_quick_gelu=quick_gelu).eval()


def _embeds(model, x):
    with torch.no_grad():
        return model.encode_image(x)


def test_openai_format_files_build_quickgelu(cache_dir, tmp_path):
    from t2i_reward.rewarders.clip import TINY_CLIP_NAME, ClipBackbone, quick_gelu_for

    model = _tiny_clip_model(cache_dir, quick_gelu=True)
    sd = model.state_dict()
    for k, v in sd.items():  # OpenAI's clip.model.convert_weights: linear weights and projections in float16
        if v.ndim == 2 or k in ("text_projection", "visual.proj"):
            sd[k] = v.half()
    torch.save(sd, tmp_path / "openai.pt")
    model.load_state_dict(sd)  # the float16-rounded weights, as every loader sees them
    x = torch.randn(2, 3, 224, 224)
    want = _embeds(model, x)
    gelu = _tiny_clip_model(cache_dir, quick_gelu=False)
    gelu.load_state_dict(sd)
    assert (_embeds(gelu, x) - want).abs().max() > 1e-3  # the activation matters with these weights

    fp16 = ClipBackbone(f"{TINY_CLIP_NAME}/{tmp_path / 'openai.pt'}", cache_dir, torch.device("cpu"), torch.float32)
    assert fp16.quick_gelu
    assert torch.allclose(_embeds(fp16.model, x), want, atol=1e-5)

    torch.jit.script(model).save(str(tmp_path / "openai_jit.pt"))  # OpenAI's release is a TorchScript archive
    jit = ClipBackbone(f"{TINY_CLIP_NAME}/{tmp_path / 'openai_jit.pt'}", cache_dir, torch.device("cpu"), torch.float32)
    assert jit.quick_gelu
    assert torch.allclose(_embeds(jit.model, x), want, atol=1e-5)

    torch.save(gelu.float().state_dict(), tmp_path / "laion.pt")  # float32, open_clip's own format: GELU as named
    assert not ClipBackbone(f"{TINY_CLIP_NAME}/{tmp_path / 'laion.pt'}", cache_dir, torch.device("cpu"), torch.float32).quick_gelu

    # open_clip 3 builds GELU for ViT-L-14 + the 'openai' tag (it only warns); we build QuickGELU
    assert quick_gelu_for("ViT-L-14", "openai")[0] and quick_gelu_for("ViT-L-14-quickgelu", None)[0]
    assert not quick_gelu_for("ViT-H-14", "laion2b_s32b_b79k")[0]


# ----------------------------------------------------------------------------------------------
# parity with the reference implementations (random full-size weights in the released formats)

# odd sizes and every mode that takes its own path (the RGB path runs through the JPEG and WebP files)
PARITY_CASES = [("rgba.png", "RGBA", (401, 257)), ("grey.png", "L", (250, 250)), ("palette.png", "P", (300, 451)),
                ("photo.jpg", "RGB", (333, 517)), ("photo.webp", "RGB", (199, 301))]


@pytest.fixture(scope="module")
def parity_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity-images")
    for i, (name, mode, (h, w)) in enumerate(PARITY_CASES):
        im = smooth_image(20 + i, h, w)
        im = im.convert(mode) if mode != "P" else im.convert("P", palette=1)
        if mode == "RGBA":
            im.putalpha(smooth_image(60, h, w).convert("L"))
        im.save(folder / name)
    return [folder / name for name, _, _ in PARITY_CASES]


def _assert_parity(ours: list[float], reference: list[float]) -> None:
    """Within 5e-5 of the scores' scale (the largest |reference score|): random weights put some cosines
    near zero, where a relative error of each value means nothing."""
    scale = max(abs(r) for r in reference)
    diff = max(abs(a - b) for a, b in zip(ours, reference))
    print(f"parity: max |ours - reference| = {diff:.3g} ({diff / scale:.3g} of the scale {scale:.4g})")
    assert max(reference) - min(reference) > 1e-3 * scale  # the images really score differently
    assert diff <= 5e-5 * scale, (ours, reference)


@pytest.mark.slow
def test_pickscore_parity(cache_dir, parity_images):
    script = reference.script("pickscore/ref_pickscore.py")  # the model card's arithmetic runs in our own environment
    ckpt = reference.checkpoint("pickscore", 4, sys.executable, script)
    want = reference.scores(sys.executable, script, "score", ckpt, LONG_PROMPT, *parity_images)
    r = only(cache_dir, "pickscore", {"checkpoint": str(ckpt), "processor": str(ckpt)}, device="cpu", dtype="float32")
    _assert_parity(scores(r, "pickscore", LONG_PROMPT, parity_images), want)


@pytest.mark.slow
def test_hpsv2_parity(cache_dir, parity_images, tmp_path):
    script, python = reference.script("hpsv2/ref_hpsv2.py"), reference.python("hpsv2")
    ckpt = reference.checkpoint("hpsv2_random.pt", 4, python, script)
    # hpsv2 1.2.0 keeps RGBA images RGBA and its conv then fails on 4 channels; its normalisation keeps the
    # RGB channels as they are, so the reference scores the RGBA file with its alpha dropped
    ref_files = []
    for p in parity_images:
        im = Image.open(p)
        if im.mode == "RGBA":
            p = tmp_path / "rgba-alpha-dropped.png"
            im.convert("RGB").save(p)
        ref_files.append(p)
    want = reference.scores(python, script, "score", ckpt, LONG_PROMPT, *ref_files)
    r = only(cache_dir, "hpsv2", {"checkpoint": str(ckpt)}, device="cpu", dtype="float32")
    _assert_parity(scores(r, "hpsv2", LONG_PROMPT, parity_images), want)


@pytest.mark.slow
def test_clip_score_and_aesthetic_parity_on_a_local_openai_file(cache_dir, parity_images):
    """image-reward 1.5's CLIP and Aesthetic scorers on OpenAI's ViT-L/14 format; ours reads the same
    local file through `ViT-L-14//path`, which must build QuickGELU, and shares one CLIP pass."""
    script, python = reference.script("imagereward/ref_scores.py"), reference.python("imagereward")
    folder = reference.checkpoint("irscores", 3, python, script)
    want = {name: reference.scores(python, script, "score", name, folder, LONG_PROMPT, *parity_images)
            for name in ("CLIP", "Aesthetic")}
    clip = f"ViT-L-14/{folder / 'ViT-L-14.pt'}"
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", dtype="float32", experts={
        "imagereward": None, "mlp": None, "clip_score": {"clip": clip},
        "aesthetic": {"clip": clip, "head": str(folder / "sac%2Blogos%2Bava1-l14-linearMSE.pth")}})
    assert len(r.clips) == 1 and next(iter(r.clips.values())).quick_gelu
    result = r.score(LONG_PROMPT, parity_images).images
    _assert_parity([s.components["clip_score"] for s in result], want["CLIP"])
    _assert_parity([s.components["aesthetic"] for s in result], want["Aesthetic"])

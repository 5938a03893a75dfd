import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from t2i_reward.rewarders import InvalidRequestError, ModelLoadError, create_rewarder
from t2i_reward.rewarders.experts.blip_score import (
    CHECKPOINT_FILE,
    BlipScoreExpert,
    BlipScoreModel,
    read_blip_state_dict,
)
from t2i_reward.rewarders.experts.diversity import DiversityExpert
from t2i_reward.rewarders.experts.imagereward import ImageRewardArch

from . import reference
from .conftest import smooth_image

LONG_PROMPT = (
    "a majestic castle on a hill at sunset, highly detailed digital painting, trending on artstation, "
    "by greg rutkowski and alphonse mucha, volumetric lighting, 8k, unreal engine, octane render, sharp focus"
)
NO_OTHERS = {"imagereward": None, "aesthetic": None, "mlp": None}
TINY_BLIP = {"checkpoint": "tiny", "tokenizer": "packaged"}


def tiny_blip_file(cache_dir) -> Path:
    from t2i_reward.rewarders.checkpoints import resolve_checkpoint

    return resolve_checkpoint("tiny", CHECKPOINT_FILE, "BLIP", ("blip_score", BlipScoreExpert.build_tiny, cache_dir)).path


def blip(cache_dir, spec="tiny"):
    return create_rewarder(profile="tiny", cache_dir=cache_dir, experts={**NO_OTHERS, "blip_score": {**TINY_BLIP, "checkpoint": spec}})


@pytest.fixture(scope="module")
def blip_only(cache_dir):
    return blip(cache_dir)


@pytest.fixture(scope="module")
def diverse(cache_dir):
    """Diversity beside the aesthetic expert, on the one tiny CLIP they share."""
    return create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"imagereward": None, "mlp": None, "diversity": {"clip": "tiny"}})


def scores(result, name):
    return [s.components[name] for s in result.images]


# ----------------------------------------------------------------------------------------------
# blip_score

def test_tiny_blip_file_is_in_the_released_format(cache_dir):
    sd = read_blip_state_dict(tiny_blip_file(cache_dir))
    with torch.device("meta"):
        needed = BlipScoreModel(ImageRewardArch()).state_dict()
    generic = {re.sub(r"\.\d+\.", ".N.", k) for k in sd}
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in needed} <= generic | {"text_encoder.embeddings.position_ids"}
    # what the score does not read is there too, and is left alone
    assert {"image_queue", "vision_proj_m.weight", "itm_head.weight", "text_decoder.cls.predictions.bias"} <= set(sd)
    assert "text_encoder.encoder.layer.N.crossattention.self.key.weight" in generic
    assert not any("crossattention" in k for k in needed)
    model = BlipScoreModel.from_state_dict(sd)
    assert (model.arch.vision_width, model.arch.text_width, model.arch.vocab_size, model.arch.proj_dim) == (128, 64, 30524, 16)


def test_blip_scores_are_cosines_of_image_and_prompt(blip_only, images):
    batch = scores(blip_only.score("a red apple", images), "blip_score")
    single = [scores(blip_only.score("a red apple", [im]), "blip_score")[0] for im in images]
    assert batch == pytest.approx(single, abs=1e-6)
    assert all(-1 <= s <= 1 for s in batch) and max(batch) - min(batch) > 1e-3
    other = scores(blip_only.score("a blue car at night", images), "blip_score")
    assert max(abs(a - b) for a, b in zip(batch, other)) > 1e-3
    # several prompts in one pooled call: each image against its own prompt
    mixed = blip_only.score_many([("a red apple", images[:2]), ("a blue car at night", images[2:])])
    assert scores(mixed[0], "blip_score") + scores(mixed[1], "blip_score") == pytest.approx(batch[:2] + other[2:], abs=1e-6)


def test_blip_prompts_are_truncated_at_35_tokens(blip_only, images):
    assert len(blip_only.experts["blip_score"].tokenizer(LONG_PROMPT)["input_ids"]) > 35
    a = scores(blip_only.score(LONG_PROMPT, images[:2]), "blip_score")
    b = scores(blip_only.score(LONG_PROMPT + " and many more words after the cut", images[:2]), "blip_score")
    assert a == pytest.approx(b, abs=1e-7)


def test_blip_checkpoint_specs(cache_dir, images, tmp_path):
    path = tiny_blip_file(cache_dir)
    reference = scores(blip(cache_dir, str(path)).score("a cat", images[:2]), "blip_score")
    for spec in (str(path.parent), path.as_uri()):  # a directory, a URL (downloaded into the cache once)
        assert scores(blip(cache_dir, spec).score("a cat", images[:2]), "blip_score") == reference
    with pytest.raises(ModelLoadError, match="no such file"):
        blip(cache_dir, str(tmp_path / "missing.pth"))
    with pytest.raises(ModelLoadError, match="could not download"):
        blip(cache_dir, (tmp_path / "nowhere" / "model_large.pth").as_uri())
    plain = tmp_path / "plain.pth"
    torch.save(read_blip_state_dict(path), plain)  # a bare state dict, not {'model': ...}
    with pytest.raises(ModelLoadError, match="expected {'model': state_dict}"):
        blip(cache_dir, str(plain))
    sd = read_blip_state_dict(path)
    del sd["text_proj.weight"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(ModelLoadError, match="lacks 1 tensors"):
        blip(cache_dir, str(tmp_path / "partial.pth"))


# ----------------------------------------------------------------------------------------------
# diversity

def test_diversity_is_the_mean_cosine_distance_to_the_other_images(diverse, images):
    res = diverse.score("a cat", images)
    clip = next(iter(diverse.clips.values()))
    with torch.inference_mode():
        e = clip.encode_images(clip.preprocess.pil(images))
    expected = [float(sum(1 - e[i] @ e[j] for j in range(4) if j != i) / 3) for i in range(4)]
    assert scores(res, "diversity") == pytest.approx(expected, abs=1e-6)
    assert res.component_rewards["diversity"] == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_diversity_groups_by_request_not_by_batch(cache_dir, diverse, images):
    alone = [scores(diverse.score("a cat", images[:2]), "diversity"), scores(diverse.score("a cat", images[2:]), "diversity")]
    pooled = diverse.score_many([("a cat", images[:2]), ("a cat", images[2:])])  # same prompt, still two requests
    assert [scores(r, "diversity") for r in pooled] == [pytest.approx(a, abs=1e-6) for a in alone]
    whole = scores(diverse.score("a cat", images), "diversity")
    small_batches = create_rewarder(profile="tiny", cache_dir=cache_dir, max_batch_size=3,
                                    experts={"imagereward": None, "mlp": None, "diversity": {"clip": "tiny"}})
    calls = Counter()
    res = small_batches.score("a cat", images, on_timing=lambda name, s: calls.update([name]))
    assert scores(res, "diversity") == pytest.approx(whole, abs=1e-6)  # a request split over two batches
    assert calls == Counter({"clip:tiny": 2, "aesthetic": 2, "diversity": 1})  # the CLIP pass is shared


def test_one_image_is_refused(diverse, images):
    with pytest.raises(InvalidRequestError, match="needs at least 2 images per request"):
        diverse.score("a cat", images[:1])
    with pytest.raises(InvalidRequestError, match="needs at least 2 images"):
        diverse.score_many([("a cat", images[:2]), ("a dog", images[2:3])])
    with pytest.raises(InvalidRequestError, match="needs at least 2 images"):
        diverse(torch.rand(1, 3, 64, 64), "a cat")


def test_ig_rewarding_variant():
    expert = DiversityExpert("tiny", None, True, "ig_rewarding")
    orthogonal = torch.eye(4, 8)
    assert expert(None, ["p"] * 4, orthogonal).tolist() == pytest.approx([1.0] * 4)  # D = 1: kept as is
    same = torch.ones(3, 8)
    assert expert(None, ["p"] * 3, same).tolist() == pytest.approx([math.log(1e-4)] * 3, abs=1e-3)  # -9.21
    near = torch.tensor([[1.0, 0.0], [0.95, math.sqrt(1 - 0.95**2)]])  # cosine distance 0.05
    d = 1 - (near[0] @ near[1]).item()
    assert d < 0.1 and expert(None, ["p"] * 2, near).tolist() == pytest.approx([math.log(d + 1e-4)] * 2, rel=1e-5)
    per_image = DiversityExpert("tiny", None, True, "per_image")
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert per_image(None, ["p"] * 3, three).tolist() == pytest.approx([0.5, 1.0, 0.5])


def test_diversity_has_gradients(diverse):
    x = torch.rand(3, 3, 80, 96, requires_grad=True)
    out = diverse(x, "a cat")
    out.components["diversity"].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------------------------
# parity of blip_score with the reference package (image-reward 1.5's load_score("BLIP"); docs/parity.md)


@pytest.mark.slow
def test_blip_parity_with_reference_package(tmp_path, cache_dir):
    script, python = reference.script("imagereward/ref_scores.py"), reference.python("imagereward")
    folder = reference.checkpoint("irscores", 3, python, script)
    files = []
    cases = [("rgba.png", "RGBA", (401, 257)), ("grey.png", "L", (250, 250)), ("palette.png", "P", (300, 451)),
             ("photo.jpg", "RGB", (480, 641)), ("photo.webp", "RGB", (199, 301))]
    for i, (name, mode, (h, w)) in enumerate(cases):
        im = smooth_image(10 + i, h, w)
        im = im.convert(mode) if mode != "P" else im.convert("P", palette=1)
        if mode == "RGBA":
            im.putalpha(smooth_image(50, h, w).convert("L"))
        im.save(tmp_path / name)
        files.append(str(tmp_path / name))
    want = reference.scores(python, script, "score", "BLIP", folder, LONG_PROMPT, *files)
    ours_model = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", dtype="float32",
                                 experts={**NO_OTHERS, "blip_score": {"checkpoint": str(folder / CHECKPOINT_FILE), "tokenizer": "packaged"}})
    ours = scores(ours_model.score(LONG_PROMPT, files), "blip_score")
    print(f"parity: max |ours / reference - 1| = {max(abs(a / b - 1) for a, b in zip(ours, want)):.3g}")
    assert max(want) - min(want) > 1e-2  # the images really score differently
    assert ours == pytest.approx(want, rel=5e-5)

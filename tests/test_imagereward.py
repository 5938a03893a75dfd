import re
from pathlib import Path

import pytest
import torch
from t2i_reward.rewarders import ModelLoadError, create_rewarder
from t2i_reward.rewarders.experts.imagereward import ImageRewardArch, ImageRewardModel, read_state_dict

from . import reference
from .conftest import smooth_image

LONG_PROMPT = (
    "a majestic castle on a hill at sunset, highly detailed digital painting, trending on artstation, "
    "by greg rutkowski and alphonse mucha, volumetric lighting, 8k, unreal engine, octane render, sharp focus"
)


def tiny_checkpoint(cache_dir) -> Path:
    """The tiny ImageReward.pt, through the one resolver every checkpoint spec goes through."""
    from t2i_reward.rewarders.checkpoints import resolve_checkpoint
    from t2i_reward.rewarders.experts.imagereward import CHECKPOINT_FILE, ImageRewardExpert

    return resolve_checkpoint("tiny", CHECKPOINT_FILE, "ImageReward", ("imagereward", ImageRewardExpert.build_tiny, cache_dir)).path


@pytest.fixture(scope="module")
def ir_only(cache_dir):
    return create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"aesthetic": None, "mlp": None})


def test_tiny_checkpoint_has_the_official_keys(cache_dir):
    tiny = read_state_dict(tiny_checkpoint(cache_dir))
    with torch.device("meta"):
        full = ImageRewardModel(ImageRewardArch()).state_dict()
    assert len(full) == 625  # the released ImageReward.pt holds 625 tensors
    # same names but for the layer count, and every tensor has the rank of its full-size twin
    assert set(tiny) <= set(full)
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in tiny} == {re.sub(r"\.\d+\.", ".N.", k) for k in full}
    assert all(tiny[k].ndim == full[k].ndim for k in tiny)
    assert full["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (768, 1024)
    assert full["mlp.layers.7.weight"].shape == (1, 16)


def test_architecture_is_read_from_the_checkpoint(cache_dir):
    arch = ImageRewardArch.from_state_dict(read_state_dict(tiny_checkpoint(cache_dir)))
    assert (arch.vision_width, arch.vision_depth, arch.text_width, arch.text_depth) == (128, 2, 64, 2)
    assert (arch.image_size, arch.patch_size, arch.vocab_size) == (224, 16, 30524)


def test_local_file_and_directory_load_the_same(cache_dir, images):
    path = tiny_checkpoint(cache_dir)
    scores = []
    for spec in (str(path), str(path.parent)):
        r = create_rewarder(
            profile="tiny", cache_dir=cache_dir, experts={"imagereward": {"checkpoint": spec}, "aesthetic": None, "mlp": None}
        )
        scores.append([s.components["imagereward"] for s in r.score("a cat", images).images])
    assert scores[0] == scores[1]


def test_missing_and_wrong_checkpoints_name_the_problem(cache_dir, tmp_path):
    def load(spec):
        return create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"imagereward": {"checkpoint": spec}})

    with pytest.raises(ModelLoadError, match="no such file"):
        load(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="has no ImageReward.pt"):
        load(str(tmp_path))
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(3)}, bad)
    with pytest.raises(ModelLoadError, match="not an ImageReward checkpoint"):
        load(str(bad))
    with pytest.raises(ModelLoadError, match="THUDM/ImageReward"):
        load("THUDM/ImageReward")  # the hub is unreachable in tests: a clear error, never random weights


def test_scores_are_deterministic_and_batch_invariant(ir_only, images):
    batch = [s.components["imagereward"] for s in ir_only.score("a red apple", images).images]
    single = [ir_only.score("a red apple", [im]).images[0].components["imagereward"] for im in images]
    assert batch == pytest.approx(single, abs=1e-5)
    assert max(batch) - min(batch) > 1e-3  # the score depends on the image
    other = [s.components["imagereward"] for s in ir_only.score("a blue car at night", images).images]
    assert max(abs(a - b) for a, b in zip(batch, other)) > 1e-4  # ... and on the prompt


def test_prompts_are_truncated_at_35_tokens(ir_only, images):
    tokens = ir_only.experts["imagereward"].tokenizer(LONG_PROMPT)["input_ids"]
    assert len(tokens) > 35
    a = ir_only.score(LONG_PROMPT, images[:2]).images
    b = ir_only.score(LONG_PROMPT + " and many more words that fall after the cut", images[:2]).images
    assert [s.total for s in a] == pytest.approx([s.total for s in b], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# parity with the reference package (image-reward 1.5; docs/parity.md)


@pytest.mark.slow
def test_parity_with_reference_package(tmp_path, cache_dir):
    script, python = reference.script("imagereward/ref_imagereward.py"), reference.python("imagereward")
    ckpt = reference.checkpoint("ir_random.pt", 2, python, script)
    files = []
    cases = [("rgb.png", "RGB", (333, 517)), ("rgba.png", "RGBA", (401, 257)), ("grey.png", "L", (250, 250)),
             ("palette.png", "P", (300, 451)), ("photo.jpg", "RGB", (480, 640)), ("photo.webp", "RGB", (199, 301)),
             ("small.png", "RGB", (90, 100))]
    for i, (name, mode, (h, w)) in enumerate(cases):
        im = smooth_image(10 + i, h, w)
        im = im.convert(mode) if mode != "P" else im.convert("P", palette=1)
        if mode == "RGBA":
            alpha = smooth_image(50, h, w).convert("L")
            im.putalpha(alpha)
        im.save(tmp_path / name)
        files.append(str(tmp_path / name))
    want = reference.scores(python, script, "score", ckpt, LONG_PROMPT, *files)
    ours_model = create_rewarder(
        profile="tiny", cache_dir=cache_dir, device="cpu", dtype="float32",
        experts={"imagereward": {"checkpoint": str(ckpt), "tokenizer": "packaged"}, "aesthetic": None, "mlp": None},
    )
    ours = [s.components["imagereward"] for s in ours_model.score(LONG_PROMPT, files).images]
    print(f"parity: max |ours - reference| = {max(abs(a - b) for a, b in zip(ours, want)):.3g}")
    assert max(want) - min(want) > 1e-3  # the images really score differently
    assert ours == pytest.approx(want, abs=5e-5)

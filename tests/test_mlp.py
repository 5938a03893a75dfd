import pytest
import torch
from t2i_reward.rewarders import ModelLoadError, create_rewarder
from t2i_reward.rewarders.clip import TINY_CLIP_CONFIG
from t2i_reward.rewarders.experts.mlp import MLPRewardConfig, MLPRewardModel


def test_thesis_architecture():
    m = MLPRewardModel(MLPRewardConfig())
    linears = [l for l in m.layers if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1536, 1024), (1024, 256), (256, 128), (128, 32), (32, 1)]
    assert [d.p for d in m.layers if isinstance(d, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    assert sum(isinstance(l, torch.nn.ReLU) for l in m.layers) == 4


def test_saved_checkpoint_loads_into_the_expert(tmp_path, cache_dir, images):
    torch.manual_seed(5)
    model = MLPRewardModel(MLPRewardConfig(clip="tiny", embed_dim=TINY_CLIP_CONFIG["embed_dim"], mean=0.5, std=2.0))
    out = model.save(tmp_path / "mlp")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    r = create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"imagereward": None, "aesthetic": None, "mlp": {"checkpoint": str(out)}})
    assert r.norm["mlp"] == (0.5, 2.0)  # the statistics stored with the checkpoint normalise it
    clip = next(iter(r.clips.values()))
    with torch.inference_mode():
        pixels = clip.preprocess.pil(images)
        expected = model.eval()(clip.encode_images(pixels), clip.encode_texts(["a cat"] * len(images)))
    got = [s.components["mlp"] for s in r.score("a cat", images).images]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)


def test_mismatched_clip_is_refused(tmp_path, cache_dir):
    MLPRewardModel(MLPRewardConfig(clip="tiny", embed_dim=48)).save(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="48-dim"):
        create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"mlp": {"checkpoint": str(tmp_path / "m")}})
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"mlp": {"checkpoint": str(tmp_path / "m")}})

import pytest
from t2i_reward.rewarders import (
    InvalidRequestError,
    ModelLoadError,
    create_rewarder,
    list_experts,
    list_profiles,
    load_config,
)


def test_registries():
    assert list(list_profiles()) == ["default", "light", "tiny", "random-full", "ig-rewarding"]
    # the built-ins first, in order (tests may register their own experts after them)
    assert list_experts()[:15] == ["imagereward", "aesthetic", "mlp", "blip_score", "diversity", "pickscore", "hpsv2", "clip_score",
                                   "vlm_judge", "ocr", "geneval", "hpsv3", "unified_reward", "pairwise_judge", "vqascore"]


def test_default_profile_names_the_published_checkpoints():
    cfg = load_config()
    assert cfg.profile == "default"
    assert cfg.experts["imagereward"].checkpoint == "THUDM/ImageReward"
    assert cfg.experts["imagereward"].tokenizer == "bert-base-uncased"
    assert cfg.experts["aesthetic"].clip == "ViT-L-14/openai"
    assert cfg.experts["aesthetic"].head.endswith("sac+logos+ava1-l14-linearMSE.pth")
    assert cfg.experts.get("mlp") is None
    # the rewards RL fine-tuning trains with, each normalised; aesthetic and CLIP score at half weight
    assert {n: e.weight for n, e in cfg.experts.items()} == {
        "imagereward": 1.0, "pickscore": 1.0, "hpsv2": 1.0, "clip_score": 0.5, "aesthetic": 0.5}
    assert cfg.normalize
    assert cfg.experts["pickscore"].checkpoint == "yuvalkirstain/PickScore_v1"
    assert cfg.experts["hpsv2"].checkpoint == "xswu/HPSv2/HPS_v2.1_compressed.pt"
    assert cfg.experts["clip_score"].clip == cfg.experts["aesthetic"].clip  # one shared CLIP pass
    light = load_config(profile="light")
    assert set(light.experts) == {"imagereward", "aesthetic"}


def test_yaml_then_environment(tmp_path, monkeypatch):
    path = tmp_path / "reward.yaml"
    path.write_text(
        "profile: tiny\nmax_batch_size: 4\nexperts:\n  aesthetic: {weight: 0.25}\n  mlp: null\n"
    )
    cfg = load_config(path)
    assert cfg.profile == "tiny" and cfg.max_batch_size == 4
    assert cfg.experts["aesthetic"].weight == 0.25 and cfg.experts["aesthetic"].clip == "tiny"  # profile value kept
    assert cfg.experts.get("mlp") is None
    monkeypatch.setenv("T2I_REWARD_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("T2I_REWARD_EXPERTS__AESTHETIC__WEIGHT", "0.5")
    cfg = load_config(path)
    assert cfg.max_batch_size == 3 and cfg.experts["aesthetic"].weight == 0.5
    assert cfg.experts["aesthetic"].head == "tiny"  # a nested env var overrides one field, not the whole expert


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(InvalidRequestError, match="unknown profile 'huge'"):
        load_config(profile="huge")
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        load_config(profile="tiny", max_batch_size=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts:\n  imagereward: {checkpoint: x, colour: red}\n")
    with pytest.raises(InvalidRequestError, match="colour"):
        load_config(bad)
    with pytest.raises(InvalidRequestError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_default_profile_offline_names_what_is_missing(cache_dir):
    with pytest.raises(ModelLoadError, match="THUDM/ImageReward"):
        create_rewarder(cache_dir=cache_dir)
    with pytest.raises(ModelLoadError, match="yuvalkirstain/PickScore_v1"):
        create_rewarder(cache_dir=cache_dir, experts={"imagereward": None})
    with pytest.raises(ModelLoadError, match="HPS_v2.1_compressed.pt"):
        create_rewarder(cache_dir=cache_dir, experts={"imagereward": None, "pickscore": None})
    with pytest.raises(ModelLoadError, match="ViT-L-14"):
        create_rewarder(cache_dir=cache_dir, profile="light", experts={"imagereward": None})
    with pytest.raises(ModelLoadError, match="'bert-base-uncased' has .* tokens|'bert-base-uncased' could not be loaded"):
        create_rewarder(cache_dir=cache_dir, profile="light", experts={"imagereward": {"checkpoint": "tiny"}, "aesthetic": None})


def test_no_experts_is_an_error(cache_dir):
    with pytest.raises(InvalidRequestError, match="no expert"):
        create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"imagereward": None, "aesthetic": None, "mlp": None})

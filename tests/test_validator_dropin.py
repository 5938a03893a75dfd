"""ig-rewarding's Validator, fed ig-rewarding's own config dicts (the shape of its baseline.yaml)."""

import copy
import math

import pytest
from t2i_reward.prompter.index import build_index
from t2i_reward.prompter.validator import Validator, ig_reward_config
from t2i_reward.rewarders import InvalidRequestError, create_rewarder, load_config
from t2i_reward.rewarders.registry import get_expert_class

PROMPTS = ["a snowy mountain landscape at dawn", "a cyberpunk city street at night, neon lights",
           "portrait of an old fisherman, oil painting", "a cute corgi puppy in a field of flowers",
           "an astronaut riding a horse on the moon", "a watercolor painting of a lighthouse at dusk"]


def entry(cls, weight, **params):
    return {"target": f"ig_rewarding.models.{cls}", "params": {"device": "cuda", **params}, "weight": weight}


# ig-rewarding's baseline.yaml as its users load it, with our tiny models named in the params
BASELINE = {
    "prompter": {"target": "ig_rewarding.models.PromptGenerator",
                 "params": {"chroma_db_config": {"root_path": "chroma_db/", "collection_name": "diffusiondb"}}},
    "rewarder": {"target": "ig_rewarding.models.TextToImageRewarder", "params": {"rewarder_configs": {
        "clip_aesthetic_rewarder": entry("CLIPAestheticRewardModel", 0.0125),
        "pick_rewarder": entry("PickRewardModel", 0.1, checkpoint="tiny"),
        "image_rewarder": entry("ImageRewardModel", 1, name="ImageReward-v1.0"),
        "hps_v2_rewarder": entry("HPSv2", 0.1, checkpoint="tiny"),
    }}},
}
PICKSCORE_WIRED = "logit_scale" in get_expert_class("pickscore").Config.model_fields


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompt-index")
    build_index(PROMPTS, out)
    return out


def without(config, *names):
    config = copy.deepcopy(config)
    for n in names:
        del config["rewarder"]["params"]["rewarder_configs"][n]
    return config


def test_imagereward_and_aesthetic_entries(cache_dir, images, index_dir):
    config = without(BASELINE, "pick_rewarder", "hps_v2_rewarder")
    v = Validator(config["rewarder"], config["prompter"], "cpu", profile="tiny", prompts_index=index_dir)
    assert set(v.rewarder.experts) == {"aesthetic", "imagereward"} and v.rewarder.config.normalize is False
    assert v.rewarder.weights == {"aesthetic": 0.0125, "imagereward": 1.0}
    mean, components = v.get_reward_score(images, "a castle at night")
    assert list(components) == ["clip_aesthetic_rewarder", "image_rewarder"]  # ig-rewarding's names, its order
    assert mean == pytest.approx(0.0125 * components["clip_aesthetic_rewarder"] + components["image_rewarder"], abs=1e-6)
    ours = create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"mlp": None}).score("a castle at night", images)
    assert components["image_rewarder"] == pytest.approx(ours.component_rewards["imagereward"], abs=1e-6)
    assert components["clip_aesthetic_rewarder"] == pytest.approx(ours.component_rewards["aesthetic"], abs=1e-6)
    prompts = v.generate_prompt(["mountains in the snow", "a dog"], 2)
    assert [len(p) for p in prompts] == [2, 2] and prompts[0][0] == PROMPTS[0]


def test_blip_and_diversity_entries(cache_dir, images, index_dir):
    rewarder = {"target": "ig_rewarding.models.TextToImageRewarder", "params": {"rewarder_configs": {
        "blip_rewarder": entry("BLIPRewardModel", 0.25, name="BLIP", checkpoint="tiny", tokenizer="packaged"),
        "diversity_rewarder": entry("DiversityRewardModel", 0.15, model="resnet18", pretrained=True, clip="tiny"),
    }}}
    # baseline.yaml's GPTPrompt, MagicPrompt named by its params (a tiny GPT-2 here), with the expansion
    gpt = {"target": "ig_rewarding.models.GPTPrompt", "params": {"model_name": "tiny", "device": "cuda", "fooocus_cfg": {
        "url": "https://huggingface.co/lllyasviel/misc/resolve/main/fooocus_expansion.bin", "device": "cuda"}}}
    v = Validator(rewarder, gpt, "cpu", profile="tiny", prompts_index=index_dir, prompt_expansion="tiny")
    assert v.rewarder.experts["diversity"].variant == "ig_rewarding"
    mean, c = v.get_reward_score(images, "a castle at night")
    assert mean == pytest.approx(0.25 * c["blip_rewarder"] + 0.15 * c["diversity_rewarder"], abs=1e-6)
    # the tiny CLIP embeds these images almost alike: below 0.1, the diversity is log(D + 1e-4)
    per_image = create_rewarder(profile="tiny", cache_dir=cache_dir,
                                experts={"imagereward": None, "aesthetic": None, "mlp": None, "diversity": {"clip": "tiny"}})
    d = per_image.score("a castle at night", images).component_rewards["diversity"]
    assert d < 0.1 and c["diversity_rewarder"] == pytest.approx(math.log(d + 1e-4), abs=1e-4)
    (generated,) = v.generate_prompt(["a lighthouse"], 3, seed=7)  # GPTPrompt: generated from the topic
    assert len(generated) == 3 and all(p.startswith("a lighthouse") for p in generated)
    assert all(p not in PROMPTS for p in generated) and generated == v.generate_prompt(["a lighthouse"], 3, seed=7)[0]
    assert any("," in p[len("a lighthouse"):] for p in generated)  # the expansion appended its words
    with pytest.raises(InvalidRequestError, match="at least 2 images"):
        v.get_reward_score(images[:1], "a castle")


def test_bad_ig_configs_are_clear_errors(cache_dir):
    rewarder = BASELINE["rewarder"]
    bad = copy.deepcopy(rewarder)
    bad["params"]["rewarder_configs"]["clip_interrogator_rewarder"] = entry("CLIPInterrogatorRewardModel", 0.15)
    with pytest.raises(InvalidRequestError, match="unknown target class 'CLIPInterrogatorRewardModel'; known: ImageRewardModel"):
        ig_reward_config(bad, profile="tiny")
    twice = copy.deepcopy(rewarder)
    twice["params"]["rewarder_configs"]["again"] = entry("ImageRewardModel", 1)
    with pytest.raises(InvalidRequestError, match="'image_rewarder' and 'again' both map to expert 'imagereward'"):
        ig_reward_config(twice, profile="tiny")
    with pytest.raises(InvalidRequestError, match="no params.rewarder_configs"):
        ig_reward_config({"target": "ig_rewarding.models.TextToImageRewarder", "params": {}})
    with pytest.raises(InvalidRequestError, match="unknown prompter class 'Chatbot'"):
        Validator(rewarder, {"target": "ig_rewarding.models.Chatbot"}, profile="tiny")


@pytest.mark.skipif(not PICKSCORE_WIRED, reason="the pickscore expert has no logit_scale field yet")
def test_the_whole_baseline(cache_dir, images, index_dir):
    v = Validator(BASELINE["rewarder"], BASELINE["prompter"], "cpu", profile="tiny", prompts_index=index_dir)
    mean, c = v.get_reward_score(images, "a castle at night")
    assert list(c) == ["clip_aesthetic_rewarder", "pick_rewarder", "image_rewarder", "hps_v2_rewarder"]
    expected = 0.0125 * c["clip_aesthetic_rewarder"] + 0.1 * c["pick_rewarder"] + c["image_rewarder"] + 0.1 * c["hps_v2_rewarder"]
    assert mean == pytest.approx(expected, abs=1e-6)
    assert all(-1 <= c[n] <= 1 for n in ("pick_rewarder", "hps_v2_rewarder"))  # raw cosines, as ig-rewarding computes them


@pytest.mark.skipif(not PICKSCORE_WIRED, reason="the pickscore expert has no logit_scale field yet")
def test_ig_rewarding_profile():
    config = load_config(profile="ig-rewarding")
    assert config.normalize is False
    assert {n: c.weight for n, c in config.experts.items()} == {"aesthetic": 0.0125, "pickscore": 0.1, "imagereward": 1.0, "hpsv2": 0.1}
    assert config.experts["pickscore"].logit_scale is False
    assert config.experts["hpsv2"].checkpoint.endswith("HPS_v2_compressed.pt")  # v2.0, as ig-rewarding loads

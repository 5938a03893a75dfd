import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from t2i_reward.rewarders import create_rewarder, load_config
from t2i_reward.rewarders.training import (
    PreferenceRecord,
    TrainRewardConfig,
    fit_weights,
    load_preference_data,
    preference_accuracy,
    preference_pairs,
    score_records,
    split_by_prompt,
    train_reward,
)
from t2i_reward.rewarders.training.evaluate import pair_differences, weighted_accuracy

from t2i_reward.cli import main

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220),
           "yellow": (235, 220, 30), "purple": (140, 30, 190), "orange": (245, 140, 20)}
# "{colour} {noun}": the random tiny CLIP text encoder keeps the colour word recognisable in this form
# (a linear probe finds it in 89% of held-out prompts; in longer phrasings it drowns)
NOUNS = ["cube", "ball", "car", "house", "tree", "bird", "cup", "flower", "chair", "boat", "kite", "hat"]


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """ImageRewardDB-format data: the preferred image is the one whose dominant colour the prompt names."""
    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    names = list(COLOURS)
    for p, noun in enumerate(NOUNS):
        for c, colour in enumerate(names):
            others = [names[(c + k) % len(names)] for k in (1, 2, 4)]
            gens = []
            for g, name in enumerate([colour] + others):
                base = np.array(COLOURS[name], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
                rel = f"images/{p}-{c}-{g}.png"
                Image.fromarray(img).save(root / rel)
                gens.append(rel)
            order = rng.permutation(4)  # shuffle so the best image is not always first
            rows.append({"id": f"{p}-{c}", "prompt": f"{colour} {noun}",
                         "generations": [gens[k] for k in order], "ranking": [[1, 2, 3, 3][k] for k in order]})
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


@pytest.fixture(scope="module")
def trained(colour_data, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    cfg = TrainRewardConfig(data=str(colour_data), out=out, clip="tiny", epochs=60, batch_size=32, lr=1e-3,
                            val_fraction=0.25, cache_dir=cache_dir)
    return cfg, train_reward(cfg, progress=False)


def test_pairs_and_split(colour_data):
    records = load_preference_data(str(colour_data))
    assert len(records) == 72 and all(len(r.images) == 4 for r in records)
    pairs = preference_pairs(records)
    assert len(pairs) == 72 * 5  # ranks 1,2,3,3: six pairs, one tie skipped
    assert preference_pairs([PreferenceRecord("x", ["a", "b", "c"], [2, 1, 2])]) == [(0, 1, 0), (0, 1, 2)]
    train, val = split_by_prompt(records, 0.25, seed=0)
    assert len(val) == 18 and not {r.prompt for r in train} & {r.prompt for r in val}


def test_trained_mlp_predicts_held_out_preferences(trained, cache_dir):
    cfg, metrics = trained
    assert metrics["val_pairs"] == 18 * 5
    assert metrics["best_val_accuracy"] >= 0.9
    assert (cfg.out / "training_curve.png").stat().st_size > 1000
    assert json.loads((cfg.out / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]
    saved = json.loads((cfg.out / "config.json").read_text())
    assert saved["clip"] == "tiny" and saved["std"] > 0


def test_checkpoint_loads_into_the_mlp_expert_with_the_same_scores(trained, colour_data, cache_dir):
    cfg, metrics = trained
    records = load_preference_data(str(colour_data))
    _, val = split_by_prompt(records, 0.25, seed=0)
    rewarder = create_rewarder(profile="tiny", cache_dir=cache_dir,
                               experts={"imagereward": None, "aesthetic": None, "mlp": {"checkpoint": str(cfg.out)}})
    scores = score_records(val, rewarder, progress=False)
    # the same model on the same embeddings: exactly the validation accuracy training reported
    assert preference_accuracy(scores["mlp"], val)["accuracy"] == pytest.approx(metrics["best_val_accuracy"], abs=1e-6)
    assert rewarder.norm["mlp"] == (pytest.approx(saved_mean(cfg)), pytest.approx(saved_std(cfg)))


def saved_mean(cfg):
    return json.loads((cfg.out / "config.json").read_text())["mean"]


def saved_std(cfg):
    return json.loads((cfg.out / "config.json").read_text())["std"]


def test_auxiliary_loss_runs_and_changes_training(colour_data, cache_dir, tmp_path):
    common = dict(data=str(colour_data), clip="tiny", epochs=2, batch_size=32, lr=1e-3, val_fraction=0.25, cache_dir=cache_dir)
    plain = train_reward(TrainRewardConfig(out=tmp_path / "plain", **common), progress=False)
    aux = train_reward(TrainRewardConfig(out=tmp_path / "aux", aux_weight=0.5, aux_negatives=3, **common), progress=False)
    assert all(v == 0 for v in plain["history"]["aux_loss"])
    assert all(v > 0 for v in aux["history"]["aux_loss"])
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "aux" / "model.safetensors")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_accuracy_is_exact_on_a_hand_made_case():
    records = [PreferenceRecord("a", ["x"] * 3, [1, 2, 3]), PreferenceRecord("b", ["x"] * 3, [1, 1, 2])]
    scores = [np.array([3.0, 2.0, 1.0]), np.array([0.0, 5.0, 5.0])]
    # record a: 3 pairs right; record b: pairs (0,2) wrong, (1,2) equal scores = half; the tie (0,1) is no pair
    r = preference_accuracy(scores, records, n_boot=200)
    assert r["accuracy"] == pytest.approx(3.5 / 5) and r["pairs"] == 5
    assert 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1
    assert preference_accuracy(scores, records, n_boot=200) == r  # seeded


def test_fit_weights_recovers_known_weights():
    rng = np.random.default_rng(0)
    true = np.array([2.0, -1.0, 0.5])
    d = rng.normal(size=(20000, 3))
    prefer_first = rng.random(20000) < 1 / (1 + np.exp(-(d @ true)))
    diffs = np.where(prefer_first[:, None], d, -d)  # oriented: preferred image first
    w = fit_weights(diffs, ["a", "b", "c"])
    assert [w["a"], w["b"], w["c"]] == pytest.approx(true.tolist(), rel=0.1)
    assert weighted_accuracy(diffs, true) > 0.7


def test_pair_differences_use_the_scale():
    records = [PreferenceRecord("a", ["x"] * 2, [2, 1])]
    d = pair_differences({"e": [np.array([1.0, 5.0])]}, records, {"e": 2.0})
    assert d.tolist() == [[2.0]]  # preferred (index 1) minus other, divided by the scale


def test_cli_train_eval_fit(colour_data, cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("T2I_REWARD_CACHE_DIR", str(cache_dir))
    ckpt = tmp_path / "mlp"
    assert main(["train-reward", "--data", str(colour_data), "--out", str(ckpt), "--clip", "tiny", "--epochs", "3",
                 "--batch-size", "32", "--lr", "1e-3", "--cache-dir", str(cache_dir)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_pairs"] > 0
    config = tmp_path / "with-mlp.yaml"
    # a file lists exactly the experts it enables; the profile gives their other fields
    config.write_text(yaml.safe_dump({"profile": "tiny", "experts": {"imagereward": {}, "aesthetic": {}, "mlp": {"checkpoint": str(ckpt)}}}))
    out = tmp_path / "eval"
    assert main(["eval-preference", "--config", str(config), "--data", str(colour_data), "--out", str(out), "--bootstrap", "50"]) == 0
    table = capsys.readouterr().out
    for name in ("imagereward", "aesthetic", "mlp", "mixture", "clip_score"):
        assert f"| {name} |" in table
    assert (out / "preference_accuracy.png").stat().st_size > 1000
    results = json.loads((out / "preference_accuracy.json").read_text())
    assert results["mlp"]["pairs"] == 72 * 5
    fitted = tmp_path / "fitted.yaml"
    assert main(["fit-mixture", "--config", str(config), "--data", str(colour_data), "--out", str(fitted)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["weights"]) == {"imagereward", "aesthetic", "mlp"} and "val_accuracy_fitted" in report
    cfg = load_config(fitted)
    assert cfg.experts["mlp"].checkpoint == str(ckpt)
    assert cfg.experts["mlp"].weight == pytest.approx(report["weights"]["mlp"], abs=1e-5)
    assert main(["train-reward", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x"), "--clip", "tiny"]) == 2
    assert "no such file" in capsys.readouterr().err

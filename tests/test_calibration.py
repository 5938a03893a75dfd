"""Score calibration (rewarders/calibration.py): the quantile arithmetic, the file format and its errors,
calibrate() on the tiny profile, the packaged tiny calibration, the factory and `t2i-reward calibrate`."""

import json
import logging
import math

import pytest
import torch
from t2i_reward.rewarders import create_rewarder
from t2i_reward.rewarders.calibration import Calibration, ExpertCalibration, calibrate, load_calibration
from t2i_reward.rewarders.errors import InvalidPromptError, InvalidRequestError, ModelLoadError

from t2i_reward.cli import main

from .conftest import smooth_image

TINY_EXPERTS = {"imagereward", "aesthetic", "mlp"}


def linear() -> ExpertCalibration:
    return ExpertCalibration([float(k) for k in range(101)], 101, 50.0, 29.3)


# ----------------------------------------------------------------------------------------------
# arithmetic

def test_percentile_interpolates_linearly_and_clamps():
    cal = linear()
    assert [cal.percentile(x) for x in (0, 37.5, 99.25, 100)] == [0.0, 37.5, 99.25, 100.0]
    assert cal.percentile(-5) == 0.0 and cal.percentile(1e9) == 100.0
    assert cal.percentile(math.inf) == 100.0 and cal.percentile(-math.inf) == 0.0
    assert cal.percentile(math.nan) is None


def test_flat_segments_give_the_middle_of_the_run():
    # 0 for percentiles 0..50, then 1, 2, ..., 50: half of the calibration set scored exactly 0
    cal = ExpertCalibration([0.0] * 51 + [float(k) for k in range(1, 51)], 10, 0.0, 1.0)
    assert cal.percentile(0) == 25.0  # the middle of 0..50
    assert cal.percentile(0.5) == 50.5 and cal.percentile(-0.1) == 0.0 and cal.percentile(50) == 100.0
    const = ExpertCalibration([3.0] * 101, 5, 3.0, 0.0)  # a constant expert
    assert (const.percentile(2.9), const.percentile(3.0), const.percentile(3.1)) == (0.0, 50.0, 100.0)
    xs = [k / 10 for k in range(-10, 520)]  # monotone across the flat run
    ps = [cal.percentile(x) for x in xs]
    assert ps == sorted(ps)


def test_from_scores_quantiles_and_moments():
    e = ExpertCalibration.from_scores([10.0, 0.0])
    assert e.quantiles == pytest.approx([k / 10 for k in range(101)])
    assert (e.n, e.mean, e.std) == (2, 5.0, pytest.approx(math.sqrt(50)))  # sample std (ddof=1)
    assert e.percentile(2.5) == pytest.approx(25.0)
    e = ExpertCalibration.from_scores(list(range(101)))
    assert e.quantiles == pytest.approx([float(k) for k in range(101)], abs=1e-12)


def test_percentiles_of_a_mixture_answer():
    cal = Calibration({"a": linear()})
    out = cal.percentiles({"a": torch.tensor([12.5, -3.0, 250.0]), "b": [1.0, 2.0, 3.0]})
    assert out == {"a": [12.5, 0.0, 100.0], "b": [None, None, None]}
    assert cal.percentiles({"a": [40, 60.5]}) == {"a": [40.0, 60.5]}
    assert cal.check(["a", "b", "c"]) == ["b", "c"]


# ----------------------------------------------------------------------------------------------
# the file

def good_dict() -> dict:
    return Calibration({"a": linear(), "b": ExpertCalibration.from_scores([1.0, 2.0, 4.0], "org/b")},
                       "tiny", "2025-01-01", 3, "prompts.txt").to_dict()


def test_round_trip(tmp_path):
    cal = Calibration.from_dict(good_dict())
    cal.save(tmp_path / "sub" / "cal.json")
    data = json.loads((tmp_path / "sub" / "cal.json").read_text())
    assert data["version"] == 1 and list(data)[-1] == "experts" and data["experts"]["b"]["checkpoint"] == "org/b"
    assert load_calibration(tmp_path / "sub" / "cal.json") == cal
    assert load_calibration(str(tmp_path / "sub" / "cal.json"), cache_dir=tmp_path) == cal


def _set(path: str, value):
    def mutate(d):
        *keys, last = path.split(".")
        for k in keys:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return mutate


def _non_monotonic(d):
    d["experts"]["a"]["quantiles"][40] = 90.0


def _quantile(value):
    def mutate(d):
        d["experts"]["a"]["quantiles"][7] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("version", 2), "unsupported calibration version 2"),
    (_set("version", KeyError), "unsupported calibration version None"),
    (_non_monotonic, "quantiles must be non-decreasing"),
    (_quantile(math.nan), "must be a finite number"),
    (_quantile(math.inf), "must be a finite number"),
    (_quantile("7"), "must be a finite number"),
    (_set("experts.a.mean", -math.inf), "experts.a.mean must be a finite number"),
    (_set("experts.a.std", -1.0), "std must not be negative"),
    (_set("experts.a.quantiles", [1.0, 2.0]), "must be a list of 101 numbers"),
    (_set("experts.a.n", 0), "n must be a positive integer"),
    (_set("experts", {}), "'experts' must be a non-empty object"),
])
def test_bad_files_are_refused(tmp_path, mutate, message):
    d = good_dict()
    mutate(d)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(d))  # Python writes NaN / Infinity, which json.loads reads back
    with pytest.raises(ModelLoadError, match=message) as e:
        load_calibration(path)
    assert str(path) in str(e.value)


def test_missing_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_calibration(tmp_path / "nope.json")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_calibration(tmp_path)  # a directory
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelLoadError, match="cannot read it"):
        load_calibration(tmp_path / "bin.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not a calibration file"):
        load_calibration(tmp_path / "list.json")


# ----------------------------------------------------------------------------------------------
# measuring, with the tiny profile

def test_calibrate_on_tiny(tiny):
    images = [smooth_image(100 + i, 60 + 13 * i, 90 - 3 * i) for i in range(12)]
    prompts = [f"a photo of object number {i % 5}" for i in range(12)]
    cal = calibrate(tiny, prompts, images, batch_size=5, source="generated")
    assert set(cal.experts) == TINY_EXPERTS
    assert (cal.profile, cal.n_images, cal.source) == ("tiny", 12, "generated") and len(cal.created) == 10
    raw = tiny.raw_scores(images, prompts)
    pct = cal.percentiles(raw)
    for name, e in cal.experts.items():
        assert e.n == 12 and e.checkpoint == "tiny"
        assert e.quantiles == sorted(e.quantiles)
        assert e.mean == pytest.approx(float(raw[name].mean()), abs=1e-5)
        order = torch.argsort(raw[name]).tolist()
        ps = [pct[name][i] for i in order]
        assert ps == sorted(ps), name  # monotone in the score
        assert ps[0] == pytest.approx(0, abs=1e-6) and ps[-1] == pytest.approx(100, abs=1e-6)


def test_calibrate_groups_images_sharing_a_prompt_for_diversity(cache_dir, caplog):
    rewarder = create_rewarder(profile="tiny", cache_dir=cache_dir, experts={"diversity": {"clip": "tiny"}})
    images = [smooth_image(200 + i, 64, 64) for i in range(9)]
    # two prompts with 3 images each (interleaved), three prompts alone
    prompts = ["a cat", "a dog", "a cat", "a dog", "a cat", "a dog", "a fish", "a bird", "a tree"]
    with caplog.at_level(logging.WARNING, logger="t2i_reward.rewarders.calibration"):
        cal = calibrate(rewarder, prompts, images, batch_size=4)
    assert cal.experts["diversity"].n == 6 and cal.experts["mlp"].n == 9
    assert "the other 3 images do not count" in caplog.text
    # the diversity scores are those of the two requests scored alone
    cats = rewarder.raw_scores(images[0:6:2], ["a cat"] * 3)["diversity"].tolist()
    dogs = rewarder.raw_scores(images[1:6:2], ["a dog"] * 3)["diversity"].tolist()
    assert cal.experts["diversity"].mean == pytest.approx(sum(cats + dogs) / 6, abs=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i_reward.rewarders.calibration"):
        cal = calibrate(rewarder, ["a", "b", "c"], images[:3])  # no prompt has 2 images; 3 is not a multiple of 2
    assert "diversity" not in cal.experts and set(cal.experts) == TINY_EXPERTS
    assert "diversity left out" in caplog.text


def test_calibrate_refuses_bad_input(tiny):
    im = smooth_image(1, 40, 40)
    with pytest.raises(InvalidRequestError, match="at least 2"):
        calibrate(tiny, ["a cat"], [im])
    with pytest.raises(InvalidRequestError, match="2 prompts for 1 images"):
        calibrate(tiny, ["a cat", "a dog"], [im])
    with pytest.raises(InvalidPromptError, match="prompt 2 is empty"):
        calibrate(tiny, ["a cat", "  "], [im, im])


# ----------------------------------------------------------------------------------------------
# the packaged tiny calibration and the factory

def test_packaged_tiny_calibration_covers_the_tiny_profile():
    from t2i_reward.rewarders.config import load_config
    from t2i_reward.rewarders.tiny import TINY_VERSION

    cal = load_calibration("tiny")
    assert set(load_config(profile="tiny").experts) <= set(cal.experts)
    assert cal.profile == "tiny" and cal.n_images >= 100
    # made with the current tiny models: else run scripts/make_tiny_calibration.py again
    assert f"tiny-v{TINY_VERSION} models" in cal.source
    assert all(e.checkpoint == "tiny" for e in cal.experts.values())


def test_tiny_rewarder_has_its_calibration(tiny):
    assert tiny.config.calibration == "tiny"
    assert tiny.calibration == load_calibration("tiny") and not tiny.calibration.check(tiny.experts)
    pct = tiny.calibration.percentiles(tiny.raw_scores([smooth_image(i, 80, 80) for i in range(2)], ["a cat"] * 2))
    assert set(pct) == TINY_EXPERTS and all(0 <= p <= 100 for ps in pct.values() for p in ps)


def test_factory_calibration_errors_and_warnings(cache_dir, tmp_path, caplog):
    assert create_rewarder(profile="tiny", cache_dir=cache_dir, calibration=None).calibration is None
    with pytest.raises(ModelLoadError, match="no such file"):
        create_rewarder(profile="tiny", cache_dir=cache_dir, calibration=str(tmp_path / "missing.json"))
    Calibration({"mlp": linear()}, "tiny").save(tmp_path / "mlp.json")
    with caplog.at_level(logging.WARNING, logger="t2i_reward.rewarders.factory"):
        r = create_rewarder(profile="tiny", cache_dir=cache_dir, calibration=str(tmp_path / "mlp.json"))
    assert r.calibration.check(r.experts) == ["imagereward", "aesthetic"]
    assert "does not cover imagereward, aesthetic" in caplog.text


# ----------------------------------------------------------------------------------------------
# the CLI

@pytest.fixture
def image_dir(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("T2I_REWARD_CACHE_DIR", str(cache_dir))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        smooth_image(300 + i, 48, 64).save(folder / f"img{i:02d}.png")
    (folder / "notes.md").write_text("not an image: ignored by the text-file format")
    return folder


def test_cli_calibrate_text_file(image_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n\na red apple\na blue car\n")
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--profile", "tiny", "--prompts", str(tmp_path / "prompts.txt"),
                 "--images", str(image_dir), "--out", str(out), "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    assert table.split()[:7] == ["expert", "n", "mean", "std", "5%", "50%", "95%"] and "aesthetic" in table
    cal = load_calibration(out)
    assert set(cal.experts) == TINY_EXPERTS and cal.n_images == 4 and cal.source == "prompts.txt"
    assert cal.experts["mlp"].n == 4


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_cli_calibrate_records(image_dir, tmp_path, fmt):
    rows = [{"prompt": f"a picture, number {i}", "image": f"img{i:02d}.png"} for i in (0, 2, 3)]
    src = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        src.write_text("prompt,image\n" + "".join(f"\"{r['prompt']}\",{r['image']}\n" for r in rows))
    assert main(["calibrate", "--profile", "tiny", "--prompts", str(src), "--images", str(image_dir),
                 "--out", str(tmp_path / "cal.json")]) == 0
    assert load_calibration(tmp_path / "cal.json").n_images == 3


def test_cli_calibrate_bad_input_exits_2(image_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na bird\n")
    args = ["calibrate", "--profile", "tiny", "--images", str(image_dir), "--out", str(tmp_path / "cal.json")]
    assert main([*args, "--prompts", str(tmp_path / "prompts.txt")]) == 2
    err = capsys.readouterr().err
    assert "has 3 prompts but" in err and "has 4 image files" in err and "Traceback" not in err
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a cat", "image": "missing.png"}) + "\n"
                                          + json.dumps({"prompt": "a dog", "image": "img00.png"}) + "\n")
    assert main([*args, "--prompts", str(tmp_path / "pairs.jsonl")]) == 2
    assert "no such image file" in capsys.readouterr().err
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"text": "a cat"}) + "\n")
    assert main([*args, "--prompts", str(tmp_path / "pairs.jsonl")]) == 2
    assert "needs string fields 'prompt' and 'image'" in capsys.readouterr().err
    assert main([*args, "--prompts", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read --prompts" in capsys.readouterr().err
    assert not (tmp_path / "cal.json").exists()

"""The geneval expert: GenEval's rules and Flow-GRPO's reward server's variant on constructed detections
(expected values worked out by hand from the two reference formulas), the records it accepts, and the tiny
detector end to end (mmdet's post-processing on constructed logits, the colour crops, forward)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i_reward.rewarders import geneval_rules as R
from t2i_reward.rewarders.errors import InvalidRequestError, ModelLoadError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval"  # ../shared/data/geneval, read only


def det(x1, y1, x2, y2, score=0.95, color=None):
    return R.Detection((x1, y1, x2, y2), score, color=color)


def left(color=None):  # an object on the left half of a 100 x 100 image
    return det(5, 40, 25, 60, color=color)


def right(color=None):
    return det(75, 40, 95, 60, color=color)


def verdicts(record, objects):
    j = R.judge(record, objects)
    return j.correct, j.flow_strict, j.flow_score, j.reward


def approx(*values):
    return pytest.approx(values, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# relations


def test_relative_position_directions_and_diagonal():
    a, b = (0, 0, 10, 10), (20, 0, 30, 10)
    assert R.relative_position(a, b) == {"left of"}          # offset -20, margin 2: dx = -18/20
    assert R.relative_position(b, a) == {"right of"}
    assert R.relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert R.relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    assert R.relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # -18/28.3 each
    assert R.relative_position(a, a) == set()                # no offset at all


def test_relative_position_margin():
    a = (0, 0, 10, 10)
    # offset -1.5 is inside the margin 0.1 x (10 + 10) = 2: no relation
    assert R.relative_position(a, (1.5, 0, 11.5, 10)) == set()
    # offset -2.5: revised -0.5, dx = -0.2 (not beyond -0.5); without a margin it is "left of"
    assert R.relative_position(a, (2.5, 0, 12.5, 10)) == set()
    assert R.relative_position(a, (2.5, 0, 12.5, 10), margin=0.0) == {"left of"}
    # offset -5: revised -3, dx = -0.6
    assert R.relative_position(a, (5, 0, 15, 10)) == {"left of"}
    # a large dy keeps a small dx under 0.5: only "above"
    assert R.relative_position((0, 0, 10, 10), (8, 30, 18, 40)) == {"above"}


# ------------------------------------------------------------------------------------------------
# selection


def test_select_objects_threshold_sort_and_cap():
    cands = [("dog", det(0, 0, 1, 1, s)) for s in (0.3, 0.31, 0.9, 0.5)]
    cands.append(("dog", det(0, 0, 1, 1, 0.30000001)))  # float32(0.30000001) == float32(0.3): not above it
    cands.append(("cat", det(0, 0, 1, 1, 0.2)))
    objs = R.select_objects(cands, 0.3)
    assert [d.score for d in objs["dog"]] == [0.9, 0.5, 0.31] and "cat" not in objs
    many = [("cup", det(i, 0, i + 1, 1, 0.4 + i / 100)) for i in range(20)]
    kept = R.select_objects(many, 0.3)["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)
    assert R.threshold_for({"tag": "counting"}) == 0.9 and R.threshold_for({"tag": "colors"}) == 0.3


def test_select_objects_nms_is_off_by_default():
    cands = [("dog", det(0, 0, 10, 10, 0.9)), ("dog", det(1, 0, 11, 10, 0.8)), ("dog", det(50, 50, 60, 60, 0.7))]
    assert len(R.select_objects(cands, 0.3)["dog"]) == 3  # GenEval's max_overlap 1.0 keeps overlapping boxes
    # IoU of the first two with GenEval's +1 areas: 10*11 / (2*121 - 110) = 0.833
    assert R.box_iou((0, 0, 10, 10), (1, 0, 11, 10)) == pytest.approx(110 / 132)
    assert [d.score for d in R.select_objects(cands, 0.3, max_overlap=0.8)["dog"]] == [0.9, 0.7]


# ------------------------------------------------------------------------------------------------
# the three verdicts per tag: (GenEval correct, Flow-GRPO strict, Flow-GRPO score, our partial reward)


def test_single_object():
    rec = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert verdicts(rec, {"dog": [left()]}) == approx(True, True, 1.0, 1.0)
    # two dogs: GenEval wants at least one; Flow-GRPO's strict check wants exactly one: 1 - |1 - 2| / 1 = 0
    assert verdicts(rec, {"dog": [left(), right()]}) == approx(True, False, 0.0, 1.0)
    assert verdicts(rec, {"cat": [left()]}) == approx(False, False, 0.0, 0.0)


def test_two_object():
    rec = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert verdicts(rec, {"dog": [left()], "cat": [right()]}) == approx(True, True, 1.0, 1.0)
    assert verdicts(rec, {"dog": [left()]}) == approx(False, False, 0.5, 0.5)


def test_counting_and_exclude():
    rec = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
    dogs = lambda n: {"dog": [det(10 * i, 0, 10 * i + 5, 5) for i in range(n)]}  # noqa: E731
    assert verdicts(rec, dogs(3)) == approx(True, True, 1.0, 1.0)
    # four: the exclude fails GenEval; Flow: 1 - 1/3; ours: count 1, exclude 1 - (4 - 4 + 1) / 3
    assert verdicts(rec, dogs(4)) == approx(False, False, 2 / 3, (1 + 2 / 3) / 2)
    assert verdicts(rec, dogs(2)) == approx(False, False, 2 / 3, (2 / 3 + 1) / 2)
    # ten: Flow-GRPO's score goes below 0 (1 - 7/3); ours stays in [0, 1]
    assert verdicts(rec, dogs(10)) == approx(False, False, 1 - 7 / 3, 0.5)
    assert verdicts(rec, {}) == approx(False, False, 0.0, 0.5)


def test_colors():
    rec = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}
    assert verdicts(rec, {"dog": [left("red")]}) == approx(True, True, 1.0, 1.0)
    assert verdicts(rec, {"dog": [left("blue")]}) == approx(False, False, 0.5, 0.5)
    # two dogs, the most confident red: GenEval looks at the first one only; Flow's count term is 0 and its
    # wrong count adds a 0 for the colour
    assert verdicts(rec, {"dog": [left("red"), right("blue")]}) == approx(True, False, 0.0, 1.0)
    assert verdicts(rec, {}) == approx(False, False, 0.0, 0.0)


def test_color_attr():
    rec = {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 1, "color": "blue"}]}
    assert verdicts(rec, {"dog": [left("red")], "cat": [right("blue")]}) == approx(True, True, 1.0, 1.0)
    assert verdicts(rec, {"dog": [left("red")], "cat": [right("red")]}) == approx(False, False, 0.75, 0.75)


def test_position():
    rec = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    assert verdicts(rec, {"dog": [right()], "cat": [left()]}) == approx(True, True, 1.0, 1.0)
    # wrong side: Flow-GRPO appends a 0 and then its 1 anyway: [1, 1, 0, 1] -> 0.75; ours [1, 1, 0]
    assert verdicts(rec, {"dog": [left()], "cat": [right()]}) == approx(False, False, 0.75, 2 / 3)
    # no dog: the target group failed: Flow [0, 1, 0]; ours [0, 1, 0 pairs]
    assert verdicts(rec, {"cat": [left()]}) == approx(False, False, 1 / 3, 1 / 3)
    # two dogs, the cat left of the first: GenEval uses the first dog; Flow's strict count fails the dog
    # group, so the cat has no target: [0, 1, 0]
    assert verdicts(rec, {"dog": [right(), det(80, 80, 90, 90)], "cat": [left()]}) == approx(True, False, 1 / 3, 1.0)


def test_flow_grpo_quirks_on_mixed_entries():
    # a wrong colour: Flow-GRPO evaluates no position after it (no term at all)
    rec = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "color": "red", "position": ["left of", 0]}]}
    assert verdicts(rec, {"dog": [right()], "cat": [left("blue")]}) == approx(False, False, 2 / 3, 0.75)
    # a wrong count on an entry with a colour and a position adds one 0, not two: [1, 0, 0]
    assert verdicts(rec, {"dog": [right()]}) == approx(False, False, 1 / 3, 0.25)
    # Flow-GRPO's strict check ignores exclude
    rec = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "cat", "count": 1}]}
    assert verdicts(rec, {"dog": [left()], "cat": [right()]}) == approx(False, True, 1.0, 0.5)


def test_colours_must_be_classified_first():
    rec = {"tag": "colors", "include": [{"class": "dog", "count": 2, "color": "red"}]}
    objs = {"dog": [left(), right(), det(0, 0, 5, 5)]}
    assert R.colour_requests(rec, objs) == [("dog", 0), ("dog", 1)]  # the first `count`, not the third
    with pytest.raises(ValueError, match="no colour"):
        R.judge(rec, objs)


def test_partial_reward_is_one_exactly_when_correct():
    rng = np.random.default_rng(0)
    records = [json.loads(line) for line in (DATA / "evaluation_metadata.jsonl").read_text().splitlines()]
    classes = sorted({e["class"] for r in records for e in r["include"]})
    for k in range(600):
        rec = records[k % len(records)]
        objs = {}
        for cls in [e["class"] for e in rec["include"]] + list(rng.choice(classes, 2)):
            n = int(rng.integers(0, 5))
            xs = rng.uniform(0, 90, n)
            objs[cls] = [det(x, x / 2, x + 10, x / 2 + 10, 0.9 - i / 100, str(rng.choice(R.COLORS[:3]))) for i, x in enumerate(xs)]
        j = R.judge(rec, {c: v for c, v in objs.items() if v})
        assert 0.0 <= j.reward <= 1.0
        assert (j.reward == 1.0) == j.correct
        assert not j.flow_strict or j.flow_score == 1.0


# ------------------------------------------------------------------------------------------------
# Flow-GRPO's answer


def test_flow_grpo_answer():
    recs = [{"tag": "counting"}, {"tag": "position"}]
    out = R.flow_grpo_answer(recs, scores=[-0.5, 0.75], strict=[0.0, 1.0], correct=[1.0, 0.0])
    m = R.MISSED
    assert out == {
        "scores": [-0.5, 0.75], "rewards": [1.0, 0.0], "strict_rewards": [0.0, 1.0],
        "group_rewards": {"single_object": [m, m], "two_object": [m, m], "counting": [1.0, m], "colors": [m, m],
                          "position": [m, 0.0], "color_attr": [m, m]},
        "group_strict_rewards": {"single_object": [m, m], "two_object": [m, m], "counting": [0.0, m], "colors": [m, m],
                                 "position": [m, 1.0], "color_attr": [m, m]},
    }
    assert list(out["group_rewards"]) == list(R.TAGS)  # the server's key order
    strict_only = R.flow_grpo_answer(recs, [-0.5, 0.75], [False, True], [True, True], only_strict=True)
    assert strict_only["rewards"] == [0.0, 0.0] and strict_only["group_rewards"]["counting"] == [0.0, m]
    assert R.flow_grpo_answer([], [], [], []) == {"scores": [], "rewards": [], "strict_rewards": [],
                                                  "group_rewards": {}, "group_strict_rewards": {}}
    with pytest.raises(InvalidRequestError, match="2 records, 1 scores"):
        R.flow_grpo_answer(recs, [0.0], [0.0, 0.0], [0.0, 0.0])


# ------------------------------------------------------------------------------------------------
# records


def test_every_shared_record_passes_check():
    n = 0
    for name in ("evaluation_metadata.jsonl", "flow_grpo_test_metadata.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            if line.strip():
                R.check_record(json.loads(line))
                n += 1
    assert n == 553 + 2212
    assert [line.strip() for line in (DATA / "object_names.txt").read_text().splitlines() if line.strip()] == list(R.COCO_CLASSES)


GOOD = {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                         {"class": "cat", "count": 1, "position": ["left of", 0]}]}


@pytest.mark.parametrize("change, where, why", [
    (lambda r: r.update(tag="faces"), "metadata.tag", "not a GenEval tag"),
    (lambda r: r.update(include=[]), "metadata.include", "non-empty list"),
    (lambda r: r["include"][0].update({"class": "unicorn"}), "metadata.include[0].class", "not a class GenEval detects"),
    (lambda r: r["include"][0].update({"class": "mouse"}), "metadata.include[0].class", "GenEval calls it 'computer mouse'"),
    (lambda r: r["include"][0].update(count=0), "metadata.include[0].count", "integer >= 1"),
    (lambda r: r["include"][0].update(count=True), "metadata.include[0].count", "integer >= 1"),
    (lambda r: r["include"][0].update(count="2"), "metadata.include[0].count", "integer >= 1"),
    (lambda r: r["include"][0].update(count=17), "metadata.include[0].count", "at most 16"),
    (lambda r: r["include"][0].update(color="teal"), "metadata.include[0].color", "not one of GenEval's colours"),
    (lambda r: r["include"][0].update(colour="red"), "metadata.include[0]", "unknown key"),
    (lambda r: r["include"][1].update(position=["near", 0]), "metadata.include[1].position", "not a GenEval relation"),
    (lambda r: r["include"][1].update(position=["left of", 1]), "metadata.include[1].position", "earlier include entry"),
    (lambda r: r["include"][1].update(position="left of"), "metadata.include[1].position", "must be [relation"),
    (lambda r: r.update(exclude={"class": "dog"}), "metadata.exclude", "must be a list"),
    (lambda r: r.update(exclude=[{"class": "dog", "count": -1}]), "metadata.exclude[0].count", "integer >= 1"),
    (lambda r: r.update(exclude=[{"class": "dog", "count": 1, "color": "red"}]), "metadata.exclude[0]", "unknown key"),
])
def test_check_record_names_the_field(change, where, why):
    rec = json.loads(json.dumps(GOOD))
    R.check_record(rec)
    change(rec)
    with pytest.raises(InvalidRequestError) as e:
        R.check_record(rec)
    assert str(e.value).startswith(f"expert 'geneval': {where}: ") and why in str(e.value)


def test_check_record_refuses_non_objects():
    with pytest.raises(InvalidRequestError, match="must be a GenEval record"):
        R.check_record(["dog"])


# ------------------------------------------------------------------------------------------------
# the expert (tiny detector, tiny CLIP)


@pytest.fixture(scope="module")
def expert(cache_dir):
    from t2i_reward.rewarders.experts.geneval import GenEvalConfig, GenEvalExpert
    from t2i_reward.rewarders.factory import LoadContext

    ctx = LoadContext(torch.device("cpu"), torch.float32, cache_dir)
    return GenEvalExpert.from_config(GenEvalConfig(detector="tiny", clip="tiny", image_size=128), ctx)


def test_postprocess_on_constructed_logits(expert):
    cls = torch.zeros(2, 81)
    cls[0, R.COCO_CLASSES.index("dog")] = 10.0  # P(dog) = e^10 / (e^10 + 80)
    masks = torch.full((2, 8, 8), -20.0)
    masks[0, 2:4, 4:6] = 20.0  # cells (rows 2-3, cols 4-5) of an 8 x 8 grid, upsampled x4 to 32 x 32
    cands = expert.postprocess(cls, masks, (32, 32), (32, 32), 0.3)
    assert [name for name, _ in cands] == ["dog"]  # the flat query (P = 1/81 per class) cannot pass 0.3
    d = cands[0][1]
    # bilinear x4 (align_corners=False): the zero crossings fall between output pixels 7|8 and 15|16 (rows),
    # 15|16 and 23|24 (cols); mmdet's box is (x_min, y_min, x_max + 1, y_max + 1)
    # each upsampled logit is 20 * (2 * w_row * w_col - 1), w the bilinear weight on the positive cells:
    # 0.625, 0.875, 1, 1, 1, 1, 0.875, 0.625 across the square, so its 4 corners (0.625^2 < 0.5) are negative
    w = np.array([0.625, 0.875, 1, 1, 1, 1, 0.875, 0.625])
    logits = 20 * (2 * np.outer(w, w) - 1)
    assert d.box == (16.0, 8.0, 24.0, 16.0) and int(d.mask.sum()) == int((logits > 0).sum()) == 60
    assert d.mask[8:16, 16:24].numpy().tolist() == (logits > 0).tolist()
    # score: the class probability times the mean sigmoid over the mask
    mask_score = (1 / (1 + np.exp(-logits[logits > 0]))).mean()
    assert d.score == pytest.approx(math.exp(10) / (math.exp(10) + 80) * mask_score, rel=1e-5)
    # a padded input: the masks are cropped to the image before the boxes are read
    cands = expert.postprocess(cls, masks, (32, 32), (12, 20), 0.3)
    assert cands[0][1].box == (16.0, 8.0, 20.0, 12.0) and cands[0][1].mask.shape == (12, 20)


def test_pruning_below_the_threshold_changes_nothing(expert):
    torch.manual_seed(1)
    x = (torch.rand(1, 3, 128, 128) - torch.tensor(expert.det_mean.flatten().tolist()).view(1, 3, 1, 1)) / expert.det_std
    out = expert.detector(pixel_values=x)
    everything = expert.postprocess(out.class_queries_logits[0], out.masks_queries_logits[0], (128, 128), (128, 128), 0.0)
    pruned = expert.postprocess(out.class_queries_logits[0], out.masks_queries_logits[0], (128, 128), (128, 128), 0.3)
    above = [(n, d.box, d.score) for n, d in everything if np.float32(d.score) > np.float32(0.3)]
    assert above and sorted(above) == sorted((n, d.box, d.score) for n, d in pruned if np.float32(d.score) > np.float32(0.3))
    assert len(pruned) < len(everything)


def test_colour_crop_greys_the_background(expert):
    img = torch.zeros(3, 32, 32)
    img[0] = 1.0  # a red image
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:12, 16:20] = True  # the top-left quarter of the box (16, 8, 24, 16)
    crop = expert.crops(img, [R.Detection((16, 8, 24, 16), 0.9, mask)])[0]
    mean = torch.tensor(expert.clip.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(expert.clip.preprocess.std).view(3, 1, 1)
    rgb = crop * std + mean  # back to [0, 1]
    s = rgb.shape[-1]
    assert torch.allclose(rgb[:, s // 8, s // 8], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)        # inside the mask
    assert torch.allclose(rgb[:, -s // 8, -s // 8], torch.full((3,), 153 / 255), atol=1e-4)        # outside: #999
    # a thin object's crop is windowed before CLIP's resize: its middle, not a 224 x 179,200 intermediate
    thin = torch.zeros(32, 32, dtype=torch.bool)
    thin[4, :] = True
    crop = expert.crops(img, [R.Detection((0, 4, 32, 5), 0.9, thin)])
    assert crop.shape == (1, 3, 224, 224)
    assert torch.allclose((crop[0] * std + mean)[:, 112, 112], torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)


def test_forward_matches_the_rules_on_its_detections(expert):
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 128, 128)
    objs = expert.detect(pixels, [0.3] * 4)
    found = sorted(objs[0], key=lambda c: -len(objs[0][c]))
    assert found, "the tiny detector finds objects above 0.3"
    a, b = found[0], next(c for c in R.COCO_CLASSES if c not in objs[0])
    records = [
        {"tag": "single_object", "include": [{"class": a, "count": 1}]},
        {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]},
        {"tag": "colors", "include": [{"class": a, "count": 1, "color": "green"}]},
        {"tag": "counting", "include": [{"class": a, "count": 2}], "exclude": [{"class": a, "count": 3}]},
    ]
    out = expert(pixels, ["p"] * 4, metadata=records)
    assert out.errors == {}
    objs = expert.detect(pixels, [R.threshold_for(r) for r in records])
    expert.classify_colours(pixels, records, objs)
    for i, (rec, o) in enumerate(zip(records, objs)):
        j = R.judge(rec, o)
        assert out.scores[i].item() == pytest.approx(j.reward)
        assert out.extras["correct"][i].item() == float(j.correct)
        assert out.extras["flow_grpo_score"][i].item() == pytest.approx(j.flow_score)
        assert out.extras["flow_grpo_strict"][i].item() == float(j.flow_strict)
    assert out.extras["correct"][0].item() == 1.0 and out.scores[0].item() == 1.0  # `a` was found in image 0
    assert out.scores[1].item() == pytest.approx(0.5)                               # `b` was not
    summary = expert.summarize(out.scores, out.extras, records)
    assert summary["tags"]["single_object"] == {"images": 1, "correct": 1.0, "reward": 1.0}
    assert summary["overall"] == pytest.approx(sum(out.extras["correct"].tolist()) / 4)


def test_forward_marks_a_bad_record_and_check_pair_refuses_it(expert):
    pixels = torch.rand(2, 3, 128, 128)
    good = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    out = expert(pixels, ["a", "b"], metadata=[good, {}])
    assert set(out.errors) == {1} and "metadata.tag" in out.errors[1]
    assert math.isnan(out.scores[1].item()) and not math.isnan(out.scores[0].item())
    expert.check_pair("a dog", good)
    with pytest.raises(InvalidRequestError, match="expert 'geneval': metadata.include\\[0\\].color"):
        expert.check_pair("a dog", {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "mauve"}]})


def test_loading_local_folder_hub_id_and_wrong_labels(cache_dir, tmp_path):
    from transformers import Mask2FormerForUniversalSegmentation

    from t2i_reward.rewarders.checkpoints import resolve_checkpoint
    from t2i_reward.rewarders.experts.geneval import GenEvalConfig, GenEvalExpert, build_tiny
    from t2i_reward.rewarders.factory import LoadContext

    ctx = LoadContext(torch.device("cpu"), torch.float32, cache_dir)
    folder = resolve_checkpoint("tiny", "config.json", "x", ctx.tiny_source(GenEvalExpert)).path.parent
    local = GenEvalExpert.from_config(GenEvalConfig(detector=str(folder), clip="tiny"), ctx)
    assert local.class_names[64] == "computer mouse" and local.detector.config.id2label[64] == "mouse"
    assert local.describe()["checkpoint"] == str(folder)
    with pytest.raises(ModelLoadError, match="GenEval detector"):  # HF_HUB_OFFLINE (conftest): never a download
        GenEvalExpert.from_config(GenEvalConfig(detector="facebook/mask2former-swin-small-coco-instance", clip="tiny"), ctx)
    build_tiny(tmp_path)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path)
    model.config.id2label = {i: f"thing{i}" for i in range(80)}
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="label 0 is 'thing0', expected 'person'"):
        GenEvalExpert.from_config(GenEvalConfig(detector=str(tmp_path), clip="tiny"), ctx)


def test_random_detector_is_the_swin_s_architecture():
    from transformers import Mask2FormerForUniversalSegmentation

    from t2i_reward.rewarders.experts.geneval import SWIN_S, detector_config

    with torch.device("meta"):
        model = Mask2FormerForUniversalSegmentation(detector_config(SWIN_S))
    # Mask2Former Swin-S COCO instance: 69M parameters (Mask2Former's and mmdet's model zoos)
    assert 68.5e6 < sum(p.numel() for p in model.parameters()) < 69.5e6
    assert model.config.num_queries == 100 and model.config.num_labels == 80


# ------------------------------------------------------------------------------------------------
# through the library: create_rewarder, metadata per pair, extras, summaries, 422s


def test_geneval_through_the_rewarder(cache_dir):
    from PIL import Image

    from t2i_reward.rewarders import RewardConfig, create_rewarder

    r = create_rewarder(RewardConfig(profile="tiny", cache_dir=cache_dir, calibration=None, experts={
        "aesthetic": {"clip": "tiny", "head": "tiny", "mean": 0.0, "std": 1.0},
        "geneval": {"detector": "tiny", "clip": "tiny", "image_size": 128}}))
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 256, (150 + 10 * i, 140, 3), dtype=np.uint8)) for i in range(3)]
    e = r.experts["geneval"]
    pixels = e.preprocess.pil(imgs)  # what the mixture feeds it
    first = e.detect(pixels, [0.3] * 3)[0]
    a = max(first, key=lambda c: len(first[c]))
    records = [{"tag": "single_object", "include": [{"class": a, "count": 1}], "prompt": f"a photo of a {a}"},
               {"tag": "colors", "include": [{"class": a, "count": 1, "color": "red"}]},
               {"tag": "counting", "include": [{"class": a, "count": 3}], "exclude": [{"class": a, "count": 4}]}]
    res = r.score("a prompt", imgs, metadata=records)
    direct = e(pixels, ["a prompt"] * 3, metadata=records)
    assert [im.components["geneval"] for im in res.images] == pytest.approx(direct.scores.tolist())
    assert res.images[0].components["geneval"] == 1.0 and res.images[0].extras["geneval.correct"] == 1.0
    for name in ("correct", "flow_grpo_score", "flow_grpo_strict"):
        assert [im.extras[f"geneval.{name}"] for im in res.images] == pytest.approx(direct.extras[name].tolist())
    s = res.summaries["geneval"]
    assert list(s["tags"]) == ["single_object", "counting", "colors"]
    assert s["tags"]["single_object"] == {"images": 1, "correct": 1.0, "reward": 1.0}
    # Flow-GRPO's answer from the extras
    answer = R.flow_grpo_answer(records, [im.extras["geneval.flow_grpo_score"] for im in res.images],
                                [im.extras["geneval.flow_grpo_strict"] for im in res.images],
                                [im.extras["geneval.correct"] for im in res.images])
    assert answer["rewards"][0] == 1.0 and answer["group_rewards"]["single_object"] == [1.0, R.MISSED, R.MISSED]
    # refused before any model runs, naming the image, the expert and the field
    bad = [records[0], {"tag": "colors", "include": [{"class": "unicorn", "count": 1}]}, records[2]]
    with pytest.raises(InvalidRequestError, match=r"image 1: expert 'geneval': metadata.include\[0\].class"):
        r.score("a prompt", imgs, metadata=bad)
    with pytest.raises(InvalidRequestError, match="needs the metadata field 'tag' for every image; image 0 has no metadata"):
        r.score("a prompt", imgs)

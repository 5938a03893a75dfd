"""GenEval's rules on detected objects, and Flow-GRPO's reward server's variant of them (no models here).

GenEval (Ghosh et al. 2023, `evaluation/evaluate_images.py` of djghosh13/geneval) scores an image against
a record `{"tag", "include": [{"class", "count", "color"?, "position"?}], "exclude"?: [{"class", "count"}]}`
from the objects an instance detector found:

- objects: per COCO class, the detections scoring above 0.3 (0.9 when the record's tag is `counting`),
  highest first, at most 16 a class; overlapping boxes are kept (its NMS is off: max_overlap 1.0);
- `include` (all must hold): at least `count` objects of the class; with `color`, each of the `count`
  most confident ones classified as that colour; with `position` = [relation, i], each of them in that
  relation to each object of include[i]'s group, which must itself have matched;
- `exclude` (any fails the image): `count` or more objects of the class;
- relations: box centres compared after shrinking the offset by 0.1 x (the sum of both boxes' sizes) on
  each axis, then "left of"/"right of"/"above"/"below" where that axis holds over half of the offset's
  length.

Flow-GRPO's reward server (yifan123/reward-server, `reward_server/gen_eval.py`) answers three numbers per
image from the same objects, and `flow_grpo_answer` assembles its whole answer:

- `rewards`: GenEval's correctness above (0.0 for every image with `only_strict`);
- `strict_rewards`: its own check, which wants *exactly* `count` objects of each included class (and
  all of them the right colour) and ignores `exclude`;
- `scores`: the mean of a list of terms: per include entry 1 - |count - found| / count (below 0 once more
  than twice `count` are found); with a wrong count one 0 for its colour or position; a colour term
  1 - |count - right colour| / count; a position 0 when its target group failed, 1 when it holds, and
  both 0 and 1 when it fails (the 1 is appended whatever happened); no position term at all after a
  wrong colour.

This project's own dense reward (`partial_reward`) is in [0, 1] and is 1 exactly when GenEval's
correctness is: the mean of one term per count, colour, position and exclude entry (see its docstring).

Numbers: GenEval's boxes and scores are float32 numpy arrays, so its threshold and position arithmetic
runs in float32; so does ours (numpy float32), to flip no decision on a tie.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import InvalidRequestError

# GenEval's `object_names.txt`: the 80 COCO thing classes in the detector's label order (mmdet's COCO order).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# the detector checkpoints' own names (COCO's, as mmdet and transformers' COCO Mask2Former configs have them)
# where GenEval renamed a class for its prompts
DETECTOR_NAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# the zero-shot colour prompts, averaged per colour ({c}: colour, {o}: the object's class)
COLOR_TEMPLATES = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
MAX_OVERLAP = 1.0  # GenEval's NMS IoU; 1.0 keeps every box
POSITION_MARGIN = 0.1
MISSED = -10.0  # Flow-GRPO's per-tag lists hold this for an image of another tag


@dataclass
class Detection:
    """One detected object: its box (x1, y1, x2, y2 in pixels, x2/y2 exclusive as mmdet's mask boxes), its
    score, optionally its mask (whatever the caller crops colours with) and its colour once classified."""

    box: tuple[float, float, float, float]
    score: float
    mask: Any = field(default=None, repr=False)
    color: Optional[str] = None


Objects = Mapping[str, Sequence[Detection]]  # class -> detections, most confident first


@dataclass(frozen=True)
class Judgement:
    """One image's verdicts: GenEval's `correct`, our `reward` in [0, 1], and Flow-GRPO's server's
    `flow_score` (its `scores`) and `flow_strict` (its `strict_rewards`)."""

    correct: bool
    reward: float
    flow_score: float
    flow_strict: bool


# ------------------------------------------------------------------------------------------------
# records


def check_record(record: Any, who: str = "geneval", max_count: int = MAX_OBJECTS) -> None:
    """Refuse a record GenEval cannot score, naming the field: InvalidRequestError("expert 'geneval':
    metadata.include[0].color: ..."). Unknown keys in an include or exclude entry are refused (a typo such
    as "colour" would silently drop a requirement); other top-level keys (the prompt) are allowed."""

    def fail(where: str, why: str):
        raise InvalidRequestError(f"expert {who!r}: metadata.{where}: {why}")

    def count_of(entry: Mapping, where: str, upper: Optional[int]) -> None:
        n = entry.get("count")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            fail(f"{where}.count", f"must be an integer >= 1, got {n!r}")
        if upper is not None and n > upper:
            fail(f"{where}.count", f"{n} can never be met: the detector keeps at most {upper} objects of a class")

    def class_of(entry: Mapping, where: str) -> None:
        c = entry.get("class")
        if c not in COCO_CLASSES:
            alias = {v: k for k, v in DETECTOR_NAMES.items()}.get(c) if isinstance(c, str) else None
            hint = f" (GenEval calls it {alias!r})" if alias else " (one of the 80 COCO classes in GenEval's object_names.txt)"
            fail(f"{where}.class", f"{c!r} is not a class GenEval detects{hint}")

    if not isinstance(record, Mapping):
        raise InvalidRequestError(f"expert {who!r}: metadata must be a GenEval record (a JSON object), got {type(record).__name__}")
    tag = record.get("tag")
    if tag not in TAGS:
        fail("tag", f"{tag!r} is not a GenEval tag ({', '.join(TAGS)})")
    include = record.get("include")
    if not isinstance(include, list) or not include:
        fail("include", "must be a non-empty list of {class, count, color?, position?} objects")
    for i, entry in enumerate(include):
        where = f"include[{i}]"
        if not isinstance(entry, Mapping):
            fail(where, f"must be an object, got {type(entry).__name__}")
        extra = set(entry) - {"class", "count", "color", "position"}
        if extra:
            fail(where, f"unknown key(s) {', '.join(sorted(map(repr, extra)))} (known: class, count, color, position)")
        class_of(entry, where)
        count_of(entry, where, max_count)
        if "color" in entry and entry["color"] not in COLORS:
            fail(f"{where}.color", f"{entry['color']!r} is not one of GenEval's colours ({', '.join(COLORS)})")
        if "position" in entry:
            pos = entry["position"]
            if not isinstance(pos, (list, tuple)) or len(pos) != 2:
                fail(f"{where}.position", f"must be [relation, index of an earlier include entry], got {pos!r}")
            rel, target = pos
            if rel not in RELATIONS:
                fail(f"{where}.position", f"{rel!r} is not a GenEval relation ({', '.join(RELATIONS)})")
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < i:
                # GenEval looks the target up among the groups matched so far: only an earlier entry exists
                fail(f"{where}.position", f"the target {target!r} must be the index of an earlier include entry (0..{i - 1})")
    exclude = record.get("exclude", [])
    if not isinstance(exclude, list):
        fail("exclude", "must be a list of {class, count} objects")
    for i, entry in enumerate(exclude):
        where = f"exclude[{i}]"
        if not isinstance(entry, Mapping):
            fail(where, f"must be an object, got {type(entry).__name__}")
        extra = set(entry) - {"class", "count"}
        if extra:
            fail(where, f"unknown key(s) {', '.join(sorted(map(repr, extra)))} (known: class, count)")
        class_of(entry, where)
        count_of(entry, where, None)


def threshold_for(record: Mapping, threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD) -> float:
    """The confidence an object needs for this record: GenEval's 0.9 for `counting`, 0.3 otherwise."""
    return counting_threshold if record.get("tag") == "counting" else threshold


# ------------------------------------------------------------------------------------------------
# objects


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """GenEval's IoU (pixel-inclusive areas: width = x2 - x1 + 1), used by its optional NMS."""

    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0


def select_objects(candidates: Iterable[tuple[str, Detection]], threshold: float, max_objects: int = MAX_OBJECTS,
                   max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """GenEval's objects from raw (class, detection) pairs: per class, scores strictly above `threshold`
    (compared in float32), most confident first, the first `max_objects`, then greedy NMS at `max_overlap`
    IoU (off at 1.0). Classes with no object are absent."""
    by_class: dict[str, list[Detection]] = {}
    for name, det in candidates:
        by_class.setdefault(name, []).append(det)
    out = {}
    thr = np.float32(threshold)
    for name, dets in by_class.items():
        order = sorted((d for d in dets if np.float32(d.score) > thr), key=lambda d: -float(np.float32(d.score)))[:max_objects]
        kept = []
        while order:
            best = order.pop(0)
            kept.append(best)
            if max_overlap != 1:
                order = [d for d in order if box_iou(best.box, d.box) < max_overlap]
        if kept:
            out[name] = kept
    return out


def colour_requests(record: Mapping, objects: Objects) -> list[tuple[str, int]]:
    """The (class, index) of every object whose colour the rules read: the `count` most confident objects
    of each include entry with a colour (fewer where fewer were found), each once."""
    need = {}
    for req in record.get("include", []):
        if "color" in req:
            for i in range(min(req["count"], len(objects.get(req["class"], ())))):
                need[(req["class"], i)] = None
    return list(need)


def _colours(dets: Sequence[Detection], cls: str) -> list[str]:
    missing = [i for i, d in enumerate(dets) if d.color is None]
    if missing:
        raise ValueError(f"{cls} object(s) {missing} have no colour: classify colour_requests() first")
    return [d.color for d in dets]


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_MARGIN) -> set[str]:
    """GenEval's relations of box A to box B, in float32 as GenEval's arrays."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float32).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - np.float32(margin) * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# ------------------------------------------------------------------------------------------------
# the three verdicts


def geneval_correct(record: Mapping, objects: Objects, margin: float = POSITION_MARGIN) -> bool:
    """GenEval's correctness (its `evaluate`): every include entry met, no exclude entry reached."""
    correct = True
    groups: list[Optional[Sequence[Detection]]] = []
    for req in record["include"]:
        found = list(objects.get(req["class"], ()))[: req["count"]]
        matched = len(found) >= req["count"]
        if matched and "color" in req:
            matched = _colours(found, req["class"]).count(req["color"]) >= req["count"]
        if matched and "position" in req:
            rel, target = req["position"]
            matched = groups[target] is not None and all(
                rel in relative_position(o.box, t.box, margin) for o in found for t in groups[target])
        correct &= matched
        groups.append(found if matched else None)
    for req in record.get("exclude", []):
        if len(objects.get(req["class"], ())) >= req["count"]:
            correct = False
    return correct


def flow_grpo_values(record: Mapping, objects: Objects, margin: float = POSITION_MARGIN) -> tuple[bool, float]:
    """Flow-GRPO's reward server's (strict_correct, score) for one image (its `evaluate_reward`), quirks
    included: exact counts, `exclude` ignored, scores below 0, the position term's extra 1."""
    strict = True
    terms: list[float] = []
    groups: list[Optional[Sequence[Detection]]] = []
    for req in record["include"]:
        found = list(objects.get(req["class"], ()))  # all of them, not the first `count`
        n = req["count"]
        terms.append(1 - abs(n - len(found)) / n)
        matched = True
        if len(found) != n:
            matched = False
            if "color" in req or "position" in req:
                terms.append(0.0)  # one 0, even for an entry with both
        else:
            if "color" in req:
                right = _colours(found, req["class"]).count(req["color"])
                terms.append(1 - abs(n - right) / n)
                matched = right == n
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    matched = False
                    terms.append(0.0)
                else:
                    if not all(rel in relative_position(o.box, t.box, margin) for o in found for t in groups[target]):
                        matched = False
                        terms.append(0.0)
                    terms.append(1.0)  # the server appends it after its loops, failed or not
        strict &= matched
        groups.append(found if matched else None)
    return strict, (sum(terms) / len(terms) if terms else 0)


def partial_reward(record: Mapping, objects: Objects, margin: float = POSITION_MARGIN) -> float:
    """Our dense reward in [0, 1], 1 exactly when `geneval_correct` is: the mean of one term per requirement.

    - count (each include entry): min(found, count) / count;
    - colour (entries with one): the right-coloured among its first min(found, count) objects, / count;
    - position (entries with one): the pairs (one of its first `count` objects, one of the target entry's
      first `count`) in the relation, / (count x target count); missing objects are failed pairs (unlike
      GenEval's, it does not wait for the target's colour to match, so it stays informative);
    - exclude (each entry, at most c - 1 allowed): 1 below c, else max(0, 1 - (found - c + 1) / max(c - 1, 1)).
    """
    terms: list[float] = []
    for req in record["include"]:
        n = req["count"]
        found = list(objects.get(req["class"], ()))[:n]
        terms.append(len(found) / n)
        if "color" in req:
            terms.append(_colours(found, req["class"]).count(req["color"]) / n)
        if "position" in req:
            rel, target = req["position"]
            treq = record["include"][target]
            tfound = list(objects.get(treq["class"], ()))[: treq["count"]]
            ok = sum(rel in relative_position(o.box, t.box, margin) for o in found for t in tfound)
            terms.append(ok / (n * treq["count"]))
    for req in record.get("exclude", []):
        c, found = req["count"], len(objects.get(req["class"], ()))
        terms.append(1.0 if found < c else max(0.0, 1 - (found - c + 1) / max(c - 1, 1)))
    return sum(terms) / len(terms)


def judge(record: Mapping, objects: Objects, margin: float = POSITION_MARGIN) -> Judgement:
    """All verdicts for one image; the objects' colours must be set for `colour_requests(record, objects)`."""
    strict, score = flow_grpo_values(record, objects, margin)
    return Judgement(geneval_correct(record, objects, margin), partial_reward(record, objects, margin), score, strict)


# ------------------------------------------------------------------------------------------------
# Flow-GRPO's answer


def flow_grpo_answer(records: Sequence[Mapping], scores: Sequence[float], strict: Sequence[float | bool],
                     correct: Sequence[float | bool], only_strict: bool = False) -> dict:
    """What Flow-GRPO's GenEval reward server answers for a batch, given each image's record and verdicts
    (`flow_score`, `flow_strict`, `correct`; e.g. the geneval expert's extras "flow_grpo_score",
    "flow_grpo_strict" and "correct"):

    {"scores": [score], "rewards": [1.0/0.0 GenEval correct; 0.0 with only_strict], "strict_rewards": [1.0/0.0],
     "group_rewards": {tag: [...]}, "group_strict_rewards": {tag: [...]}}

    Each per-tag list has one entry per image of the batch, in order: the image's value under its own tag
    and -10.0 under every other of GenEval's six tags (Flow-GRPO's client drops the -10s when it averages).
    With no images the two per-tag dicts are empty, as the server's.
    """
    if not len(records) == len(scores) == len(strict) == len(correct):
        raise InvalidRequestError(f"flow_grpo_answer: {len(records)} records, {len(scores)} scores, "
                                  f"{len(strict)} strict and {len(correct)} correct values")
    out = {"scores": [float(s) for s in scores], "rewards": [], "strict_rewards": [],
           "group_rewards": {}, "group_strict_rewards": {}}
    for record, s, c in zip(records, strict, correct):
        s = 1.0 if s else 0.0
        c = 0.0 if only_strict else (1.0 if c else 0.0)
        out["strict_rewards"].append(s)
        out["rewards"].append(c)
        for tag in TAGS:
            mine = tag == record.get("tag")
            out["group_strict_rewards"].setdefault(tag, []).append(s if mine else MISSED)
            out["group_rewards"].setdefault(tag, []).append(c if mine else MISSED)
    return out

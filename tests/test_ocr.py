"""The ocr expert with its real weights (the PP-OCR ONNX files of the rapidocr wheel), on images rendered
here with the DejaVu fonts that matplotlib ships (no system font needed): the rule on strings against a
direct transcription of Flow-GRPO's, what the recogniser reads across fonts, sizes, colours and positions,
the pairs it refuses, the mixture and a real server."""

import math

import numpy as np
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from t2i_reward.rewarders import InvalidRequestError, ModelLoadError, create_rewarder
from t2i_reward.rewarders.config import RewardConfig
from t2i_reward.rewarders.experts import ocr
from t2i_reward.rewarders.factory import LoadContext
from t2i_reward.rewarders.registry import get_expert_class

FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # the DejaVu faces matplotlib (a dependency) ships


# -- the rule on strings, against Flow-GRPO's as written -----------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Plain edit distance (insert, delete, substitute; cost 1 each), one row at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def flow_grpo_reward(lines: list[str], prompt: str) -> float:
    """`OcrScorer.__call__` of flow_grpo/ocr.py, step by step, for one image whose recognised lines are `lines`."""
    target = prompt.split('"')[1]
    recognised = "".join(lines).replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    dist = 0 if target in recognised else levenshtein(recognised, target)
    if dist > len(target):
        dist = len(target)
    return 1 - dist / len(target)


CASES = [  # (recognised lines, prompt)
    (["Hello World"], 'a sign that says "Hello World"'),
    (["HELLO", "world"], 'a sign that says "Hello World"'),  # lines joined, case and spaces dropped
    (["Helo World"], 'a sign that says "Hello World"'),  # one deletion: 1 - 1/10
    (["Hallo World"], 'a sign that says "Hello World"'),  # one substitution
    (["OPEN 24 HOURS", "Hello World", "EXIT"], 'a sign that says "Hello World"'),  # a substring: 0
    (["xyzxyzxyzxyzxyzxyzxyz"], 'neon "cat"'),  # the distance capped at the target's length
    ([], 'a poster "Sale"'),  # nothing read: 0
    (["Sale 50"], 'a poster "Sale 50%" in red'),  # one missing character at the end
    (["Hello"], 'unclosed quote "Hello world'),  # no closing quote: the rest of the prompt
    (["A B C"], 'first "abc" then "xyz"'),  # the first pair only
    (["hello\tworld"], '"Hello World"'),  # only ' ' is removed, not tabs
]


@pytest.mark.parametrize("lines, prompt", CASES)
def test_the_rule_matches_flow_grpo(lines, prompt):
    ours = ocr.text_reward("".join(lines), ocr.target_for(prompt, {}))
    assert ours == pytest.approx(flow_grpo_reward(lines, prompt), abs=1e-12)


def test_the_rule_on_known_values():
    assert ocr.text_reward("Helo World", "helloworld") == pytest.approx(0.9)
    assert ocr.text_reward("", "cat") == 0.0 and ocr.text_reward("dog", "cat") == 0.0
    assert ocr.text_reward("THE CAT SAT", "cat") == 1.0
    assert ocr.target_for('x "Hi" y', {"text": "Bonjour"}) == "bonjour"  # metadata wins
    assert ocr.target_for("no quotes", {}) is None and ocr.target_for('empty "  "', {}) is None


# -- real weights on rendered images ---------------------------------------------------------------

@pytest.fixture(scope="module")
def expert():
    cls = get_expert_class("ocr")
    return cls.from_config(cls.Config(), LoadContext(torch.device("cpu"), torch.float32, Path("/nonexistent")))


def render(text: str, font="DejaVuSans.ttf", size=56, fg="black", bg="white", at=None, canvas=(512, 512)) -> Image.Image:
    """`text` (lines split on newlines) drawn at `at`, or centred, on a plain canvas."""
    im = Image.new("RGB", canvas, bg)
    draw = ImageDraw.Draw(im)
    face = ImageFont.truetype(str(FONTS / font), size)
    if at is None:
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=face)
        at = ((canvas[0] - right + left) // 2 - left, (canvas[1] - bottom + top) // 2 - top)
    draw.multiline_text(at, text, font=face, fill=fg, spacing=size // 2)
    return im


def score(expert, images, prompts, metadata=None):
    prompts = [prompts] * len(images) if isinstance(prompts, str) else prompts
    out = expert(expert.preprocess.pil(images), prompts, metadata=metadata)
    return out.tolist()


STYLES = [  # font, size, colours, position
    dict(font="DejaVuSans.ttf", size=56),
    dict(font="DejaVuSerif-Bold.ttf", size=44, fg="white", bg="navy"),
    dict(font="DejaVuSansMono.ttf", size=40, fg="darkred", bg="lightyellow", at=(30, 40)),
    dict(font="DejaVuSans-Oblique.ttf", size=64, fg="darkgreen", bg="mistyrose", at=(20, 380)),
    dict(font="DejaVuSansMono-Bold.ttf", size=32, fg=(40, 40, 40), bg=(200, 220, 255)),
]


@pytest.mark.parametrize("style", STYLES, ids=[s["font"].removesuffix(".ttf") for s in STYLES])
def test_the_reward_orders_renderings_as_a_person_would(expert, style):
    prompt = 'a shop sign that says "Hello World"'
    exact, typo, wrong, blank = score(expert, [render("Hello World", **style), render("Hello Warld", **style),
                                               render("Quiet Lake", **style), render("", **style)], prompt)
    assert exact == 1.0
    assert typo == pytest.approx(0.9)  # one letter off in ten, read as drawn
    assert wrong <= 0.2  # another text: next to nothing in common
    assert blank == 0.0
    assert exact > typo > wrong >= blank


def test_several_lines_and_targets_in_one_batch(expert):
    images = [render("OPEN\nLATE"), render("Coffee"), render("SALE 50%", font="DejaVuSerif.ttf"), render("Coffee")]
    prompts = ['a neon sign "open late"', 'a mug printed with "Coffee"', 'a poster "Sale 50%"', 'a mug "Tea"']
    got = score(expert, images, prompts)
    assert got[:3] == [1.0, 1.0, 1.0]  # two lines are read and joined in reading order
    assert got[3] == 0.0  # "coffee" against "tea": distance 5, capped at 3


def test_metadata_text_is_the_target(expert):
    images = [render("Bonjour"), render("Bonjour")]
    got = score(expert, images, ['a sign that says "Hello"', "a sign in French"], metadata=[{"text": "BONJOUR"}, {"text": "Bonjour"}])
    assert got == [1.0, 1.0]


def test_center_crop_of_a_wide_image(expert):
    """The input is the central square: text in the middle of a 2:1 banner is read, text at its edge is not."""
    middle = render("Hello", size=48, canvas=(1024, 512))
    edge = render("Hello", size=48, canvas=(1024, 512), at=(20, 230))
    assert score(expert, [middle, edge], '"Hello"') == [1.0, 0.0]


def test_float_tensor_and_pil_paths_agree(expert):
    im = render("Quality", font="DejaVuSerif-Bold.ttf")
    pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None]
    assert expert(pixels, ['"Quality"'], metadata=None).tolist() == score(expert, [im], '"Quality"') == [1.0]


# -- pairs it refuses, neutral score, loading ---------------------------------------------------------

@pytest.mark.parametrize("prompt, metadata, why", [
    ("a sign with nothing quoted", {}, "double quotes"),
    ('an empty sign ""', {}, "double quotes"),
    ('spaces only "   "', {}, "double quotes"),
    ('a sign "Hi"', {"text": ""}, "'text'"),
    ('a sign "Hi"', {"text": 42}, "'text'"),
    ('a sign "Hi"', {"text": ["Hi"]}, "'text'"),
])
def test_check_pair_refuses(expert, prompt, metadata, why):
    with pytest.raises(InvalidRequestError, match=why) as e:
        expert.check_pair(prompt, metadata)
    assert "'ocr'" in str(e.value) and "text" in str(e.value)


def test_check_pair_accepts(expert):
    expert.check_pair('a sign "Hi"', {})
    expert.check_pair("a sign in French", {"text": "Bonjour"})


def test_a_direct_call_without_target_is_refused_not_crashed(expert):
    with pytest.raises(InvalidRequestError, match="'ocr'"):
        score(expert, [render("Hello")], "no quotes here")


def test_neutral_score():
    cls = get_expert_class("ocr")
    e = cls.from_config(cls.Config(neutral_score=0.25), LoadContext(torch.device("cpu"), torch.float32, Path("/nonexistent")))
    e.check_pair("nothing quoted", {})  # accepted
    with pytest.raises(InvalidRequestError, match="'text'"):
        e.check_pair("nothing quoted", {"text": 3})  # a malformed field is still refused
    assert score(e, [render("Hello"), render("Hello")], ["nothing quoted", '"Hello"']) == [0.25, 1.0]


def test_describe_and_no_random_weights(expert):
    d = expert.describe()
    assert d["random_weights"] is False and d["device"] == "cpu" and d["providers"] == ["CPUExecutionProvider"]
    assert ocr.DET_MODEL in d["checkpoint"] and ocr.REC_MODEL in d["checkpoint"]
    assert next(expert.parameters(), None) is None


def test_bad_model_files_are_load_errors(tmp_path):
    cls = get_expert_class("ocr")
    ctx = LoadContext(torch.device("cpu"), torch.float32, tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        cls.from_config(cls.Config(det_model=str(tmp_path / "missing.onnx")), ctx)
    # a detection model given as the recogniser has no character list: refused, nothing downloaded
    with pytest.raises(ModelLoadError, match="character"):
        cls.from_config(cls.Config(rec_model=str(ocr._wheel_model(ocr.DET_MODEL))), ctx)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="junk.onnx"):
        cls.from_config(cls.Config(det_model=str(tmp_path / "junk.onnx")), ctx)


def test_cuda_without_onnxruntime_gpu_is_a_load_error():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    cls = get_expert_class("ocr")
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        cls.from_config(cls.Config(device="cuda"), LoadContext(torch.device("cpu"), torch.float32, Path("/nonexistent")))


# -- through the mixture ---------------------------------------------------------------------------

def test_through_the_mixture(tmp_path):
    rewarder = create_rewarder(RewardConfig(experts={"ocr": {}}, cache_dir=tmp_path))
    assert rewarder.random_weights is False
    images = [render("Hello World"), render("Hello Warld", font="DejaVuSerif.ttf"), render("")]
    result = rewarder.score('a sign that says "Hello World"', images)
    got = [im.components["ocr"] for im in result.images]
    assert got[0] == 1.0 and got[1] == pytest.approx(0.9) and got[2] == 0.0
    # the total is the normalised score: (s - 0.5) / 0.25 with the default weight 1
    assert [im.total for im in result.images] == pytest.approx([(s - 0.5) / 0.25 for s in got])
    assert not math.isnan(result.mean_reward)
    with pytest.raises(InvalidRequestError, match="image 0: expert 'ocr'.*'text'"):
        rewarder.score("a sign with no quoted text", images[:1])  # refused in the request's checks
    # the `text` metadata field is the target, per pair
    res = rewarder.score("a shop sign", [render("Bonjour"), render("Bonjour")], metadata=[{"text": "Bonjour"}, {"text": "Hello"}])
    assert [im.components["ocr"] for im in res.images] == [1.0, 0.0]
    with pytest.raises(InvalidRequestError, match="image 1: expert 'ocr': metadata field 'text'"):
        rewarder.score("a shop sign", images[:2], metadata=[{"text": "Hi"}, {"text": 7}])


def test_over_http(tmp_path):
    """A real server with the ocr expert: multipart and JSON bodies, the 422 for a pair without a target."""
    import base64
    import io

    import httpx
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    from .conftest import running_server

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    rewarder = create_rewarder(RewardConfig(experts={"ocr": {}}, cache_dir=tmp_path))
    sign, typo = png(render("Hello World")), png(render("Hello Warld"))
    with running_server(create_app(Settings(max_wait_ms=2), rewarder=rewarder)) as url, httpx.Client(base_url=url, timeout=60) as http:
        files = [("images", ("a.png", sign, "image/png")), ("images", ("b.png", typo, "image/png"))]
        r = http.post("/reward", data={"prompt": 'a sign that says "Hello World"'}, files=files)
        assert r.status_code == 200, r.text
        assert [im["components"]["ocr"] for im in r.json()["images"]] == pytest.approx([1.0, 0.9])
        bad = http.post("/reward", data={"prompt": "a sign"}, files=files)
        assert bad.status_code == 422 and "'ocr'" in bad.text and "'text'" in bad.text, bad.text
        body = {"prompt": "a sign", "images": [base64.b64encode(sign).decode()], "metadata": [{"text": "hello world"}]}
        j = http.post("/reward", json=body)
        assert j.status_code == 200 and j.json()["images"][0]["components"]["ocr"] == 1.0, j.text


def test_nothing_is_downloaded(monkeypatch, tmp_path):
    """The wheel's files are named explicitly, so rapidocr's download path (models, dictionaries) is never taken."""
    from rapidocr.utils.download_file import DownloadFile

    def refuse(*a, **k):
        raise AssertionError("rapidocr tried to download")

    monkeypatch.setattr(DownloadFile, "run", refuse)
    cls = get_expert_class("ocr")
    e = cls.from_config(cls.Config(), LoadContext(torch.device("cpu"), torch.float32, tmp_path))
    assert score(e, [render("Offline")], '"Offline"') == [1.0]


def test_workers_read_the_same(expert):
    cls = get_expert_class("ocr")
    two = cls.from_config(cls.Config(workers=2, threads=1), LoadContext(torch.device("cpu"), torch.float32, Path("/nonexistent")))
    images = [render("Alpha"), render("Bravo", font="DejaVuSerif.ttf"), render(""), render("Charlie", fg="white", bg="black")]
    prompts = ['"Alpha"', '"Bravo"', '"Delta"', '"Charly"']
    assert score(two, images, prompts) == score(expert, images, prompts) == pytest.approx([1.0, 1.0, 0.0, 4 / 6])  # charlie -> charly: 2 edits

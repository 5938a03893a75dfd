"""POST /compat/flow-grpo[/geneval] (service/routers/compat.py): Flow-GRPO's reward clients against the real
service over loopback, built as `flow_grpo/rewards.py` builds them (requests, np.array_split, PIL JPEG,
pickle.dumps, pickle.loads of the answer), and hostile pickles that must run nothing."""

import io
import os
import pickle
import subprocess

import numpy as np
import pytest
import requests
from PIL import Image
from requests.adapters import HTTPAdapter, Retry
from t2i_reward.rewarders import flow_grpo
from t2i_reward.service.app import create_app
from t2i_reward.service.settings import Settings

from .conftest import LIMITS, running_server, smooth_image
from .test_safe_pickle import RECORD, Reduces, nested_lists

KEY = "compat-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["a red apple", "a blue car", "a green house", "a cat", "a dog", "a bird"]


@pytest.fixture(scope="module")
def server(tiny):
    app = create_app(Settings(**LIMITS, api_keys=[KEY], flow_grpo_compat=True), rewarder=tiny)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def server_off(tiny):
    with running_server(create_app(Settings(**LIMITS, api_keys=[KEY]), rewarder=tiny)) as url:
        yield url


def session(headers=AUTH) -> requests.Session:
    """Flow-GRPO's session: retries on 500 only (a few here, not 1000), plus our API key (one line in rewards.py)."""
    sess = requests.Session()
    sess.mount("http://", HTTPAdapter(max_retries=Retry(total=2, backoff_factor=0.1, status_forcelist=[500], allowed_methods=False)))
    sess.headers.update(headers)
    return sess


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")  # as rewards.py: PIL's default quality
    return buffer.getvalue()


def remote_scorer(url: str, batch_size: int = 64, send_prompts: bool = True):
    """`unifiedreward_score_remote`'s _fn (with send_prompts=False: `deqa_score_remote`'s), pointed at `url`."""
    sess = session()

    def fn(images: np.ndarray, prompts):
        images_batched = np.array_split(images, np.ceil(len(images) / batch_size))
        prompts_batched = np.array_split(prompts, np.ceil(len(prompts) / batch_size))
        scores = []
        for image_batch, prompt_batch in zip(images_batched, prompts_batched):
            data = {"images": [jpeg(image) for image in image_batch]}
            if send_prompts:
                data["prompts"] = prompt_batch  # a numpy str array, as np.array_split gives
            response = sess.post(url, data=pickle.dumps(data), timeout=120)
            assert response.status_code == 200, response.text
            scores += pickle.loads(response.content)["outputs"]
        return scores, {}

    return fn


def batch(n: int) -> np.ndarray:
    """Generated images as Flow-GRPO holds them after its NCHW -> NHWC transpose: uint8 (B, H, W, 3)."""
    return np.stack([np.asarray(smooth_image(i, 96, 96)) for i in range(n)])


def library_scores(tiny, images: np.ndarray, prompts):
    checked = tiny.check_request(list(prompts), [jpeg(im) for im in images])
    return tiny.score_checked([checked])[0]


def test_the_remote_scorer_gets_the_mixtures_totals(server, tiny):
    images = batch(4)
    scores, info = remote_scorer(f"{server}/compat/flow-grpo")(images, PROMPTS[:4])
    assert info == {}
    expected = library_scores(tiny, images, PROMPTS[:4])
    assert all(type(s) is float for s in scores)
    assert scores == pytest.approx([im.total for im in expected.images], abs=1e-5)


def test_batches_split_by_np_array_split(server, tiny):
    """6 images in batches of 3 (two requests; the service's max_images here is 4): one score per image, in order."""
    images = batch(6)
    scores, _ = remote_scorer(f"{server}/compat/flow-grpo", batch_size=3)(images, tuple(PROMPTS))
    expected = [im.total for part in (slice(0, 3), slice(3, 6))
                for im in library_scores(tiny, images[part], PROMPTS[part]).images]
    assert scores == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("expert", ["imagereward", "aesthetic"])
def test_reward_picks_one_experts_raw_score(server, tiny, expert):
    images = batch(3)
    scores, _ = remote_scorer(f"{server}/compat/flow-grpo?reward={expert}")(images, PROMPTS[:3])
    expected = library_scores(tiny, images, PROMPTS[:3])
    assert scores == pytest.approx([im.components[expert] for im in expected.images], abs=1e-5)


def post(url: str, body, headers=AUTH) -> requests.Response:
    return requests.post(url, data=body if isinstance(body, bytes) else pickle.dumps(body), headers=headers, timeout=60)


def body(n: int = 2, **extra) -> dict:
    return {"images": [jpeg(im) for im in batch(n)], "prompts": np.array(PROMPTS[:n]), **extra}


@pytest.mark.parametrize("make, status, fragment", [
    (lambda: {"images": body()["images"]}, 422, "'prompts' is required"),  # deqa_score_remote's body
    (lambda: body(prompts=PROMPTS[:3]), 422, "3 prompts for 2 images"),
    (lambda: body(prompts=np.array([["a", "b"]])), 422, "1-D"),
    (lambda: body(prompts=np.array([1.0, 2.0])), 422, "dtype str"),
    (lambda: body(images="not a list"), 422, "'images' must be a list"),
    (lambda: body(images=[]), 422, "'images' is empty"),
    (lambda: body(5), 422, "limit is 4"),
    (lambda: {**body(), "images": [b"not a jpeg", jpeg(batch(1)[0])]}, 400, "images[0]"),
    (lambda: ["a list"], 422, "must be a dict"),
])
def test_bad_scorer_bodies(server, make, status, fragment):
    r = post(f"{server}/compat/flow-grpo", make())
    assert r.status_code == status, r.text
    assert fragment in r.text


def test_unknown_reward_is_422(server):
    r = post(f"{server}/compat/flow-grpo?reward=nope", body())
    assert r.status_code == 422 and "'nope' is not one of" in r.json()["detail"]


def geneval_body(n: int = 2, only_strict: bool = True) -> dict:
    """`geneval_score`'s body: images, list() of np.array_split of the records (an object array), only_strict."""
    records = [dict(RECORD, prompt=p) for p in PROMPTS[:n]]
    return {"images": [jpeg(im) for im in batch(n)], "meta_datas": list(np.array_split(records, 1)[0]),
            "only_strict": only_strict}


def test_geneval_without_the_geneval_expert_is_422(server):
    r = post(f"{server}/compat/flow-grpo/geneval", geneval_body())
    assert r.status_code == 422 and "no 'geneval' expert" in r.json()["detail"], r.text


@pytest.mark.parametrize("change, fragment", [
    (dict(meta_datas=[RECORD]), "1 meta_datas for 2 images"),
    (dict(meta_datas=[{"tag": "counting"}, RECORD]), "meta_datas[0] has no 'prompt'"),
    (dict(meta_datas=[RECORD, {"prompt": b"bytes"}]), "meta_datas[1] must be a JSON object"),
    (dict(meta_datas=[RECORD, {"prompt": "p", "x": float("nan")}]), "meta_datas[1] must be a JSON object"),
    (dict(only_strict="yes"), "'only_strict' must be a bool"),
])
def test_bad_geneval_bodies_are_422(server, change, fragment):
    r = post(f"{server}/compat/flow-grpo/geneval", {**geneval_body(), **change})
    assert r.status_code == 422 and fragment in r.text, r.text


def test_an_object_array_of_records_is_400(server):
    """A client that forgot list() around np.array_split: an object array is refused, whatever it holds."""
    data = {**geneval_body(), "meta_datas": np.array_split([RECORD, RECORD], 1)[0]}
    r = post(f"{server}/compat/flow-grpo/geneval", data)
    assert r.status_code == 400 and "dtype" in r.json()["detail"], r.text


def test_off_unless_enabled(server_off):
    for path in ("/compat/flow-grpo", "/compat/flow-grpo/geneval"):
        r = post(f"{server_off}{path}", body())
        assert r.status_code == 404 and "T2I_SERVICE_FLOW_GRPO_COMPAT" in r.json()["detail"]


def test_needs_the_api_key(server, server_off):
    for url in (f"{server}/compat/flow-grpo", f"{server}/compat/flow-grpo/geneval", f"{server_off}/compat/flow-grpo"):
        assert post(url, body(), headers={}).status_code == 401  # Flow-GRPO's own session sends no key
        assert post(url, body(), headers={"Authorization": "Bearer wrong"}).status_code == 403


def hostile_bodies(path) -> dict:
    cmd = f"touch {path}"
    return {
        "os.system": pickle.dumps({"images": [b"x"], "prompts": Reduces(os.system, cmd)}),
        "builtins.eval": pickle.dumps(Reduces(eval, f"open({str(path)!r}, 'w').close()")),
        "subprocess.Popen": pickle.dumps({"images": Reduces(subprocess.Popen, ["touch", str(path)])}),
        "posix.system": f"cposix\nsystem\n(V{cmd}\ntR.".encode(),
        "object array": pickle.dumps({"images": [b"x"], "prompts": np.array(["a", Reduces(os.system, cmd)], dtype=object)}),
        "REDUCE of an allowed global with bad args": b"\x80\x04\x8c\x05numpy\x8c\x07ndarray\x93J\x00\xca\x9a;\x85\x85R.",
        "deep nesting": nested_lists(100_000),
        "bytes longer than the body": b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"abc.",
        "truncated": pickle.dumps(body())[:-30],
        "not a pickle": b"GIF89a...",
    }


@pytest.mark.parametrize("name", list(hostile_bodies("x")))
@pytest.mark.parametrize("path", ["/compat/flow-grpo", "/compat/flow-grpo/geneval"])
def test_hostile_pickles_are_400_and_run_nothing(server, tmp_path, name, path):
    target = tmp_path / "pwned"
    r = post(f"{server}{path}", hostile_bodies(target)[name])
    assert r.status_code == 400, r.text
    assert not target.exists()
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200  # and the server is still up


def test_a_huge_memo_index_is_harmless(server):
    """LONG_BINPUT 4e9 (the C unpickler would size its memo array to it) is just a dict key here: the body
    loads (an int, not a dict: 422) and the server is still up."""
    r = post(f"{server}/compat/flow-grpo", b"\x80\x04K\x05r\xff\xff\xff\xf00j\xff\xff\xff\xf0.")
    assert r.status_code == 422 and "must be a dict" in r.text
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200


def test_a_body_over_the_limit_is_413(server):
    big = pickle.dumps({"images": [b"\0" * (LIMITS["max_body_bytes"] + 1)], "prompts": ["a"]})
    assert post(f"{server}/compat/flow-grpo", big).status_code == 413


def test_the_answer_unpickles_with_nothing_imported():
    """The answer holds only builtins: any client's pickle.loads reads it, and so does the safe reader."""
    data = flow_grpo.encode_answer({"outputs": np.array([1.5, 2.0], np.float32), "group": {"tag": [1, 0.5]}})
    assert b"numpy" not in data and b"torch" not in data
    assert pickle.loads(data) == flow_grpo.decode_answer(data) == {"outputs": [1.5, 2.0], "group": {"tag": [1.0, 0.5]}}


def test_geneval_answers_as_the_geneval_expert(tmp_path_factory):
    """With the geneval expert in the mixture (it arrives with branch `geneval`; skipped before), Flow-GRPO's
    GenEval client gets `geneval_rules.flow_grpo_answer` of the expert's extras, for both only_strict values."""
    rules = pytest.importorskip("t2i_reward.rewarders.geneval_rules")
    from t2i_reward.rewarders import RewardConfig, create_rewarder

    cache = os.environ.get("T2I_REWARD_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))
    rewarder = create_rewarder(RewardConfig(profile="tiny", cache_dir=cache, calibration=None, experts={
        "aesthetic": {"clip": "tiny", "head": "tiny", "mean": 0.0, "std": 1.0},
        "geneval": {"detector": "tiny", "clip": "tiny", "image_size": 128}}))
    records = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
               {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"},
               {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}],
                "prompt": "three dogs"}]
    jpegs = [jpeg(im) for im in batch(3)]
    with running_server(create_app(Settings(**LIMITS, api_keys=[KEY], flow_grpo_compat=True), rewarder=rewarder)) as url:
        for only_strict in (True, False):
            data = {"images": jpegs, "meta_datas": list(np.array_split(records, 1)[0]), "only_strict": only_strict}
            r = session().post(f"{url}/compat/flow-grpo/geneval", data=pickle.dumps(data), timeout=120)
            assert r.status_code == 200, r.text
            res = rewarder.score_checked([rewarder.check_request([m["prompt"] for m in records], jpegs, metadata=records)])[0]
            expected = rules.flow_grpo_answer(records, *([im.extras[f"geneval.{n}"] for im in res.images]
                                                         for n in ("flow_grpo_score", "flow_grpo_strict", "correct")),
                                              only_strict=only_strict)
            assert pickle.loads(r.content) == expected
            assert sorted(expected) == ["group_rewards", "group_strict_rewards", "rewards", "scores", "strict_rewards"]

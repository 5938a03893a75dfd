"""The wire format (`t2i_reward.rewarders.wire`) both ways: what a client encodes, the service decodes to the
same tensors, dtypes and metadata, and the answers the service encodes decode to the library's own
result; malformed bodies raise the errors the service answers with its 400 / 415 / 422, and the real
HTTP answers carry those statuses and messages."""

import json
import math

import pytest
import torch
from safetensors.torch import save as save_safetensors
from t2i_reward.rewarders import wire
from t2i_reward.rewarders.errors import (
    InvalidBodyError,
    InvalidImageError,
    InvalidRequestError,
    MalformedBodyError,
    UnsupportedMediaTypeError,
)
from t2i_reward.service.errors import http_error

from .conftest import smooth_image
from .test_images import png_bytes

U8 = torch.randint(0, 256, (3, 24, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
F32 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("images", [U8, F32, F32.half()], ids=["uint8", "float32", "float16"])
@pytest.mark.parametrize("prompts", ["one prompt for all", ["a cat", "a dog", "a car"]], ids=["one", "each"])
def test_tensor_request_round_trip(images, prompts):
    if isinstance(prompts, list):
        prompts = prompts[: len(images)]
    group_ids = ["g0", 7, "g0"][: len(images)]
    body = wire.encode_tensor_request(images, prompts, {"aesthetic": 0.5, "mlp": -2.0}, group_ids, explain=True)
    got = wire.decode_reward_request(wire.OCTET, body)
    assert got.tensor.dtype == images.dtype and got.tensor.shape == images.shape and torch.equal(got.tensor, images)
    assert got.prompts == prompts and got.weights == {"aesthetic": 0.5, "mlp": -2.0}
    assert got.group_ids == group_ids and got.explain is True and got.images is None
    bare = wire.decode_reward_request(wire.OCTET, wire.encode_tensor_request(images, prompts))
    assert (bare.weights, bare.group_ids, bare.explain) == (None, None, False)
    grad = wire.decode_gradient_request(wire.encode_tensor_request(images, prompts, {"aesthetic": 2.0}))
    assert torch.equal(grad.images, images) and grad.prompts == prompts and grad.weights == {"aesthetic": 2.0}


def test_tensor_request_takes_any_device_layout_and_a_graph():
    x = F32.clone().requires_grad_(True)
    strided = x.permute(0, 1, 3, 2)  # not contiguous, and part of a graph: sent as its values
    got = wire.decode_gradient_request(wire.encode_tensor_request(strided, ("a", "b")))
    assert torch.equal(got.images, strided.detach()) and got.prompts == ["a", "b"]


def test_json_request_round_trip():
    images = [png_bytes(smooth_image(0, 24, 32)), png_bytes(smooth_image(1, 8, 8))]
    body = json.dumps(wire.encode_json_request("a red apple", images, {"aesthetic": 1.5})).encode()
    got = wire.decode_reward_request(wire.JSON, body)
    assert got.images == images and got.prompts == "a red apple" and got.weights == {"aesthetic": 1.5}
    assert (got.tensor, got.group_ids, got.explain) == (None, None, False)


def test_multipart_fields_decode_like_json():
    images = [png_bytes(smooth_image(2, 16, 16)), png_bytes(smooth_image(3, 12, 20))]
    got = wire.decode_reward_request(wire.MULTIPART, {"prompts": ["a", "b"], "images": images, "group_ids": ["1", "1"],
                                                      "weights": ['{"aesthetic": 3}'], "explain": ["True"]})
    assert (got.prompts, got.images, got.group_ids, got.weights, got.explain) == (["a", "b"], images, ["1", "1"], {"aesthetic": 3}, True)
    assert wire.decode_reward_request(wire.MULTIPART, {"prompt": ["first", "last"], "images": images}).prompts == "last"


def result_of(tiny, explain: bool, group_ids):
    prompts = ["a red apple", "a blue car", "a green forest"]
    return tiny.score_checked([tiny.check_tensor_request(prompts, U8, group_ids=group_ids, explain=explain)])[0]


def assert_same_scores(got: wire.BatchScores, ref: wire.BatchScores):
    assert got.rewards.dtype == torch.float32 and torch.equal(got.rewards, ref.rewards)
    for name in ("components", "advantages", "percentiles"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.keys() == b.keys(), name
            for k in a:
                assert a[k].dtype == torch.float32 and torch.equal(a[k].isnan(), b[k].isnan()), (name, k)
                assert torch.equal(a[k].nan_to_num(), b[k].nan_to_num()), (name, k)
    assert got.mean_reward == ref.mean_reward and got.experts == ref.experts


@pytest.mark.parametrize("explain,group_ids", [(False, None), (True, [0, 1, 0])], ids=["plain", "explain+groups"])
def test_score_answers_round_trip(tiny, explain, group_ids):
    """The service's safetensors answer and its JSON answer both decode to the library's own result."""
    result = result_of(tiny, explain, group_ids)
    ref = wire.batch_scores_from_result(result)
    body = wire.encode_scores(result)
    meta = wire.safetensors_metadata(body)
    assert json.loads(meta["component_rewards"]) == result.component_rewards and float(meta["mean_reward"]) == result.mean_reward
    assert_same_scores(wire.decode_scores(wire.OCTET, body), ref)
    assert_same_scores(wire.decode_scores(wire.JSON, json.dumps(result.to_dict()).encode()), ref)
    assert (ref.advantages is not None) == (group_ids is not None)
    if explain:  # the tiny calibration lacks no expert here, but a None percentile must come back as NaN
        result.images[1].percentiles["mlp"] = None
        back = wire.decode_scores(wire.OCTET, wire.encode_scores(result))
        assert math.isnan(back.percentiles["mlp"][1]) and not back.percentiles["mlp"][0].isnan()


def test_gradient_answer_round_trip(tiny):
    out = tiny.reward_and_gradient(F32, ["a cat", "a dog"])
    body = wire.encode_gradient_answer(out, tiny.sources())
    back = wire.decode_gradient_answer(body)
    assert back.keys() == out.keys() and all(torch.equal(back[k], out[k].cpu()) and back[k].dtype == out[k].dtype for k in out)
    assert json.loads(wire.safetensors_metadata(body)["experts"]) == tiny.sources()


def st(images=F32[:1], **meta) -> bytes:
    return save_safetensors({"images": images} if images is not None else {"pixels": F32[:1]}, metadata=meta)


# (content type, body, the error class, its status, its message): the same answers as before wire.py existed
MALFORMED = [
    ("text/plain", b"x", UnsupportedMediaTypeError, 415, "unsupported content type 'text/plain': send application/json, "
     "multipart/form-data or application/octet-stream (safetensors)"),
    (wire.OCTET, b"not safetensors at all", MalformedBodyError, 400, "body is not a valid safetensors file"),
    (wire.OCTET, (10**6).to_bytes(8, "little") + b"{}", MalformedBodyError, 400, "body is not a valid safetensors file"),
    (wire.OCTET, st(None, prompts='"a"'), InvalidRequestError, 422, "safetensors must hold a tensor named 'images'"),
    (wire.OCTET, st(), InvalidRequestError, 422, "safetensors metadata 'prompts' (a JSON list with one prompt per image, "
     "or one string) is required"),
    (wire.OCTET, st(prompts='"a"', weights="[1]"), InvalidRequestError, 422, "metadata 'weights' must be a JSON dict"),
    (wire.OCTET, st(prompts='"a"', group_ids="{"), InvalidRequestError, 422, "metadata 'group_ids' must be a JSON list"),
    (wire.OCTET, st(prompts='"a"', explain="yes"), InvalidRequestError, 422, "metadata 'explain' must be true or false"),
    (wire.JSON, b'{"prompt": "a", "images": ["!!!"]}', InvalidImageError, 400, "images[0]: not valid base64"),
    (wire.JSON, b'{"prompt": "a", "images": ["data:image/png,AAAA"]}', InvalidImageError, 400,
     "images[0]: data URL must be base64-encoded (data:image/...;base64,...)"),
    (wire.JSON, b'{"prompt": "a", "prompts": ["a"], "images": []}', InvalidRequestError, 422,
     "send either field 'prompt' (one for all images) or 'prompts' (one per image), not both"),
]


@pytest.mark.parametrize("ctype,body,error,status,message", MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_bodies_are_the_same_4xx(make_client, ctype, body, error, status, message):
    with pytest.raises(error) as e:
        wire.decode_reward_request(ctype, body)
    answer = http_error(e.value)
    assert (answer.status_code, answer.detail) == (status, message)
    r = make_client().post("/reward", content=body, headers={"content-type": ctype})
    assert (r.status_code, r.json()["detail"]) == (status, message)


def test_schema_errors_are_a_422_list_without_the_input(make_client):
    body = b'{"prompt": 3, "images": "' + b"x" * 1000 + b'"}'
    with pytest.raises(InvalidBodyError) as e:
        wire.decode_reward_request(wire.JSON, body)
    r = make_client().post("/reward", content=body, headers={"content-type": wire.JSON})
    assert r.status_code == 422 and r.json()["detail"] == e.value.errors == http_error(e.value).detail
    assert [d["loc"] for d in e.value.errors] == [["prompt"], ["images"]] and "x" * 100 not in r.text


@pytest.mark.parametrize("meta,message", [
    ({"prompts": "a"}, "metadata 'prompts' and 'weights' must be JSON"),
    ({}, "metadata 'prompts' must be a JSON list of strings (one per image) or one string"),
    ({"prompts": '"a"', "weights": "[1]"}, "metadata 'weights' must be a JSON object"),
])
def test_malformed_gradient_bodies_are_422(make_client, meta, message):
    with pytest.raises(InvalidRequestError, match="metadata"):
        wire.decode_gradient_request(st(**meta))
    r = make_client().post("/reward/gradient", content=st(**meta), headers={"content-type": wire.OCTET})
    assert (r.status_code, r.json()["detail"]) == (422, message)

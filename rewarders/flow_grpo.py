"""Flow-GRPO's reward-server protocol: its request bodies, read with the safe unpickler, and its answers.

Flow-GRPO (github.com/yifan123/flow_grpo, `flow_grpo/rewards.py`) scores through remote servers with a
pickled dict per batch of at most 64 images, POSTed with `requests` (no content type, no auth header), and
reads the answer with `pickle.loads(response.content)`:

| client | body | answer keys it reads |
| --- | --- | --- |
| `geneval_score` | `{"images": [JPEG bytes], "meta_datas": list(np.array_split(metadatas, n)[i]) (GenEval records), "only_strict": bool}` | `scores`, `rewards`, `strict_rewards` (lists, extended), `group_rewards`, `group_strict_rewards` (dicts tag -> list) |
| `unifiedreward_score_remote` | `{"images": [JPEG bytes], "prompts": np.array_split(prompts, n)[i]}`: a 1-D numpy str array | `outputs` |
| `deqa_score_remote` | `{"images": [JPEG bytes]}` | `outputs` |

The images are `PIL.Image.fromarray(uint8 HWC).save(buffer, format="JPEG")` bytes. `list()` of an object array
of GenEval records is a plain list of the dicts; only the prompts arrive as a numpy array (dtype `<U{n}`).
The reference servers (github.com/yifan123/reward-server) answer `pickle.dumps(dict)`.

This module decodes those bodies into plain Python (bytes, str, JSON objects) and encodes answers. Bad
pickles are `UnsafePickleError` (400); a pickle that loads but has the wrong fields is
`InvalidRequestError` (422). Unknown keys are ignored, as the reference servers do.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from .errors import InvalidRequestError
from .limits import Limits
from .safe_pickle import safe_loads

MEDIA_TYPE = "application/octet-stream"  # the answer's; the client reads the bytes whatever the type
ANSWER_PROTOCOL = 4  # readable by every Python 3 client Flow-GRPO runs on (3.8+), not only 3.14's default 5


@dataclass
class ScorerRequest:
    """A generic remote-scorer body: encoded images, and one prompt per image when the client sent them."""

    images: list[bytes]
    prompts: Optional[list[str]]


@dataclass
class GenevalRequest:
    """A GenEval body: encoded images, one GenEval record (a JSON object) per image, and `only_strict`."""

    images: list[bytes]
    metadata: list[dict]
    only_strict: bool

    @property
    def prompts(self) -> list[str]:
        return [m["prompt"] for m in self.metadata]


def max_ops(limits: Limits) -> int:
    """Opcodes a body may have: ample for `max_images` images with their prompts and GenEval records (a record
    is ~100 opcodes), and a bound on the objects a small hostile pickle can make."""
    return 4096 + 1024 * limits.max_images


def _load(body: bytes, limits: Limits) -> dict:
    data = safe_loads(body, max_ops=max_ops(limits))
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the pickled body must be a dict; got {type(data).__name__}")
    return data


def _images(data: Mapping, limits: Limits) -> list[bytes]:
    images = data.get("images")
    if not isinstance(images, (list, tuple)) or not all(isinstance(im, (bytes, bytearray)) for im in images):
        raise InvalidRequestError("'images' must be a list of encoded images (JPEG bytes)")
    if not images:
        raise InvalidRequestError("'images' is empty")
    if len(images) > limits.max_images:
        raise InvalidRequestError(f"{len(images)} images; the limit is {limits.max_images}")
    return [bytes(im) for im in images]


def _prompts(value: Any, limits: Limits) -> list[str]:
    """Prompts as a list of str, or as the 1-D numpy str array `np.array_split` gives; its size is checked
    before any element becomes a Python object."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind != "U":
            raise InvalidRequestError("'prompts' as a numpy array must be 1-D with dtype str")
        if value.shape[0] > limits.max_images:
            raise InvalidRequestError(f"{value.shape[0]} prompts; the limit is {limits.max_images}")
        try:
            value = value.tolist()
        except (ValueError, UnicodeError):  # code points beyond Unicode in the raw data
            raise InvalidRequestError("'prompts' holds invalid characters") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise InvalidRequestError("'prompts' must be a list of strings or a numpy str array, one per image")
    return [str(p) for p in value]  # np.str_ -> str


def _record(value: Any, index: int) -> dict:
    """A GenEval record as a plain JSON object (numpy str and float scalars become str and float)."""
    if not isinstance(value, dict):
        raise InvalidRequestError(f"meta_datas[{index}] must be a dict (a GenEval record)")
    try:  # safe_loads bounded the nesting, so json recurses safely
        record = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        raise InvalidRequestError(f"meta_datas[{index}] must be a JSON object (str keys; str, number, bool, "
                                  "null, list and dict values)") from None
    if not isinstance(record.get("prompt"), str):
        raise InvalidRequestError(f"meta_datas[{index}] has no 'prompt' string")
    return record


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidRequestError(f"'{name}' must be a bool")


def decode_scorer_request(body: bytes, limits: Limits | None = None) -> ScorerRequest:
    """A generic remote-scorer body (`unifiedreward_score_remote`, `deqa_score_remote`)."""
    limits = limits or Limits()
    data = _load(body, limits)
    images = _images(data, limits)
    prompts = _prompts(data["prompts"], limits) if data.get("prompts") is not None else None
    return ScorerRequest(images, prompts)


def decode_geneval_request(body: bytes, limits: Limits | None = None) -> GenevalRequest:
    """A `geneval_score` body: images, `meta_datas` (one GenEval record per image, each with its 'prompt')
    and `only_strict` (absent: False, every reward computed)."""
    limits = limits or Limits()
    data = _load(body, limits)
    images = _images(data, limits)
    records = data.get("meta_datas")
    if not isinstance(records, (list, tuple)):
        raise InvalidRequestError("'meta_datas' must be a list with one GenEval record per image")
    if len(records) != len(images):
        raise InvalidRequestError(f"{len(records)} meta_datas for {len(images)} images")
    metadata = [_record(r, i) for i, r in enumerate(records)]
    return GenevalRequest(images, metadata, _flag(data.get("only_strict", False), "only_strict"))


def _plain(value: Any) -> Any:
    """An answer's values as plain Python lists and floats (no numpy or torch types: the client needs only
    pickle); None (a pair an expert could not score) as NaN, since the client does arithmetic on them."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _plain(value.tolist())
    if value is None:  # an expert that could not score the pair
        return float("nan")
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"an answer value of type {type(value).__name__}")


def encode_answer(answer: Mapping[str, Any]) -> bytes:
    """An answer dict (e.g. `{"outputs": [...]}`) as the pickle the client reads: plain lists of floats and
    dicts of them, so unpickling it needs no import on the client's side."""
    return pickle.dumps(_plain(answer), protocol=ANSWER_PROTOCOL)


def decode_answer(content: bytes) -> dict:
    """An answer as the client reads it (tests; the safe unpickler, which plain answers pass)."""
    out = safe_loads(content)
    if not isinstance(out, dict):
        raise InvalidRequestError("the answer is not a dict")
    return out


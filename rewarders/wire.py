"""The reward API's wire format, in one place: the bodies of POST /reward and /reward/gradient and their
answers. Both sides use this module: the clients (client.py, reward_fns.py) encode requests and decode
answers with it, the service's router decodes requests and encodes answers with it. No FastAPI here, so
the clients stay light; input that breaks the format raises the library's errors (errors.py), which the
service answers as 400 (`MalformedBodyError`, `InvalidImageError`), 415 (`UnsupportedMediaTypeError`) or
422 (any other `InvalidRequestError`).

POST /reward takes one of three bodies, all with the same fields:
- JSON (`RewardRequest`): `prompt` (one for all images) or `prompts` (one per image), `images` (base64
  strings or data URLs), optional `weights` (expert -> weight), `group_ids` (one per image), `explain`,
  `metadata` (one JSON object per image, or one for all: rewarders/metadata.py);
- multipart/form-data: `prompt` or repeated `prompts` text fields, `images` files, `weights` as a JSON
  text field, repeated `group_ids`, `explain` ("true"/"false"), repeated `metadata` (a JSON object per
  image, in order; a single one stands for every image);
- safetensors (`application/octet-stream`): the tensor `images`, uint8 (B, H, W, 3) or float16/float32
  (B, 3, H, W) in [0, 1], never encoded as an image; string metadata `prompts` (a JSON list, or one
  prompt), optional `weights` and `group_ids` (JSON), `explain` ("true"/"false"), `metadata` (a JSON list
  of one object per image, or one object).
Its answer is JSON (`RewardResponse`: `RewardResult.to_dict()`), or with `Accept: application/octet-stream`
safetensors: `rewards`, `components.<expert>`, `extras.<expert>.<name>`, with group ids `advantages` and
`advantages.<expert>`, with explain `percentiles.<expert>` (NaN where the calibration has none); NaN where
an expert failed on a pair; metadata `mean_reward`, `component_rewards`, `experts`, and when there are any
`errors` (per image: null or {expert: why}) and `summaries` (JSON). Clients read either into `BatchScores`.

POST /reward/gradient takes safetensors only: `images` float (B, 3, H, W) in [0, 1], metadata `prompts`
(JSON: a list, or one string) and optional `weights`; its answer is safetensors `rewards`, `grad`
(d(sum of totals)/d(images)) and `components.<expert>`, metadata `experts`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Mapping, Optional, Sequence, Union

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import InvalidBodyError, InvalidImageError, InvalidRequestError, MalformedBodyError, UnsupportedMediaTypeError
from .limits import Limits
from .metadata import MetadataObject

JSON = "application/json"
MULTIPART = "multipart/form-data"
OCTET = "application/octet-stream"  # a safetensors body or answer
REWARD_MEDIA_TYPES = (JSON, MULTIPART, OCTET)
TENSOR_HEADERS = {"content-type": OCTET, "accept": OCTET}  # a /reward call with tensors in and out

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
MAX_BATCH = 1024  # schema bound of the per-image lists; the service's max_images is the limit that counts
GroupId = Union[Annotated[str, Field(max_length=256)], Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]]


# ------------------------------------------------------------------------------------------------
# the JSON schemas of /reward

class RewardRequest(BaseModel):
    prompt: Optional[str] = Field(None, description="The prompt all the images were generated from; or send `prompts`.",
                                  examples=["a red apple on a wooden table"])
    prompts: Optional[list[str]] = Field(None, min_length=1, max_length=MAX_BATCH, description="One prompt per image, in the "
                                         "order of `images` (batched (prompt, image) pairs); instead of `prompt` (sending "
                                         "both is refused with 422).")
    images: list[Annotated[str, Field(min_length=1)]] = Field(..., max_length=MAX_BATCH, description="Images as base64 "
                                                               "strings or data URLs (PNG, JPEG, WebP, ...).",
                              examples=[[f"data:image/png;base64,{PNG_1PX}"]])
    weights: Optional[dict[str, float]] = Field(None, description="Per-expert weight overrides for this call.",
                                                examples=[{"aesthetic": 0.5}])
    group_ids: Optional[list[GroupId]] = Field(None, max_length=MAX_BATCH, description="One group id per image (e.g. the "
                                               "prompt's index in a GRPO batch): the answer's `advantages` are the "
                                               "scores z-scored within each group.")
    explain: bool = Field(False, description="Add each image's percentile per expert, from the configured calibration file.")
    metadata: Optional[Union[Annotated[list[Optional[MetadataObject]], Field(max_length=MAX_BATCH)], MetadataObject]] = Field(
        None, description="Per-pair metadata for the experts that read it (geneval's record, ocr's `text`): one JSON object "
                          "per image, in the order of `images` (null for none), or one object for every image.",
        examples=[[{"text": "OPEN"}]])


class ImageReward(BaseModel):
    total: Optional[float] = Field(..., description="Weighted sum of the (normalised) expert scores of this image; null when "
                                   "an expert marked `required` failed on it (see `errors`).")
    components: dict[str, Optional[float]] = Field(..., description="Raw score of each expert for this image; null where the "
                                                   "expert failed on it.")
    percentiles: Optional[dict[str, Optional[float]]] = Field(None, description="With `explain`: per expert, the share (0..100) "
                                                              "of the calibration set scoring below this image; null for an expert it lacks.")
    extras: Optional[dict[str, Optional[float]]] = Field(None, description="Further per-image outputs of some experts, as "
                                                         "`<expert>.<name>` (geneval's `correct`, hpsv3's `sigma`); not in the total.")
    errors: Optional[dict[str, str]] = Field(None, description="Per expert that failed on this image: why (its component is null).")


class ExpertInfo(BaseModel):
    checkpoint: str = Field(..., description="The checkpoint spec the expert was loaded from.")
    random_weights: bool = Field(..., description="True when the weights are random (tiny / random-full profiles).")


class RewardResponse(BaseModel):
    mean_reward: Optional[float] = Field(..., description="Mean of the per-image totals (over the images that have one).")
    component_rewards: dict[str, Optional[float]] = Field(..., description="Mean raw score of each expert over the images it scored.")
    images: list[ImageReward]
    experts: dict[str, ExpertInfo]
    advantages: Optional[dict[str, list[Optional[float]]]] = Field(None, description="With `group_ids`: `total` and each expert, "
                                                                   "per image, z-scored within its group: (x - mean) / (std + 1e-4), "
                                                                   "population std; 0 for an image alone in its group; null "
                                                                   "for an image without a value (left out of its group's statistics).")
    summaries: Optional[dict[str, dict[str, Any]]] = Field(None, description="Per expert that summarises a request "
                                                           "(geneval: means per tag).")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "mean_reward": 0.42,
                    "component_rewards": {"imagereward": 0.61, "aesthetic": 5.9},
                    "images": [{"total": 0.42, "components": {"imagereward": 0.61, "aesthetic": 5.9}}],
                    "experts": {"imagereward": {"checkpoint": "THUDM/ImageReward", "random_weights": False},
                                "aesthetic": {"checkpoint": "sac+logos+ava1-l14-linearMSE.pth", "random_weights": False}},
                }
            ]
        }
    }


# the other two bodies of /reward, for the OpenAPI document
MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "prompt": {"type": "string", "description": "one prompt for all images; or repeat `prompts`"},
        "prompts": {"type": "array", "items": {"type": "string"}, "description": "one prompt per image, in order"},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "weights": {"type": "string", "description": "JSON object of per-expert weights"},
        "group_ids": {"type": "array", "items": {"type": "string"}, "description": "one group id per image"},
        "explain": {"type": "string", "enum": ["true", "false"]},
        "metadata": {"type": "array", "items": {"type": "string"}, "description": "one JSON object per image, in order "
                     "(a single one: for every image)"},
    },
}

TENSOR_SCHEMA = {"type": "string", "format": "binary", "description": "safetensors (not an encoded image: PNG or JPEG "
                "bytes here are refused with 400): the tensor `images` and nothing else, uint8 (B, H, W, 3) or "
                "float16/float32 (B, 3, H, W) in [0, 1]; metadata `prompts` (a JSON list, one per image, or one string), "
                "optional `weights` (JSON object), `group_ids` (JSON list), `explain` (true/false), `metadata` (a JSON "
                "list of one object per image, or one object)."}


# ------------------------------------------------------------------------------------------------
# headers

def media_type(header: str | None) -> str:
    """The media type of a Content-Type header, without parameters, lower-cased ('' when absent)."""
    return (header or "").split(";")[0].strip().lower()


def accepts_tensors(accept: str | None) -> bool:
    """True when an Accept header asks for a safetensors answer: application/octet-stream with a quality
    above 0 and no lower than JSON's (`application/json`, else `application/*` or `*/*`)."""
    q: dict[str, float] = {}
    for part in (accept or "").split(","):
        kind, *params = [p.strip().lower() for p in part.split(";")]
        weight = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[kind] = max(q.get(kind, 0.0), weight if 0 <= weight <= 1 else 0.0)
    octet = q.get(OCTET, 0.0)
    json_q = q.get(JSON, q.get("application/*", q.get("*/*", 0.0)))
    return octet > 0 and octet >= json_q


def check_reward_media_type(ctype: str) -> None:
    """A /reward body's media type is one of the three (checked before the body is read)."""
    if ctype not in REWARD_MEDIA_TYPES:
        raise UnsupportedMediaTypeError(f"unsupported content type {ctype or '(none)'!r}: send application/json, "
                                        "multipart/form-data or application/octet-stream (safetensors)")


def check_gradient_media_type(ctype: str) -> None:
    if ctype != OCTET:
        raise UnsupportedMediaTypeError("send the image tensors as safetensors with content type application/octet-stream")


# ------------------------------------------------------------------------------------------------
# requests: the clients' side

def encode_json_request(prompt: str | Sequence[str], images: Sequence[bytes], weights: Mapping[str, float] | None = None,
                        metadata: Mapping | Sequence | None = None) -> dict:
    """A JSON /reward body: one prompt (or one per image) for encoded images (PNG, JPEG... bytes), sent as base64."""
    body: dict[str, Any] = {"prompt" if isinstance(prompt, str) else "prompts": prompt if isinstance(prompt, str) else list(prompt),
                            "images": [base64.b64encode(im).decode() for im in images]}
    if weights is not None:
        body["weights"] = dict(weights)
    if metadata is not None:
        body["metadata"] = _plain_metadata(metadata)
    return body


def _plain_metadata(metadata: Mapping | Sequence) -> Any:
    return dict(metadata) if isinstance(metadata, Mapping) else [None if m is None else dict(m) for m in metadata]


def encode_tensor_request(images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
                          group_ids: Sequence | None = None, explain: bool = False,
                          metadata: Mapping | Sequence | None = None) -> bytes:
    """A safetensors body for /reward (`group_ids`, `explain` too) or /reward/gradient: the image tensor
    as it is (on the CPU) and the rest as string metadata."""
    meta = {"prompts": json.dumps(prompts if isinstance(prompts, str) else list(prompts))}
    if weights is not None:
        meta["weights"] = json.dumps(dict(weights))
    if group_ids is not None:
        meta["group_ids"] = json.dumps(list(group_ids))
    if explain:
        meta["explain"] = "true"
    if metadata is not None:
        meta["metadata"] = json.dumps(_plain_metadata(metadata))
    return save_safetensors({"images": images.detach().cpu().contiguous()}, metadata=meta)


# ------------------------------------------------------------------------------------------------
# requests: the service's side

@dataclass
class RewardBody:
    """A /reward body, decoded but not yet checked: encoded images, or one image tensor. The library checks
    the rest (`Mixture.check_request` / `check_tensor_request`)."""

    prompts: Any  # one prompt (str) or one per image (list)
    images: list[bytes] | None = None
    tensor: Any = None
    weights: dict | None = None
    group_ids: list | None = None
    explain: bool = False
    metadata: Any = None  # a list with one object (or None) per image, or one object; the library checks it


@dataclass
class GradientBody:
    """A /reward/gradient body: the image tensor, its prompts (a list, or one for all), weights and metadata."""

    images: Any
    prompts: str | list[str]
    weights: dict | None = None
    metadata: Any = None


def decode_reward_request(ctype: str, payload: bytes | Mapping[str, Sequence[str | bytes]], limits: Limits | None = None) -> RewardBody:
    """A /reward body of media type `ctype`: the raw bytes of a JSON or safetensors body, or the fields of
    a multipart one (name -> values in order: text as str, files as bytes). `limits` bound a safetensors
    header (`tensor_header_limit`)."""
    check_reward_media_type(ctype)
    if ctype == JSON:
        return _decode_json(payload)
    if ctype == MULTIPART:
        return _decode_form(payload)
    return _decode_tensors(payload, limits)


def decode_gradient_request(body: bytes, limits: Limits | None = None) -> GradientBody:
    tensors, metadata = read_safetensors(body, limits)
    prompts = loads(metadata.get("prompts", "null"), "metadata 'prompts' and 'weights' must be JSON")
    weights = loads(metadata["weights"], "metadata 'prompts' and 'weights' must be JSON") if "weights" in metadata else None
    if not (isinstance(prompts, str) or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))):
        raise InvalidRequestError("metadata 'prompts' must be a JSON list of strings (one per image) or one string")
    if weights is not None and not isinstance(weights, dict):
        raise InvalidRequestError("metadata 'weights' must be a JSON object")
    return GradientBody(tensors["images"], prompts, weights, _metadata_field(metadata))


def _metadata_field(meta: Mapping[str, str]) -> Any:
    """The safetensors header's `metadata`: a JSON list (one object per image) or one object."""
    if "metadata" not in meta:
        return None
    value = loads(meta["metadata"], "metadata 'metadata' must be JSON: a list with one object per image, or one object")
    if not isinstance(value, (list, dict)):
        raise InvalidRequestError("metadata 'metadata' must be a JSON list with one object per image, or one object")
    return value


def decode_image_string(s: str, index: int) -> bytes:
    """The bytes of image `index` of a JSON body: base64, or a base64 data URL."""
    if s.startswith("data:"):
        header, sep, s = s.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidImageError(f"images[{index}]: data URL must be base64-encoded (data:image/...;base64,...)")
    try:
        data = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(f"images[{index}]: not valid base64") from None
    if not data:
        raise InvalidImageError(f"images[{index}]: empty image")
    return data


def loads(text: str | bytes, error: str) -> Any:
    """JSON from a client, or InvalidRequestError(`error`): also for what the json module raises besides a
    syntax error (an integer of over 4,300 digits: ValueError; deep nesting: RecursionError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise InvalidRequestError(error) from None


def tensor_header_limit(limits: Limits | None = None) -> int:
    """The largest safetensors header a request may have: one tensor's entry and metadata of `max_images`
    prompts of `max_prompt_chars` characters, each JSON-escaped (up to 6 bytes a character), and group ids."""
    limits = limits or Limits()
    # per image: its prompt, its group id, and its metadata object, JSON-escaped twice (as JSON text inside
    # a JSON string: a character can take 7 bytes)
    return 65536 + limits.max_images * (6 * limits.max_prompt_chars + 600 + 7 * limits.max_metadata_bytes)


def read_safetensors(body: bytes, limits: Limits | None = None) -> tuple[dict, dict[str, str]]:
    """The tensors and string metadata of a safetensors body that must hold `images` and nothing else. Its
    header is read and checked first (its size against `tensor_header_limit`, its entries), so a body of a
    million tensors costs one bounded JSON parse, not a million tensors."""
    n = int.from_bytes(body[:8], "little")
    if len(body) < 8 or n > len(body) - 8:  # an encoded image, JSON, garbage: not safetensors at all
        raise MalformedBodyError("body is not a valid safetensors file")
    if n > tensor_header_limit(limits):
        raise InvalidRequestError(f"the safetensors header is {n} bytes; the limit is {tensor_header_limit(limits)}")
    try:
        header = json.loads(body[8 : 8 + n])
    except (ValueError, RecursionError):
        raise MalformedBodyError("body is not a valid safetensors file") from None
    if not isinstance(header, dict):
        raise MalformedBodyError("body is not a valid safetensors file")
    if "images" not in header:
        raise InvalidRequestError("safetensors must hold a tensor named 'images'")
    extra = [k for k in header if k not in ("images", "__metadata__")]
    if extra:
        raise InvalidRequestError(f"safetensors must hold the tensor 'images' only; it holds {len(extra)} more")
    try:
        tensors = load_safetensors(body)
    except Exception:  # safetensors' own errors, and a header that lies about its length
        raise MalformedBodyError("body is not a valid safetensors file") from None
    meta = header.get("__metadata__") or {}
    return tensors, {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def safetensors_metadata(body: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file (its header's `__metadata__`)."""
    n = int.from_bytes(body[:8], "little")
    meta = json.loads(body[8 : 8 + n]).get("__metadata__") or {}
    return {k: v for k, v in meta.items() if isinstance(v, str)}


def _decode_json(body: bytes) -> RewardBody:
    try:
        req = RewardRequest.model_validate_json(body)
    except ValidationError as e:
        raise InvalidBodyError(json.loads(e.json(include_url=False, include_input=False))) from None
    return RewardBody(_one_of(req.prompt, req.prompts, "field"), [decode_image_string(s, i) for i, s in enumerate(req.images)],
                      weights=req.weights, group_ids=req.group_ids, explain=req.explain, metadata=req.metadata)


def _decode_form(fields: Mapping[str, Sequence[str | bytes]]) -> RewardBody:
    def get(name: str):  # a repeated single-valued field: the last one counts
        values = fields.get(name)
        return values[-1] if values else None

    prompts = list(fields.get("prompts", ())) or None
    prompt = get("prompt")
    if any(not isinstance(p, str) for p in [prompt, *(prompts or [])] if p is not None):
        raise InvalidRequestError("multipart fields 'prompt' and 'prompts' must be text")
    prompts = _one_of(prompt, prompts, "multipart field")
    files = list(fields.get("images", ()))
    if any(isinstance(f, str) for f in files):
        raise InvalidRequestError("multipart field 'images' must hold files")
    group_ids = list(fields.get("group_ids", ())) or None
    if group_ids is not None and any(not isinstance(g, str) for g in group_ids):
        raise InvalidRequestError("multipart fields 'group_ids' must be text")
    weights = _json_field(get("weights"), "weights", dict, "multipart field") if get("weights") is not None else None
    metadata = None
    if fields.get("metadata"):
        metadata = []
        for i, m in enumerate(fields["metadata"]):
            if not isinstance(m, str):
                raise InvalidRequestError("multipart fields 'metadata' must be text (a JSON object each)")
            value = loads(m, f"multipart field 'metadata' #{i} must be a JSON object (or null)")
            if value is not None and not isinstance(value, dict):
                raise InvalidRequestError(f"multipart field 'metadata' #{i} must be a JSON object (or null)")
            metadata.append(value)
        if len(metadata) == 1 and len(files) != 1 and metadata[0] is not None:
            metadata = metadata[0]  # one field for every image
    return RewardBody(prompts, files, weights=weights, group_ids=group_ids,
                      explain=_flag(get("explain"), "explain", "multipart field"), metadata=metadata)


def _decode_tensors(body: bytes, limits: Limits | None = None) -> RewardBody:
    tensors, meta = read_safetensors(body, limits)
    if "prompts" not in meta:
        raise InvalidRequestError("safetensors metadata 'prompts' (a JSON list with one prompt per image, or one string) is required")
    try:
        prompts = json.loads(meta["prompts"])
    except json.JSONDecodeError:
        prompts = meta["prompts"]  # a bare string: one prompt for every image
    except (ValueError, RecursionError):
        raise InvalidRequestError("metadata 'prompts' must be a JSON list of strings (one per image) or one string") from None
    return RewardBody(
        prompts, tensor=tensors["images"],
        weights=_json_field(meta["weights"], "weights", dict, "metadata") if "weights" in meta else None,
        group_ids=_json_field(meta["group_ids"], "group_ids", list, "metadata") if "group_ids" in meta else None,
        explain=_flag(meta.get("explain"), "explain", "metadata"),
        metadata=_metadata_field(meta),
    )


def _one_of(prompt, prompts, where: str):
    if prompt is not None and prompts is not None:
        raise InvalidRequestError(f"send either {where} 'prompt' (one for all images) or 'prompts' (one per image), not both")
    if prompt is None and prompts is None:
        raise InvalidRequestError(f"{where} 'prompt' (one for all images) or 'prompts' (one per image) is required")
    return prompt if prompt is not None else prompts


def _json_field(value, name: str, kind: type, where: str):
    """A field holding JSON text of type `kind` (an uploaded file is not text)."""
    try:
        out = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):  # not JSON, a 4,300-digit integer, deep nesting
        out = None
    if not isinstance(out, kind):
        raise InvalidRequestError(f"{where} '{name}' must be a JSON {kind.__name__}")
    return out


def _flag(value, name: str, where: str) -> bool:
    if value is None:
        return False
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in ("true", "false", "1", "0"):
        raise InvalidRequestError(f"{where} '{name}' must be true or false")
    return text in ("true", "1")


# ------------------------------------------------------------------------------------------------
# answers

@dataclass
class BatchScores:
    """A /reward answer as tensors, per image in the order sent (what `score_batch` returns).

    rewards: float32 (B,) weighted totals. components: expert -> float32 (B,) raw scores.
    advantages: with group_ids, {"total": (B,), <expert>: (B,)} z-scored within each group; else None.
    percentiles: with explain, expert -> (B,) in [0, 100], NaN where the calibration has none; else None.
    mean_reward: the mean total. experts: expert -> {"checkpoint", "random_weights"}.
    extras: "<expert>.<name>" -> (B,), experts' further outputs (not in the total).
    errors: None when every expert scored every image; else per image None or {expert: why}.
    NaN in `rewards`, `components` and `advantages` marks a pair without a value (see `errors`).
    summaries: per expert, its request-level summary (geneval's per-tag means), or None.
    """

    rewards: torch.Tensor
    components: dict[str, torch.Tensor]
    advantages: dict[str, torch.Tensor] | None
    percentiles: dict[str, torch.Tensor] | None
    mean_reward: float
    experts: dict
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: list[dict[str, str] | None] | None = None
    summaries: dict[str, dict] | None = None

    @property
    def component_rewards(self) -> dict[str, float]:
        """Each expert's mean raw score (over the images it scored; NaN when none)."""
        return {n: float(v.nanmean()) for n, v in self.components.items()}

    def to(self, device) -> "BatchScores":
        """A copy with every tensor on `device`."""
        def move(d):
            return None if d is None else {k: v.to(device) for k, v in d.items()}
        return replace(self, rewards=self.rewards.to(device), components=move(self.components),
                       advantages=move(self.advantages), percentiles=move(self.percentiles), extras=move(self.extras))


def _f32(values: Sequence) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)


def _batch_scores(names: Sequence[str], images: Sequence, advantages: Mapping | None, mean_reward, experts: dict,
                  summaries: dict | None) -> BatchScores:
    """BatchScores from per-image values (a result's images as dicts, or a JSON answer's); None -> NaN."""
    pct = None
    if images and images[0].get("percentiles") is not None:
        pct = {n: _f32([im["percentiles"][n] for im in images]) for n in names}
    extra_names = list(dict.fromkeys(k for im in images for k in (im.get("extras") or {})))
    errors = [im.get("errors") or None for im in images]
    return BatchScores(
        rewards=_f32([im["total"] for im in images]),
        components={n: _f32([im["components"][n] for im in images]) for n in names},
        advantages=None if advantages is None else {k: _f32(v) for k, v in advantages.items()},
        percentiles=pct,
        mean_reward=math.nan if mean_reward is None else float(mean_reward),
        experts=experts,
        extras={k: _f32([(im.get("extras") or {}).get(k) for im in images]) for k in extra_names},
        errors=errors if any(errors) else None,
        summaries=summaries or None,
    )


def batch_scores_from_result(result) -> BatchScores:
    """A library `RewardResult` (from `Mixture.score_checked`) as BatchScores."""
    images = [asdict(im) for im in result.images]
    return _batch_scores(list(result.component_rewards), images, result.advantages, result.mean_reward,
                         dict(result.experts), result.summaries)


def scores_from_json(body: Mapping) -> BatchScores:
    """A JSON /reward answer (`RewardResponse`) as BatchScores."""
    return _batch_scores(list(body["component_rewards"]), body["images"], body.get("advantages"), body["mean_reward"],
                         body.get("experts", {}), body.get("summaries"))


def encode_scores(result) -> bytes:
    """A /reward result as its safetensors answer (see the module doc)."""
    s = batch_scores_from_result(result)
    out = {"rewards": s.rewards, **{f"components.{n}": v for n, v in s.components.items()}}
    out.update({f"extras.{n}": v for n, v in s.extras.items()})
    if s.advantages is not None:
        out["advantages"] = s.advantages["total"]
        out.update({f"advantages.{n}": s.advantages[n] for n in s.components})
    if s.percentiles is not None:
        out.update({f"percentiles.{n}": v for n, v in s.percentiles.items()})
    meta = {"mean_reward": repr(result.mean_reward), "component_rewards": json.dumps(result.component_rewards),
            "experts": json.dumps(result.experts)}
    if s.errors is not None:
        meta["errors"] = json.dumps(s.errors)
    if s.summaries is not None:
        meta["summaries"] = json.dumps(s.summaries)
    return save_safetensors(out, metadata=meta)


def decode_scores(ctype: str, content: bytes) -> BatchScores:
    """A /reward answer as BatchScores: safetensors (asked for), or JSON (`ctype` application/json: a
    server that ignores Accept)."""
    if ctype == JSON:
        return scores_from_json(json.loads(content))
    tensors, meta = load_safetensors(content), safetensors_metadata(content)

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    advantages = None
    if "advantages" in tensors:
        advantages = {"total": tensors["advantages"], **prefixed("advantages.")}
    mean = meta.get("mean_reward")
    return BatchScores(tensors["rewards"], prefixed("components."), advantages, prefixed("percentiles.") or None,
                       float(tensors["rewards"].nanmean()) if mean is None else math.nan if mean == "None" else float(mean),
                       json.loads(meta.get("experts", "{}")),
                       extras=prefixed("extras."), errors=json.loads(meta["errors"]) if "errors" in meta else None,
                       summaries=json.loads(meta["summaries"]) if "summaries" in meta else None)


def encode_gradient_answer(out: Mapping[str, torch.Tensor], experts: Mapping) -> bytes:
    """A /reward/gradient answer: `rewards`, `grad`, `components.<expert>`, metadata `experts`."""
    return save_safetensors(dict(out), metadata={"experts": json.dumps(experts)})


def decode_gradient_answer(content: bytes) -> dict[str, torch.Tensor]:
    """A /reward/gradient answer's tensors (on the CPU)."""
    return load_safetensors(content)

"""Per-pair metadata: a JSON object that travels with each (prompt, image) pair to the experts that read it.

A verifiable reward needs more than the prompt: GenEval's record of the objects, counts, colours and
positions a prompt asks for, or the exact text an OCR reward compares with. Every way in carries it the same
way, one object per image (JSON bodies' `metadata`, repeated multipart `metadata` fields, the safetensors
header's `metadata` list, `Mixture.score(..., metadata=...)`, the clients and the trainer reward functions);
one object for a whole request stands for the same object on each of its images.

`check_metadata` is the only place that decides what a pair's metadata may be: JSON values only (objects
with string keys, lists, strings, finite numbers, booleans, null), at most `max_metadata_depth` levels of
objects and lists, at most `max_metadata_bytes` as compact UTF-8 JSON. What an expert needs of it
(`Expert.metadata_fields`, `Expert.check_pair`) the mixture checks next, before any model runs.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Mapping, Optional, Sequence

from pydantic import WithJsonSchema

from .errors import InvalidRequestError
from .limits import Limits

Metadata = dict[str, Any]

MAX_KEYS = 256  # keys of one object in a schema; what bounds a pair's metadata is `check_metadata`'s size and depth
# One pair's metadata as a field of a request or job schema: a JSON object, which the schema can only bound by its
# number of keys; its size and depth are bounded by `check_metadata` (max_metadata_bytes, max_metadata_depth)
MetadataObject = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object", "maxProperties": MAX_KEYS,
    "additionalProperties": {"description": "any JSON value; the whole object is at most max_metadata_bytes as "
                                            "compact JSON and max_metadata_depth levels deep"},
    "description": "one (prompt, image) pair's metadata: a JSON object"})]


def check_metadata(metadata: Any, n: int, limits: Limits) -> Optional[list[Metadata]]:
    """One checked metadata object per image (`{}` where a pair has none), or None when there is none at all.

    `metadata`: None, one mapping for every image, or a sequence of n mappings (or None entries)."""
    if metadata is None:
        return None
    if isinstance(metadata, Mapping):
        one = _check_object(metadata, limits, "metadata")
        return [one] * n
    if isinstance(metadata, (str, bytes, bytearray)) or not isinstance(metadata, Sequence):
        raise InvalidRequestError("metadata must be a JSON object per image (a list), or one object for all images; "
                                  f"got {type(metadata).__name__}")
    if len(metadata) != n:
        raise InvalidRequestError(f"{len(metadata)} metadata objects for {n} images")
    out = []
    for i, m in enumerate(metadata):
        if m is None:
            out.append({})
            continue
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"metadata[{i}] must be a JSON object (or null), got {type(m).__name__}")
        out.append(_check_object(m, limits, f"metadata[{i}]"))
    return out


def _check_object(m: Mapping, limits: Limits, where: str) -> Metadata:
    _check_value(m, limits.max_metadata_depth, limits.max_metadata_depth, where)
    size = len(json.dumps(m, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogatepass"))
    if size > limits.max_metadata_bytes:
        raise InvalidRequestError(f"{where} is {size} bytes as JSON; the limit is {limits.max_metadata_bytes} per pair")
    return dict(m)


def _check_value(v: Any, depth_left: int, limit: int, where: str) -> None:
    """JSON values only, nested at most `depth_left` levels (checked before anything is serialised, and
    iteratively bounded by the depth, so a hostile nesting cannot recurse far)."""
    if isinstance(v, Mapping) or isinstance(v, (list, tuple)):
        if depth_left <= 0:
            raise InvalidRequestError(f"{where} is nested too deeply: the limit is {limit} levels of objects and lists")
        items = v.items() if isinstance(v, Mapping) else enumerate(v)
        for k, x in items:
            if isinstance(v, Mapping) and not isinstance(k, str):
                raise InvalidRequestError(f"{where}: keys must be strings, got {type(k).__name__}")
            _check_value(x, depth_left - 1, limit, f"{where}.{k}" if isinstance(v, Mapping) else f"{where}[{k}]")
        return
    if v is None or isinstance(v, (str, bool, int)):
        if isinstance(v, str) and "\x00" in v:
            raise InvalidRequestError(f"{where} holds a NUL character")
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InvalidRequestError(f"{where} must be a finite number, got {v}")
        return
    raise InvalidRequestError(f"{where} must be a JSON value (object, list, string, number, boolean or null), "
                              f"got {type(v).__name__}")


def parse_metadata_json(text: str | bytes, what: str = "metadata") -> Any:
    """A metadata value sent as JSON text (a multipart field, the safetensors header): parsed, or 422."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: a hostile nesting deeper than the parser's stack
        raise InvalidRequestError(f"{what} is not valid JSON: {str(e)[:200]}") from None

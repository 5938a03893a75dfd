"""The limits of one scoring request, declared once.

Each limit has one default and one bound, here. `Limits` is what the library checks a request against
(`Mixture.check_request`...); `RewardConfig` (`T2I_REWARD_MAX_IMAGES`...) and the service's `Settings`
(`T2I_SERVICE_MAX_IMAGES`...) declare the same fields with `limit_field`, each with its own description,
so a default or a bound cannot drift between the three.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# name -> (default, bounds, description): the single source of the limits
_LIMITS: dict[str, tuple[Any, dict[str, Any], str]] = {
    "max_images": (64, {"ge": 1}, "Most images in one scoring call."),
    "max_image_pixels": (40_000_000, {"ge": 1}, "Images with more pixels are refused before decoding."),
    "max_prompt_chars": (2000, {"ge": 1}, "Longer prompts are refused."),
    # 64 images of 2048x2048: any GRPO batch; six images at max_image_pixels (bounds a request's decode work)
    "max_request_pixels": (268_435_456, {"ge": 1}, "Most pixels decoded for one request, all its images together (after "
                           "a large JPEG's draft or a JPEG 2000's reduction), counted from the headers before decoding."),
    # a GenEval record is ~300 bytes, an OCR target a line: 16 KiB leaves room for any per-prompt annotation
    "max_metadata_bytes": (16_384, {"ge": 2}, "Largest metadata object of one (prompt, image) pair, as compact JSON "
                           "in UTF-8; larger gets 422."),
    "max_metadata_depth": (8, {"ge": 1, "le": 64}, "Deepest nesting of objects and lists in one pair's metadata; "
                           "deeper gets 422."),
    # panoramas up to 32:1 pass; a 20000x1 strip, whose resize to a square would be huge, does not
    "max_aspect_ratio": (32.0, {"ge": 1, "le": 1024}, "Images whose long side is more than this times the short side "
                         "are refused (bounds the resize's work)."),
}


def limit_field(name: str, description: str | None = None) -> Any:
    """The pydantic field of limit `name`: its default and bound, with `description` (or the library's)."""
    default, bounds, doc = _LIMITS[name]
    return Field(default, **bounds, description=description or doc)


class Limits(BaseModel):
    """What one scoring call may hold; anything beyond is refused with a `RewardError` before any model runs."""

    model_config = ConfigDict(frozen=True)

    max_images: int = limit_field("max_images")
    max_image_pixels: int = limit_field("max_image_pixels")
    max_prompt_chars: int = limit_field("max_prompt_chars")
    max_request_pixels: int = limit_field("max_request_pixels")
    max_aspect_ratio: float = limit_field("max_aspect_ratio")
    max_metadata_bytes: int = limit_field("max_metadata_bytes")
    max_metadata_depth: int = limit_field("max_metadata_depth")

    @classmethod
    def of(cls, source: Any) -> "Limits":
        """The limits of any object that has these fields (a `RewardConfig`, the service's `Settings`)."""
        return cls(**{name: getattr(source, name) for name in cls.model_fields})


MAX_ASPECT_RATIO: float = Limits.model_fields["max_aspect_ratio"].default

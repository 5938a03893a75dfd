"""What the model thread receives: checked requests whose pixels are already prepared for each backbone.

A request's images come in one of two forms, and `Mixture.check_request` / `check_tensor_request` turn
either into a `Checked` request in the caller's thread (the service runs them in its preprocessing pool):

- **decoded images** (PNG, JPEG, WebP... from JSON, multipart or paths): each backbone's input is computed
  with the reference pipeline (`Preprocess.pil`: PIL resize, crop, normalise), so scores match the
  reference implementations (within 5e-5);
- **a raw tensor**, uint8 `(B, H, W, 3)` or float `(B, 3, H, W)` in [0, 1], never encoded as an image:
  on a GPU host it goes to the device as it is and is resized, cropped and normalised there
  (`Preprocess.tensor`: torch's antialiased bicubic in float, close to PIL's but not bit-equal); on a CPU
  host it is prepared in the caller's thread, a uint8 tensor resized in 8 bits (`Preprocess.uint8`, PIL's
  arithmetic but for a level or two on under 1% of the pixels), a float one as on a GPU.

Either way the model thread only concatenates the prepared tensors of a micro-batch and copies them to
the device (`Pixels`), then runs the models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .errors import InvalidRequestError
from .images import Preprocess

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Checked:
    """One validated request: a prompt per image, its effective weights and its prepared pixels.

    Once checked, exactly one of `pixels` (per input spec, a CPU float tensor (B, 3, size, size), already
    normalised) and `raw` (the request's image tensor, to prepare on the device) is set; a request checked
    with `prepare=False` holds its images in `pending` while `Mixture.prepare_part` fills `pixels`.
    `group_ids` (one per image) ask for group-relative advantages; `explain` for each image's percentile per expert;
    `metadata` (one JSON object per image) is what the experts that read metadata get with each pair.
    """

    prompts: list[str]
    weights: dict[str, float]
    pixels: Optional[dict[Preprocess, torch.Tensor]] = field(default=None, repr=False)
    raw: Optional[torch.Tensor] = field(default=None, repr=False)
    group_ids: Optional[list] = None
    explain: bool = False
    metadata: Optional[list[dict]] = None  # one object per image (rewarders/metadata.py), None when none came
    pending: Optional[tuple] = field(default=None, repr=False)  # (images, limits, decoded pixels each) while `Mixture.prepare_part` fills `pixels`

    def __len__(self) -> int:
        return len(self.prompts)


def as_float_images(raw: torch.Tensor) -> torch.Tensor:
    """A checked raw tensor as float32 (B, 3, H, W) in [0, 1], on the tensor's own device."""
    if raw.dtype == torch.uint8:  # (B, H, W, 3): the layout generated images come in
        return raw.permute(0, 3, 1, 2).float().div_(255.0)
    return raw.float()


def check_image_tensor(images, max_images: int) -> tuple[int, int, int]:
    """(B, H, W) of an image tensor in one of the accepted layouts; InvalidRequestError for anything else.
    Values are checked by the caller (`Mixture.check_tensor_request`), after the size limits."""
    if not isinstance(images, torch.Tensor):
        raise InvalidRequestError(f"'images' must be a tensor, got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or shape[3] != 3:
            raise InvalidRequestError(f"uint8 'images' must have shape (B, H, W, 3), got {shape}")
        b, h, w = shape[:3]
    elif images.dtype in FLOAT_DTYPES:
        if images.ndim != 4 or shape[1] != 3:
            raise InvalidRequestError(f"float 'images' must have shape (B, 3, H, W) with values in [0, 1], got {shape}")
        b, h, w = shape[0], shape[2], shape[3]
    else:
        raise InvalidRequestError(f"'images' must be uint8 (B, H, W, 3) or float16/bfloat16/float32 (B, 3, H, W), got {images.dtype}")
    if b == 0 or h == 0 or w == 0:
        raise InvalidRequestError(f"'images' is empty: shape {shape}")
    if b > max_images:
        raise InvalidRequestError(f"{b} images; the limit is {max_images} per call")
    return b, h, w


class Pixels:
    """The pooled model inputs of a micro-batch: `get(spec, start, stop)` is the slice of every request's
    images prepared for `spec`, on `device`. Each spec is assembled once per micro-batch."""

    def __init__(self, requests: Sequence[Checked], device: torch.device):
        self.requests = list(requests)
        self.device = device
        self._pooled: dict[Preprocess, torch.Tensor] = {}
        self._raw: list[Optional[torch.Tensor]] = [None] * len(self.requests)

    def _part(self, i: int, spec: Preprocess) -> torch.Tensor:
        req = self.requests[i]
        if req.pixels is not None:
            return req.pixels[spec].to(self.device, non_blocking=True)
        if self._raw[i] is None:  # one copy of the raw tensor to the device, shared by every spec
            self._raw[i] = as_float_images(req.raw.to(self.device, non_blocking=True))
        return spec.tensor(self._raw[i])

    def get(self, spec: Preprocess, start: int, stop: int) -> torch.Tensor:
        if spec not in self._pooled:
            parts = [self._part(i, spec) for i in range(len(self.requests))]
            self._pooled[spec] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._pooled[spec][start:stop]


class PilPixels:
    """`Pixels` for a list of decoded images, prepared batch by batch (`raw_scores`: evaluation sets of any size)."""

    def __init__(self, images: Sequence, device: torch.device):
        self.images = images
        self.device = device

    def get(self, spec: Preprocess, start: int, stop: int) -> torch.Tensor:
        return spec.pil(list(self.images[start:stop])).to(self.device)


def prepare_pil(images: Sequence, specs: Sequence[Preprocess]) -> dict[Preprocess, torch.Tensor]:
    """Every spec's input for decoded PIL images (the reference pipeline)."""
    return {spec: spec.pil(list(images)) for spec in specs}


def prepare_tensor(raw: torch.Tensor, specs: Sequence[Preprocess],
                   out: dict[Preprocess, torch.Tensor] | None = None) -> dict[Preprocess, torch.Tensor]:
    """Every spec's input for a raw image tensor, computed where the tensor is (the CPU-host path), into `out`
    when given. uint8 images are resized in 8 bits (`Preprocess.uint8`: PIL's arithmetic, ~4x faster than a
    float resize), float ones in float (`Preprocess.tensor`). One image at a time: a 512x512 image's float
    copy is 3 MB, a batch's is B times that, and small blocks stay in the cache and in the allocator's free
    lists (the results are the batch's, bit for bit)."""
    n = raw.shape[0]
    out = out if out is not None else {s: torch.empty((n, 3, s.size, s.size)) for s in specs}
    with torch.inference_mode():
        for i in range(n):
            if raw.dtype == torch.uint8:  # (1, H, W, 3) -> a channels-last (1, 3, H, W) view, no copy
                x = raw[i : i + 1].permute(0, 3, 1, 2)
                for spec in specs:
                    out[spec][i : i + 1] = spec.uint8(x)
            else:
                x = raw[i : i + 1].float()
                for spec in specs:
                    out[spec][i : i + 1] = spec.tensor(x)
    return out

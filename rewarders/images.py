"""Reading images safely and turning them into model inputs.

Two preprocessing paths share one `Preprocess` spec (size, mean, std):
- `Preprocess.pil(images)`: the reference pipeline (torchvision on PIL images: bicubic resize of the
  short side, center crop, RGB, normalise), so scores match ImageReward and open_clip exactly;
- `Preprocess.tensor(images)`: the same steps in torch on a [0, 1] float tensor, so gradients flow
  back to the pixels (ReFL), and raw tensors are prepared on a GPU;
- `Preprocess.uint8(images)`: the same steps in torch on a uint8 tensor, resized in 8 bits as PIL does
  (raw uint8 tensors on a CPU host: about 4x faster than the float resize, and within one or two levels
  of PIL's pixels where the float resize is not).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from .errors import ImageTooLargeError, InvalidImageError
from .limits import MAX_ASPECT_RATIO, Limits

ImageLike = Union[Image.Image, bytes, bytearray, str, os.PathLike]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL refuses files above 2x this with its own error; our own limit (max_pixels) is the one that counts,
# so lift PIL's to a level our checks always hit first.
Image.MAX_IMAGE_PIXELS = None

# Modes that PIL resizes natively; the reference resizes in the image's own mode and converts to RGB
# after cropping, and so do we. Anything else (16-bit, float, CMYK...) is converted to RGB first.
_NATIVE_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}


# The formats a request's image may be in: each decodes in work bounded by its pixel count (JPEG once its
# scans are bounded, JPEG 2000 once reduced, below). Pillow opens many more (EPS runs Ghostscript, FITS and
# the rest are never a generated image); they are refused as unrecognised.
FORMATS = ("PNG", "JPEG", "WEBP", "AVIF", "GIF", "BMP", "DIB", "TIFF", "JPEG2000", "PPM", "TGA", "ICO", "QOI")
# A progressive JPEG may repeat scans: each costs a pass over every block (~2.7 ms per 40 MP) however few
# bytes it takes. Encoders write at most a dozen or so (libjpeg's progressive script: 10).
MAX_JPEG_SCANS = 32
# JPEGs over this many pixels are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `Image.draft`)
# with the short side still at least DRAFT_SHORT_SIDE: a 40 MP photo decodes as 2.5 MP. Generated images
# (up to 4096x4096) are decoded in full, so their scores do not change.
DRAFT_ABOVE_PIXELS = 4096 * 4096
DRAFT_SHORT_SIDE = 1024
# Pillow's JPEG 2000 decoder holds the GIL while it runs (~55 ns per pixel here): a larger one is decoded at a
# reduced resolution level (`reduce`) of at most this many pixels, or refused when its codestream has too few.
JPEG2000_MAX_PIXELS = 1024 * 1024
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")  # a marker in entropy-coded data (not a stuffed 0xff00 or RSTn)


def open_image(src: ImageLike, max_pixels: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Open and fully decode one image, refusing oversized, extremely elongated, costly or broken ones with
    a clear error.

    The pixel count and the aspect ratio are checked from the header, before any pixel is decoded, so
    decompression bombs cost nothing; so are the format and, for a JPEG, its scan count. A large JPEG or
    JPEG 2000 is decoded at a reduced size (`decode_size`). Animated images use their first frame.
    """
    if isinstance(src, Image.Image):
        check_size(src.size, max_pixels, max_aspect_ratio, "image")
        return src
    with _header(src, max_pixels, max_aspect_ratio) as (im, name):
        try:
            im.load()
        except Exception as e:  # truncated data, bad chunks, decoder errors
            if im.format == "JPEG2000" and isinstance(im.reduce, int) and im.reduce:
                raise InvalidImageError(f"{name}: a JPEG 2000 image over {JPEG2000_MAX_PIXELS} pixels must be decodable "
                                        f"at 1/{1 << im.reduce} scale ({e})") from None
            raise InvalidImageError(f"{name}: truncated or corrupt image ({e})") from None
        return im


def decode_size(src: ImageLike, max_pixels: int, max_aspect_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """The (width, height) `open_image` will decode `src` at, read from its header with every check of
    `open_image` but the decoding itself: what a request's pixel budget counts."""
    if isinstance(src, Image.Image):
        check_size(src.size, max_pixels, max_aspect_ratio, "image")
        return src.size
    with _header(src, max_pixels, max_aspect_ratio) as (im, _):
        return _reduced_size(im)


def decode_budget(images, limits: Limits) -> list[int]:
    """Each image's decoded pixel count, from its header (every header check of `open_image`, errors naming
    the image), and the request's total against `max_request_pixels` (ImageTooLargeError): all before a
    pixel is decoded."""
    pixels = []
    for i, im in enumerate(images):
        try:
            w, h = decode_size(im, limits.max_image_pixels, limits.max_aspect_ratio)
        except (InvalidImageError, ImageTooLargeError) as e:
            raise type(e)(f"images[{i}]: {e}") from None
        pixels.append(w * h)
    if sum(pixels) > limits.max_request_pixels:
        raise ImageTooLargeError(f"the images decode to {sum(pixels)} pixels together; the limit is "
                                 f"{limits.max_request_pixels} per request")
    return pixels


@contextmanager
def _header(src: ImageLike, max_pixels: int, max_aspect_ratio: float):
    """(the image opened lazily, set to decode at its reduced size; its name), after every header check."""
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise InvalidImageError("image is empty (0 bytes)")
        fp, name = io.BytesIO(src), "image bytes"
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise InvalidImageError(f"no such image file: {path}")
        fp, name = open(path, "rb"), str(path)
    else:
        raise InvalidImageError(f"unsupported image type {type(src).__name__}: pass a PIL image, bytes or a path")
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fp, formats=FORMATS)
        except UnidentifiedImageError:
            raise InvalidImageError(f"{name}: not a recognised image format (accepted: {', '.join(FORMATS)})") from None
        except Exception as e:  # PIL raises many types for garbage headers
            raise InvalidImageError(f"{name}: cannot read image header ({e})") from None
        check_size(im.size, max_pixels, max_aspect_ratio, name)
        if im.format in ("JPEG", "MPO"):
            scans = jpeg_scans(fp.getvalue() if isinstance(fp, io.BytesIO) else Path(src).read_bytes())
            if scans > MAX_JPEG_SCANS:
                raise InvalidImageError(f"{name}: a JPEG with {scans} scans; the limit is {MAX_JPEG_SCANS}")
            if im.width * im.height > DRAFT_ABOVE_PIXELS:
                scale = DRAFT_SHORT_SIDE / min(im.size)
                im.draft(im.mode, (max(1, int(im.width * scale)), max(1, int(im.height * scale))))
        elif im.format == "JPEG2000":
            im.reduce = _jpeg2000_reduction(im.size)
        yield im, name
    finally:
        if not isinstance(src, (bytes, bytearray)):
            fp.close()


def _jpeg2000_reduction(size: tuple[int, int]) -> int:
    """The fewest halvings that bring a JPEG 2000 image to at most JPEG2000_MAX_PIXELS (0: none needed)."""
    k = 0
    while _halved(size[0], k) * _halved(size[1], k) > JPEG2000_MAX_PIXELS:
        k += 1
    return k


def _halved(n: int, k: int) -> int:
    """A side of `n` pixels at JPEG 2000 resolution reduction `k` (openjpeg's rounding, as Pillow applies it)."""
    return (n + ((1 << k) >> 1)) >> k


def _reduced_size(im: Image.Image) -> tuple[int, int]:
    if im.format == "JPEG2000" and isinstance(im.reduce, int) and im.reduce:
        return _halved(im.width, im.reduce), _halved(im.height, im.reduce)
    return im.size  # a JPEG's draft has set its size already


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) a JPEG holds, from a walk of its markers: segment headers are skipped by
    their lengths, entropy-coded data by searching for the next real marker. Stops counting past the limit."""
    pos, scans, n = 2, 0, len(data)
    while pos + 4 <= n and scans <= MAX_JPEG_SCANS:
        if data[pos] != 0xFF:  # garbage between segments: let the decoder judge the file
            return scans
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # SOS: its entropy-coded data runs to the next marker
            scans += 1
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start(1) - 1
    return scans


def check_size(size: tuple[int, int], max_pixels: int, max_aspect_ratio: float, name: str) -> None:
    """Refuse images with no pixels, too many pixels (ImageTooLargeError) or a long side more than
    `max_aspect_ratio` times the short one (InvalidImageError): such a strip, resized so its short side
    fills the model input, would be a huge intermediate image in the differentiable path."""
    w, h = size
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels"
        )
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise InvalidImageError(
            f"{name}: {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.1f}:1; the limit is {max_aspect_ratio:g}:1"
        )


@dataclass(frozen=True)
class Preprocess:
    """How one backbone wants its input: square `size`, channel `mean` and `std` (bicubic, center crop).

    `tensor` and `uint8` run the steps `_resize`, `_crop`, `_normalise`, `_pack` (each defined once, here); a
    spec whose model reads its input otherwise overrides a step (HPSv3Preprocess: its resize, no crop, a packed
    canvas)."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def pil(self, images: list[Image.Image]) -> torch.Tensor:
        """The reference pipeline on PIL images -> float32 tensor (B, 3, size, size).

        The full image is resized before the crop, exactly as the reference does (resizing only the
        crop window with PIL's `box` moves a few pixels by one level). The work stays bounded because
        callers bound the aspect ratio (`check_size`): the intermediate has at most
        max(source pixels, size^2 * aspect ratio) pixels.
        """
        resize = T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC)
        crop = T.CenterCrop(self.size)
        out = []
        for im in images:
            if im.mode not in _NATIVE_MODES:
                im = _to_rgb(im)
            # resize before the RGB conversion, as the reference does (PIL resizes palette images
            # with nearest neighbour and RGBA with premultiplied alpha)
            out.append(T.functional.to_tensor(crop(resize(im)).convert("RGB")))
        return T.functional.normalize(torch.stack(out), self.mean, self.std)

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after torchvision's `Resize(size)`: short side to `size`, long side truncated."""
        if w <= h:
            return self.size, int(self.size * h / w)
        return int(self.size * w / h), self.size

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """The same steps in torch, differentiable: (B, 3, H, W) in [0, 1] -> normalised (B, 3, size, size)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidImageError(f"expected an image tensor of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = self._resize(images)
        if x is not images:
            x = x.clamp(0, 1)  # PIL clamps bicubic overshoot when it writes 8-bit pixels
        return self._pack(self._normalise(self._crop(x)))

    def uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in 0..255 -> normalised float (B, 3, size, size), resized in 8 bits.

        Why: torch's antialiased uint8 bicubic rounds and clamps to 8 bits as PIL does, so the pixels are
        PIL's but for one or two levels on under 1% of them (tests/test_images.py), and on a CPU it is
        about 4x faster than resizing a float copy. Not differentiable. The fast layout is channels-last,
        which a (B, H, W, 3) tensor permuted to (B, 3, H, W) already is."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise InvalidImageError(f"expected a uint8 image tensor of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        return self._pack(self._normalise(self._crop(self._resize(images)).float().div_(255.0)))

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Short side to `size` (torchvision's rule for the long side, so every path crops the same window;
        callers bound the aspect ratio: the intermediate is size^2 * aspect pixels); `x` itself when no resize is needed."""
        h, w = x.shape[-2:]
        new_w, new_h = self.resized_size(w, h)
        if (new_h, new_w) == (h, w):
            return x
        return F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        """The center `size` x `size` window of a resized tensor (a view)."""
        h, w = x.shape[-2:]
        top = int(round((h - self.size) / 2.0))
        left = int(round((w - self.size) / 2.0))
        return x[:, :, top : top + self.size, left : left + self.size]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, for a float tensor in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised crop as the backbone takes it: as it is here. Why a step: a spec whose model reads
        something other than a square crop lays its input out here (HPSv3Preprocess packs its whole image)."""
        return x


def _to_rgb(im: Image.Image) -> Image.Image:
    try:
        if im.mode.startswith("I") or im.mode == "F":
            # 16-bit, 32-bit and float greyscale: map the value range to 8 bits instead of clipping, in blocks
            # of rows (float64 is 8 bytes a pixel: a 40 MP image at once would take 640 MB)
            import numpy as np

            a = np.asarray(im)
            top = float(a.max(initial=0))
            scale = 255.0 / 65535.0 if top > 255 else (255.0 if im.mode == "F" and top <= 1.0 else 1.0)
            out = np.empty(a.shape, dtype=np.uint8)
            rows = max(1, (1 << 20) // max(1, a.shape[1]))
            for i in range(0, a.shape[0], rows):
                out[i : i + rows] = np.clip(a[i : i + rows].astype(np.float64) * scale, 0, 255).astype("uint8")
            return Image.fromarray(out, "L").convert("RGB")
        return im.convert("RGB")
    except Exception as e:
        raise InvalidImageError(f"image mode {im.mode!r} cannot be converted to RGB ({e})") from None

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_reward.rewarders.errors import ImageTooLargeError, InvalidImageError
from t2i_reward.rewarders.images import Preprocess, open_image

from .conftest import smooth_image


def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, with (almost) no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decodes_bytes_and_paths(tmp_path):
    im = smooth_image(0, 40, 60)
    p = tmp_path / "a.png"
    im.save(p)
    for src in (png_bytes(im), p, str(p), im):
        out = open_image(src, 10_000)
        assert out.size == (60, 40)
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(im))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "image"),
    ],
)
def test_garbage_is_refused(data, message):
    with pytest.raises(InvalidImageError, match=message):
        open_image(data, 10_000)


def test_truncated_image_is_refused():
    data = png_bytes(smooth_image(1, 300, 300))
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        open_image(data[: len(data) // 2], 1_000_000)
    jpeg = png_bytes(smooth_image(1, 300, 300), "JPEG")
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        open_image(jpeg[: len(jpeg) // 3], 1_000_000)


def test_decompression_bomb_refused_from_header():
    data = bomb_png(100_000, 100_000)  # 10 gigapixels declared in a few bytes
    assert len(data) < 200
    with pytest.raises(ImageTooLargeError, match="10000000000 pixels is over the limit of 40000000"):
        open_image(data, 40_000_000)


def test_pixel_limit_applies_to_pil_images_too():
    with pytest.raises(ImageTooLargeError):
        open_image(Image.new("RGB", (101, 100)), 10_000)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(InvalidImageError, match="no such image file"):
        open_image(tmp_path / "nope.png", 100)
    with pytest.raises(InvalidImageError, match="unsupported image type"):
        open_image(12345, 100)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_every_mode_preprocesses(mode):
    base = smooth_image(2, 120, 90)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(base.convert("L"), dtype="<u2") * 257)
        assert im.mode == "I;16"
    else:
        im = base.convert(mode)
    out = Preprocess(32).pil([open_image(png_bytes(im, "TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG"), 10**6)])
    assert out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all()
    if mode in ("I;16", "L"):
        # 16-bit greyscale keeps its full range (scaled, not clipped to white)
        ref = Preprocess(32).pil([base.convert("L")])
        assert torch.allclose(out, ref, atol=0.05)


def test_tensor_path_matches_pil_path():
    im = smooth_image(3, 333, 517)
    spec = Preprocess(224)
    pil = spec.pil([im])
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255
    ten = spec.tensor(x)
    assert ten.shape == pil.shape
    # same window, same filter family; they differ by PIL's 8-bit rounding and its bicubic variant
    assert (ten - pil).abs().mean() < 0.02


@pytest.mark.parametrize("shape", [(333, 517), (96, 128), (1000, 223), (224, 224), (512, 512)])
@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_uint8_path_is_pils_arithmetic(shape, kind):
    """The CPU raw-tensor path for uint8 images: PIL's pixels but for a level or two on under 1% of them
    (downscale, upscale, tall, wide, no resize), where the float path is off by 0.3 levels on average."""
    h, w = shape
    rng = np.random.default_rng(h * w)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if kind == "noise" else np.array(smooth_image(h * w % 97, h, w))
    spec = Preprocess(224)
    pil = spec.pil([Image.fromarray(arr)])
    x = torch.from_numpy(arr)[None].permute(0, 3, 1, 2)  # the channels-last view a (B, H, W, 3) tensor gives
    levels = ((spec.uint8(x) - pil) * torch.tensor(spec.std).view(1, 3, 1, 1) * 255).abs()
    assert levels.max() <= 2.0001
    assert (levels > 1e-3).float().mean() < 0.01
    if shape == (224, 224):  # nothing to resize: exactly PIL's pixels
        assert levels.max() < 1e-3
    with pytest.raises(InvalidImageError, match="uint8"):
        spec.uint8(x.float())


def test_tensor_path_is_differentiable():
    x = torch.rand(2, 3, 64, 96, requires_grad=True)
    Preprocess(32).tensor(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

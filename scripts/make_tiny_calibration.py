"""Build the packaged calibration of the tiny profile, rewarders/data/calibration-tiny.json.

    .venv/bin/python scripts/make_tiny_calibration.py [--out FILE] [--cache-dir DIR]

The calibration set is made here, from nothing but a seed: 50 prompts composed from the word lists below,
4 procedural images each (gradients, noise, shapes, stripes, checkerboards; several sizes and aspect
ratios), 200 pairs in all. No dataset is read. The tiny models are random-weight but deterministic (built
from fixed seeds), so running this again gives the same file, apart from `created`. Run it again whenever
the tiny models change (`t2i_reward.rewarders.tiny.TINY_VERSION`; the file's `source` names the version it was made
with, and tests/test_calibration.py checks it). Their scores mean nothing: the file exists so that
calibration and `"explain": true` are tested on the tiny profile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADJECTIVES = ["red", "tiny", "ancient", "glowing", "wooden", "fluffy", "rusty", "golden", "misty", "striped"]
SUBJECTS = ["apple", "lighthouse", "cat", "robot", "castle", "teapot", "forest", "sailboat", "dragon", "bicycle"]
SETTINGS = ["on a kitchen table", "at sunset", "in the snow", "under a starry sky", "by the sea", "in a busy street"]
STYLES = ["oil painting", "photograph, 35mm", "watercolor", "digital art, highly detailed", "pencil sketch"]
SIZES = [(64, 64), (128, 96), (96, 160), (224, 224), (256, 192), (300, 300), (512, 384), (200, 400)]


def make_prompts(rng: np.random.Generator, n: int) -> list[str]:
    prompts: list[str] = []
    while len(prompts) < n:
        p = f"a {rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)} {rng.choice(SETTINGS)}, {rng.choice(STYLES)}"
        if p not in prompts:
            prompts.append(p)
    return prompts


def make_image(rng: np.random.Generator, kind: int) -> Image.Image:
    w, h = SIZES[rng.integers(len(SIZES))]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.random(3), rng.random(3)
    if kind == 0:  # linear gradient between two colours, in a random direction
        a = rng.random() * 2 * np.pi
        t = x * np.cos(a) + y * np.sin(a)
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        arr = c0 + t[..., None] * (c1 - c0)
    elif kind == 1:  # radial gradient
        r = np.hypot(x - w * rng.random(), y - h * rng.random())
        arr = c0 + (r / r.max())[..., None] * (c1 - c0)
    elif kind == 2:  # pixel noise
        arr = rng.random((h, w, 3)) * rng.random()
    elif kind == 3:  # smooth noise: coarse noise upsampled
        small = (rng.random((rng.integers(2, 12), rng.integers(2, 12), 3)) * 255).astype(np.uint8)
        return Image.fromarray(small).resize((w, h), Image.BICUBIC)
    elif kind == 4:  # stripes
        arr = np.where((np.sin(x / rng.uniform(2, 20) + y / rng.uniform(2, 40)) > 0)[..., None], c0, c1)
    else:  # checkerboard
        s = int(rng.integers(4, 32))
        arr = np.where((((x // s) + (y // s)) % 2 == 0)[..., None], c0, c1)
    im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 6))):  # shapes on top
        box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        [draw.ellipse, draw.rectangle][int(rng.integers(2))](xy, fill=fill)
    return im


def main() -> None:
    from t2i_reward.rewarders import create_rewarder
    from t2i_reward.rewarders.calibration import calibrate
    from t2i_reward.rewarders.tiny import TINY_VERSION

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "rewarders" / "data" / "calibration-tiny.json"))
    parser.add_argument("--cache-dir", help="where the tiny models are built (default: a temporary folder)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--per-prompt", type=int, default=4)
    args = parser.parse_args()

    rng = np.random.default_rng(20240531)
    prompts = [p for p in make_prompts(rng, args.prompts) for _ in range(args.per_prompt)]
    images = [make_image(rng, i % 6) for i in range(len(prompts))]
    with tempfile.TemporaryDirectory() as tmp:
        # calibration=None: the profile's own packaged calibration is what this script makes
        rewarder = create_rewarder(profile="tiny", calibration=None, device="cpu", cache_dir=args.cache_dir or tmp)
        cal = calibrate(rewarder, prompts, images, batch_size=32,
                        source=f"scripts/make_tiny_calibration.py: {len(prompts)} procedural images (tiny-v{TINY_VERSION} models)")
    cal.save(args.out)
    for name, e in cal.experts.items():
        print(f"{name:12s} n={e.n} mean={e.mean:.4f} std={e.std:.4f} 5%={e.quantiles[5]:.4f} 50%={e.quantiles[50]:.4f} "
              f"95%={e.quantiles[95]:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

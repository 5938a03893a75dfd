"""Cost of the ocr expert per 512x512 image (PP-OCR detection + recognition on onnxruntime), batch 1 and 8.

    python benchmarks/ocr.py                                   # this CPU, onnxruntime's default threads
    python benchmarks/ocr.py --threads 1 2 --workers 1 2       # the thread settings side by side
    python benchmarks/ocr.py --device cuda --batch 1 8 64 --workers 1 4 8     # with onnxruntime-gpu on a GPU host

Renders text images like Flow-GRPO's OCR prompts (a short phrase on a plain or coloured ground, one or two
lines, DejaVu fonts) and a few without text, prepares them as the mixture does (the expert's Preprocess),
and times the expert's forward alone: the uint8 conversion, detection, recognition and the reward.
Prints one JSON object: median (and best) wall milliseconds and median CPU milliseconds (all threads of
the process) per image for each (threads, workers, batch), the mean
reward as a check that the text is read. Reference figure: cosmos-rl's PaddleOCR reward service reports
about 0.12 s for two 512x512 images, 60 ms per image.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.rewarders.factory import LoadContext  # noqa: E402
from t2i_reward.rewarders.registry import get_expert_class  # noqa: E402

FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # the DejaVu faces matplotlib (a dependency) ships
TEXTS = ["Hello World", "OPEN 24 HOURS", "Coffee\nShop", "SALE 50%", "Welcome Home", "", "Happy Birthday", "NO ENTRY"]
FACES = ["DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf"]
GROUNDS = [("black", "white"), ("white", "navy"), ("darkred", "lightyellow"), ("darkgreen", "mistyrose")]


def images(n: int) -> tuple[list[Image.Image], list[str]]:
    out, prompts = [], []
    for i in range(n):
        text, (fg, bg) = TEXTS[i % len(TEXTS)], GROUNDS[i % len(GROUNDS)]
        im = Image.new("RGB", (512, 512), bg)
        ImageDraw.Draw(im).multiline_text((40 + 7 * i % 60, 120 + 23 * i % 200), text, fill=fg,
                                          font=ImageFont.truetype(str(FONTS / FACES[i % len(FACES)]), 40 + 4 * (i % 5)))
        out.append(im)
        prompts.append(f'a photo of a sign that says "{text.replace(chr(10), " ") or "Hello"}"')
    return out, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (onnxruntime-gpu)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[0], help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="images read at once")
    ap.add_argument("--images", type=int, default=32, help="images timed per setting")
    args = ap.parse_args()

    cls = get_expert_class("ocr")
    device = torch.device(args.device)
    pics, prompts = images(args.images)
    rows = []
    for threads in args.threads:
        for workers in args.workers:
            cfg = cls.Config(threads=threads, workers=workers, device="cuda" if device.type == "cuda" else "cpu")
            expert = cls.from_config(cfg, LoadContext(device, torch.float32, Path("/nonexistent")))
            pixels = expert.preprocess.pil(pics)
            expert(pixels[:2], prompts[:2])  # warm-up (first-run allocations)
            for batch in args.batch:
                per_image, cpu, rewards = [], [], []
                for start in range(0, args.images - batch + 1, batch):
                    t, c = time.perf_counter(), time.process_time()
                    out = expert(pixels[start:start + batch], prompts[start:start + batch])
                    per_image.append((time.perf_counter() - t) / batch * 1000)
                    cpu.append((time.process_time() - c) / batch * 1000)
                    rewards += out.tolist()
                rows.append({"threads": threads, "workers": workers, "batch": batch,
                             "ms_per_image": round(statistics.median(per_image), 1),
                             "ms_per_image_best": round(min(per_image), 1),  # the least disturbed by other load
                             # CPU time of this process (all its threads): what an image costs in core-ms,
                             # which other load on the machine does not inflate as it does the wall clock
                             "cpu_ms_per_image": round(statistics.median(cpu), 1),
                             "mean_reward": round(sum(rewards) / len(rewards), 3)})
            print(json.dumps(rows[-1]), file=sys.stderr)
            checkpoint, providers = expert.describe()["checkpoint"], expert.describe()["providers"]
    import onnxruntime

    import os

    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
                      "onnxruntime": onnxruntime.__version__, "providers": providers, "models": checkpoint,
                      "images": args.images, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

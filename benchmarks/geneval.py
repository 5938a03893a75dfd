"""Cost per image of the geneval expert with full-size random weights (Mask2Former Swin-S COCO instance +
CLIP ViT-L/14), on the CPU or a GPU.

    python benchmarks/geneval.py --images 4 --batch-size 2 --image-size 800              # CPU
    python benchmarks/geneval.py --device cuda --images 64 --batch-size 16 --image-size 800

Three numbers, each the median over `--repeats` after a warm-up:
- `detect`: the detector's forward and mmdet's post-processing per image (`GenEvalExpert.detect`);
- `colour_per_object`: one object's colour (its crop and one CLIP ViT-L/14 image pass, batched over the
  batch's objects; the ten colours' text classifier is built once per class and cached);
- `forward`: the whole expert per image on GenEval's own records (all six tags in turn). Random weights
  rarely find objects, so this is about `detect`; a trained detector adds `colour_per_object` for each object
  whose colour a record asks about: 1 for `colors`, 2 for `color_attr`, 0 for the other tags (GenEval's
  553 prompts: 0.53 per image on average).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.rewarders import geneval_rules as R  # noqa: E402
from t2i_reward.rewarders.experts.geneval import GenEvalConfig, GenEvalExpert  # noqa: E402
from t2i_reward.rewarders.factory import LoadContext  # noqa: E402

RECORDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "t2i-reward"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    t = time.perf_counter()
    ctx = LoadContext(device, dtype, Path(args.cache_dir))
    cfg = GenEvalConfig(detector="random", clip="ViT-L-14/random", image_size=args.image_size)
    expert = GenEvalExpert.from_config(cfg, ctx)
    load_s = time.perf_counter() - t

    records = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]
    by_tag = {tag: next(r for r in records if r["tag"] == tag) for tag in R.TAGS}
    picked = [by_tag[R.TAGS[i % len(R.TAGS)]] for i in range(args.batch_size)]
    torch.manual_seed(0)
    pixels = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    batches = max(1, args.images // args.batch_size)

    def run(fn) -> float:
        fn()  # warm-up
        return statistics.median(sum(timed(fn, device) for _ in range(batches)) for _ in range(args.repeats)) / (batches * args.batch_size)

    detect = run(lambda: expert.detect(pixels, [0.3] * args.batch_size))
    forward = run(lambda: expert(pixels, [r["prompt"] for r in picked], metadata=picked))

    # colours: two objects an image (color_attr's count), each a quarter of the image, masked to its left half
    s = args.image_size
    mask = torch.zeros(s, s, dtype=torch.bool, device=device)
    mask[s // 4 : 3 * s // 4, s // 4 : s // 2] = True
    rec = {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "cat", "count": 1, "color": "blue"}]}

    def colours():
        objs = [{c: [R.Detection((s / 4, s / 4, 3 * s / 4, 3 * s / 4), 0.9, mask)] for c in ("dog", "cat")} for _ in range(args.batch_size)]
        expert.classify_colours(pixels, [rec] * args.batch_size, objs)

    colour_per_object = run(colours) / 2
    crops_per_image = sum(sum(e["count"] for e in r["include"] if "color" in e) for r in records) / len(records)
    print(json.dumps({
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "machine": platform.machine(), "torch": torch.__version__, "image_size": args.image_size,
        "batch_size": args.batch_size, "images": batches * args.batch_size, "load_s": round(load_s, 2),
        "detect_s_per_image": round(detect, 4), "colour_s_per_object": round(colour_per_object, 4),
        "forward_s_per_image_random": round(forward, 4),
        "colour_objects_per_image_geneval": round(crops_per_image, 3),
        "estimated_s_per_image_trained": round(detect + crops_per_image * colour_per_object, 4),
    }, indent=2))


if __name__ == "__main__":
    main()

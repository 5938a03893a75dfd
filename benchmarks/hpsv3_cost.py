"""HPSv3's per-image cost at a 2B-sized random config (Qwen2-VL-2B's shapes: 1.5 B decoder, 0.6 B vision tower),
through the expert's own path (packed input -> vision tower -> decoder -> head), one image per call and batched.

    python benchmarks/hpsv3_cost.py [--shape 2b|7b] [--images 3] [--batch 1] [--device cpu|cuda] [--dtype float32|bfloat16]

The base folder (config.json in the hub's layout, a tokenizer built offline) is written to a temporary folder;
the weights are random (`checkpoint: random`), so only the time means anything. The prompt is HPSv3's
instruction (~420 tokens with the tiny tokenizer; Qwen's own tokenizer gives a similar count) plus 256 image tokens.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from t2i_reward.rewarders.experts import hpsv3 as H
from t2i_reward.rewarders.factory import LoadContext

SHAPES = {"2b": (H.QWEN2VL_2B, H.QWEN2VL_2B_VISION), "7b": (H.QWEN2VL_7B, H.QWEN2VL_7B_VISION)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2b", choices=SHAPES)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        H.write_base(Path(tmp), *SHAPES[a.shape], vocab_pad=151_936)  # the 2B's embedding size
        ctx = LoadContext(torch.device(a.device), getattr(torch, a.dtype), Path(tmp), 0)
        t = time.perf_counter()
        with torch.device(a.device):
            expert = H.HPSv3Expert.from_config(H.HPSv3Config(checkpoint="random", base=tmp), ctx)
        load = time.perf_counter() - t
    params = sum(p.numel() for p in expert.parameters())
    g = torch.Generator().manual_seed(0)
    ims = [Image.fromarray(torch.randint(0, 256, (512, 512, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(a.images)]
    prompt = "a photo of a cat on a red sofa"
    pixels = expert.preprocess.pil(ims[:1])
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        expert(pixels.to(a.device), [prompt] * 1)  # warm up
        sync()
        t = time.perf_counter()
        for i in range(0, a.images, a.batch):
            x = expert.preprocess.pil(ims[i : i + a.batch]).to(a.device)
            expert(x, [prompt] * x.shape[0])
        sync()
        dt = time.perf_counter() - t
    print(json.dumps({"shape": a.shape, "params": params, "device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads(),
                      "images": a.images, "batch": a.batch, "load_s": round(load, 1), "seconds_per_image": round(dt / a.images, 3),
                      "tokens": len(expert.input_ids(prompt, 256))}))


if __name__ == "__main__":
    main()

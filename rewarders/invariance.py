"""The batch-invariant mode (`batch_invariant: true`): a pair's scores bit-identical whatever it is batched with.

Why scores move with the batch at all: a kernel's arithmetic can depend on the shape it is given. On the
CPU, a matrix product of fewer than 4 rows takes another path through oneDNN/MKL than one of 4 or more
(the pooled projections of CLIP, BLIP and the heads see M = batch size); the text passes run on the
batch's *distinct* prompts, so their M depends on the neighbours; PickScore pads prompts to the longest of
the batch and HPSv3 right-pads its sequences to the longest, so the attention and its products change
length. On a GPU, cuBLAS and the attention kernels choose tile sizes and split-K by shape, and cuDNN's
autotuner picks algorithms at run time. A given kernel on a given shape, though, gives every row the same
bits wherever the row sits and whatever its neighbours hold (checked by benchmarks/batch_invariance.py
and tests/test_batch_invariance.py).

So the mode runs every forward pass at one fixed shape:
- the mixture cuts the pooled pairs into passes of exactly `max_batch_size` pairs, padding the last one
  with copies of its last pair (`pad_rows`), and drops the padding's scores;
- text passes encode every pair's prompt at that fixed shape (not the distinct prompts), PickScore pads
  prompts to its maximum length, the GenEval colour crops run in passes of the batch's size (`fixed_passes`);
- experts whose work is per pair anyway (ocr, the pointwise judges through a peer) or that run their pairs one at a
  time in this mode (hpsv3, whose sequences vary in length with the image) set `per_pair = True` and get
  the real pairs only, unpadded;
- on a GPU, `deterministic_device` turns off cuDNN's autotuner and asks for deterministic algorithms.

Its cost is the padded rows (up to `max_batch_size - 1` per call) and the text passes over every prompt.

What the checks of the mode score (the test and the benchmark above) is defined once at the end of this file:
`tiny_experts`, every expert that runs a model in its tiny form, and `mixed_requests`, seeded requests of
varying sizes, image shapes, prompts and GenEval records.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

# cuBLAS needs a fixed workspace per stream to be reproducible (NVIDIA's cuBLAS docs, "Results reproducibility")
CUBLAS_WORKSPACE = ":4096:8"


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """`x` (n, ...) with n <= size, its last row repeated to `size` rows. The copies are detached: they
    never send a gradient back, so a real row's gradient is the same as without them."""
    n = x.shape[0]
    if n >= size:
        return x
    return torch.cat([x, x[-1:].detach().expand(size - n, *x.shape[1:])])


def pad_list(items: list, size: int) -> list:
    """A list padded to `size` items by repeating its last one."""
    return list(items) + [items[-1]] * (size - len(items))


def fixed_passes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int) -> torch.Tensor:
    """`fn` over `x` in passes of exactly `size` rows (the last one padded), the padding's rows dropped:
    each row's result then depends only on the row."""
    out = [fn(pad_rows(x[i : i + size], size))[: min(size, x.shape[0] - i)] for i in range(0, x.shape[0], size)]
    return torch.cat(out)


def deterministic_device(device: torch.device) -> None:
    """On a CUDA device: fixed cuBLAS workspaces, no cuDNN autotuning, deterministic algorithms (with a
    warning where an op has none). These settings are process-wide; on the CPU nothing is needed."""
    if device.type != "cuda":
        return
    if os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE) != CUBLAS_WORKSPACE:
        log.info("batch_invariant: CUBLAS_WORKSPACE_CONFIG=%s kept", os.environ["CUBLAS_WORKSPACE_CONFIG"])
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---- what the checks of the mode score: tests/test_batch_invariance.py and benchmarks/batch_invariance.py

# GenEval records of three kinds, one drawn per pair (the geneval expert needs one)
GENEVAL_RECORDS = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
                   {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
                   {"tag": "colors", "include": [{"class": "apple", "count": 1, "color": "red"}]}]


def tiny_experts(geneval_size: int = 64) -> dict[str, dict]:
    """Every expert that runs a model, configured in its tiny form (ocr: the rapidocr wheel's real weights;
    geneval's detector at `geneval_size`)."""
    return {
        "imagereward": {"checkpoint": "tiny", "tokenizer": "packaged"},
        "aesthetic": {"clip": "tiny", "head": "tiny", "mean": 0.0, "std": 1.0},
        "mlp": {"checkpoint": "tiny"},
        "pickscore": {"checkpoint": "tiny"},
        "hpsv2": {"checkpoint": "tiny"},
        "clip_score": {"clip": "tiny"},
        "blip_score": {"checkpoint": "tiny", "tokenizer": "packaged"},
        "diversity": {"clip": "tiny"},
        "ocr": {"neutral_score": 0.0},
        "geneval": {"detector": "tiny", "clip": "tiny", "image_size": geneval_size},
        "hpsv3": {"checkpoint": "tiny"},
    }


def mixed_requests(n: int, seed: int, sizes: Sequence[int], shapes: Sequence[tuple[int, int]],
                   prompts: Sequence[str]) -> list[tuple[list[str], torch.Tensor, list[dict]]]:
    """n seeded requests (prompts, uint8 (B, H, W, 3), GenEval records): B drawn from `sizes`, (H, W) from `shapes`
    (multiples of 8), a prompt and a record per pair. The images are 8x8 blocks of colour under noise, so every
    expert sees structure and no two images are alike."""
    rng, g = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b, (h, w) = rng.choice(sizes), rng.choice(shapes)
        small = g.integers(0, 256, (b, h // 8, w // 8, 3), dtype=np.uint8)
        images = np.repeat(np.repeat(small, 8, 1), 8, 2) // 2 + g.integers(0, 128, (b, h, w, 3), dtype=np.uint8)
        out.append(([rng.choice(prompts) for _ in range(b)], torch.from_numpy(images.astype(np.uint8)),
                    [rng.choice(GENEVAL_RECORDS) for _ in range(b)]))
    return out

"""Preference data in ImageRewardDB's format, the pairs it implies, and CLIP embeddings cached on disk.

A record is one prompt with several generated images and a `ranking` (1 = best; tied images share a
rank). Pairs come from the rankings: (better, worse) for every two images of a prompt whose ranks
differ; ties give no pair. Splits are by prompt, never by pair, so no prompt is in two splits.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import InvalidRequestError


@dataclass
class PreferenceRecord:
    prompt: str
    images: list  # paths (str / Path) or PIL images
    ranking: list[int]


def load_preference_data(src: str, image_root: str | None = None, split: str = "train") -> list[PreferenceRecord]:
    """Records from a local JSON/JSONL file in ImageRewardDB's format (image paths relative to
    `image_root`, else to the file's folder), or from the hub dataset (e.g. `THUDM/ImageRewardDB`,
    optionally `THUDM/ImageRewardDB:8k` for a subset) through the `datasets` library."""
    path = Path(src).expanduser()
    if path.is_file():
        return _load_local(path, Path(image_root) if image_root else path.parent)
    if src.count("/") == 1 or ":" in src:
        return _load_hub(src, split)
    raise InvalidRequestError(f"preference data {src!r}: no such file, and not a hub dataset id")


def _load_local(path: Path, root: Path) -> list[PreferenceRecord]:
    try:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix.lower() == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"cannot read preference data {path}: {e}") from None
    if not isinstance(rows, list):
        raise InvalidRequestError(f"{path}: expected a list of records")
    records = []
    for k, row in enumerate(rows):
        try:
            prompt, gens, ranking = row["prompt"], row["generations"], row["ranking"]
        except (KeyError, TypeError):
            raise InvalidRequestError(f"{path}: record {k} needs 'prompt', 'generations' and 'ranking'") from None
        if len(gens) != len(ranking):
            raise InvalidRequestError(f"{path}: record {k} has {len(gens)} generations but {len(ranking)} ranks")
        records.append(PreferenceRecord(prompt, [root / g for g in gens], [int(r) for r in ranking]))
    return records


def _load_hub(src: str, split: str) -> list[PreferenceRecord]:
    repo, _, subset = src.partition(":")
    try:
        import datasets
    except ImportError:
        raise InvalidRequestError("reading a hub dataset needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(repo, subset or None, split=split)
    except Exception as e:
        raise InvalidRequestError(f"cannot load hub dataset {src} ({type(e).__name__}: {e}); use a local file") from None
    by_prompt: dict[str, PreferenceRecord] = {}
    for row in ds:  # ImageRewardDB: one row per image, with prompt_id, prompt, image and rank
        rec = by_prompt.setdefault(row["prompt_id"], PreferenceRecord(row["prompt"], [], []))
        rec.images.append(row["image"])
        rec.ranking.append(int(row["rank"]))
    return list(by_prompt.values())


def preference_pairs(records: Sequence[PreferenceRecord]) -> list[tuple[int, int, int]]:
    """(record, better image, worse image) for every two images of a record with different ranks."""
    pairs = []
    for r, rec in enumerate(records):
        for i, ri in enumerate(rec.ranking):
            for j, rj in enumerate(rec.ranking):
                if ri < rj:
                    pairs.append((r, i, j))
    return pairs


def split_by_prompt(records: Sequence[PreferenceRecord], val_fraction: float, seed: int = 0):
    """(train, validation) lists of records; a prompt's records all land in the same split."""
    prompts = sorted({r.prompt for r in records})
    random.Random(seed).shuffle(prompts)
    n_val = max(1, round(len(prompts) * val_fraction)) if val_fraction > 0 else 0
    val_prompts = set(prompts[:n_val])
    return [r for r in records if r.prompt not in val_prompts], [r for r in records if r.prompt in val_prompts]


class EmbeddingCache:
    """CLIP embeddings on disk, keyed by the CLIP spec and the image bytes (or prompt text)."""

    def __init__(self, root: Path, clip_spec: str):
        self.dir = Path(root) / hashlib.sha256(clip_spec.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        p = self._path(key)
        return np.load(p) if p.is_file() else None

    def put(self, key: str, value: np.ndarray) -> None:
        p = self._path(key)
        p.parent.mkdir(exist_ok=True)
        tmp = p.with_suffix(".tmp.npy")
        np.save(tmp, value)
        tmp.replace(p)


def image_key(image) -> str:
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    else:  # a PIL image: its pixels
        data = image.mode.encode() + str(image.size).encode() + image.tobytes()
    return "img-" + hashlib.sha256(data).hexdigest()


def text_key(text: str) -> str:
    return "txt-" + hashlib.sha256(text.encode()).hexdigest()


def embed_images(images: Sequence, clip, cache: EmbeddingCache, max_pixels: int, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(N, D) L2-normalised CLIP image embeddings, computing only the ones missing from the cache."""
    from tqdm.auto import tqdm

    from ..images import open_image

    keys = [image_key(im) for im in images]
    out: dict[str, np.ndarray] = {}
    todo = []
    for k, im in zip(keys, images):
        if k not in out:
            v = cache.get(k)
            if v is None:
                todo.append((k, im))
                out[k] = None
            else:
                out[k] = v
    device = next(clip.parameters()).device
    with torch.inference_mode():
        for s in tqdm(range(0, len(todo), batch_size), desc="embedding images", disable=not progress or not todo):
            chunk = todo[s : s + batch_size]
            pixels = clip.preprocess.pil([open_image(im, max_pixels) for _, im in chunk]).to(device)
            for (k, _), v in zip(chunk, clip.encode_images(pixels).cpu().numpy()):
                cache.put(k, v)
                out[k] = v
    return np.stack([out[k] for k in keys]).astype(np.float32)


def embed_texts(texts: Sequence[str], clip, cache: EmbeddingCache, batch_size: int = 256) -> np.ndarray:
    keys = [text_key(t) for t in texts]
    missing = sorted({(k, t) for k, t in zip(keys, texts) if cache.get(k) is None})
    with torch.inference_mode():
        for s in range(0, len(missing), batch_size):
            chunk = missing[s : s + batch_size]
            for (k, _), v in zip(chunk, clip.encode_texts([t for _, t in chunk]).cpu().numpy()):
                cache.put(k, v)
    return np.stack([cache.get(k) for k in keys]).astype(np.float32)


def perturb_prompt(prompt: str, vocabulary: Sequence[str], rng: random.Random) -> str:
    """Lee et al.'s auxiliary task needs prompts that are close to the true one but wrong: replace one
    word of the prompt with another word of the corpus."""
    words = prompt.split()
    if not words:
        return rng.choice(vocabulary)
    i = rng.randrange(len(words))
    choices = [w for w in vocabulary if w.lower() != words[i].lower()]
    words[i] = rng.choice(choices) if choices else words[i] + " not"
    return " ".join(words)

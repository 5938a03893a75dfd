"""Training the thesis's MLP reward model on preference pairs (`t2i-reward train-reward`).

Reads top to bottom: config -> data and embeddings -> model -> loop -> save.

Loss, per pair (x_i preferred to x_j for prompt z): -log sigmoid(r(x_i, z) - r(x_j, z)) (Bradley-Terry).
Optional auxiliary loss (Lee et al., seed 002): for each image, classify its true prompt among
`aux_negatives` perturbed prompts (one word replaced by another word of the corpus) with a softmax over
r(x, z) and r(x, z'_k); added with weight `aux_weight`.
Every image and prompt is embedded once with the configured CLIP and cached on disk by content.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..config import DEFAULT_CACHE
from ..errors import InvalidRequestError
from ..experts.mlp import MLPRewardConfig, MLPRewardModel
from ..factory import LoadContext, resolve_device
from .data import (
    EmbeddingCache,
    embed_images,
    embed_texts,
    load_preference_data,
    perturb_prompt,
    preference_pairs,
    split_by_prompt,
)

log = logging.getLogger(__name__)


class TrainRewardConfig(BaseModel):
    data: str = Field(..., description="Preference data: ImageRewardDB-format JSON/JSONL, or a hub dataset id.")
    image_root: Optional[str] = Field(None, description="Folder the image paths are relative to (default: the data file's).")
    out: Path = Field(..., description="Output directory: model.safetensors, config.json, metrics.json, training_curve.png.")
    clip: str = Field("ViT-L-14/openai", description="CLIP (open_clip MODEL/PRETRAINED, or 'tiny') that embeds images and prompts.")
    epochs: int = Field(20, ge=1, description="Passes over the training pairs.")
    batch_size: int = Field(256, ge=1, description="Pairs per optimiser step.")
    lr: float = Field(1e-5, gt=0, description="Adam learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of prompts held out to pick the best epoch.")
    aux_weight: float = Field(0.0, ge=0, description="Weight of Lee et al.'s prompt-classification loss (0: off).")
    aux_negatives: int = Field(4, ge=1, description="Perturbed prompts per image for the auxiliary loss.")
    seed: int = Field(0, description="Seed for the split, the shuffling, the perturbations and the init.")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', ...")
    cache_dir: Path = Field(DEFAULT_CACHE, description="Where the CLIP embeddings (and tiny models) are cached.")
    max_image_pixels: int = Field(40_000_000, description="Images with more pixels are refused.")


def train_reward(cfg: TrainRewardConfig, progress: bool = True) -> dict:
    """Train, keep the epoch with the best validation accuracy, save; returns the metrics."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)

    # ---- data and embeddings
    records = load_preference_data(cfg.data, cfg.image_root)
    train_recs, val_recs = split_by_prompt(records, cfg.val_fraction, cfg.seed)
    if not preference_pairs(train_recs):
        raise InvalidRequestError("the training split has no preference pairs (every ranking is a tie?)")
    clip = LoadContext(device, torch.float32, cfg.cache_dir).get_clip(cfg.clip)
    cache = EmbeddingCache(cfg.cache_dir / "embeddings", cfg.clip)

    def embed_split(recs):
        images = [im for r in recs for im in r.images]
        img = torch.from_numpy(embed_images(images, clip, cache, cfg.max_image_pixels, progress=progress))
        txt = torch.from_numpy(embed_texts([r.prompt for r in recs], clip, cache))
        owner = torch.tensor([k for k, r in enumerate(recs) for _ in r.images])  # image -> its record
        starts = np.cumsum([0] + [len(r.images) for r in recs])
        pairs = torch.tensor([(starts[r] + i, starts[r] + j) for r, i, j in preference_pairs(recs)], dtype=torch.long)
        return img.to(device), txt.to(device), owner.to(device), pairs.to(device)

    tr_img, tr_txt, tr_owner, tr_pairs = embed_split(train_recs)
    val = embed_split(val_recs) if val_recs else None
    aux_txt = None
    if cfg.aux_weight > 0:
        vocabulary = sorted({w for r in records for w in r.prompt.split()})
        perturbed = [perturb_prompt(r.prompt, vocabulary, rng) for r in train_recs for _ in range(cfg.aux_negatives)]
        aux_txt = torch.from_numpy(embed_texts(perturbed, clip, cache)).to(device).view(len(train_recs), cfg.aux_negatives, -1)

    # ---- model
    model = MLPRewardModel(MLPRewardConfig(clip=cfg.clip, embed_dim=clip.embed_dim)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    def accuracy(img, txt, owner, pairs) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            r = model(img, txt[owner])
            diff = r[pairs[:, 0]] - r[pairs[:, 1]]
            loss = float(-F.logsigmoid(diff).mean())
            acc = float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
        return acc, loss

    # ---- loop
    history = {"epoch": [], "train_loss": [], "bt_loss": [], "aux_loss": [], "val_accuracy": [], "val_loss": []}
    best = (-1.0, float("inf"))
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(tr_pairs), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        sums = {"loss": 0.0, "bt": 0.0, "aux": 0.0}
        steps = 0
        for s in range(0, len(order), cfg.batch_size):
            batch = tr_pairs[order[s : s + cfg.batch_size].to(device)]
            i, j = batch[:, 0], batch[:, 1]
            prompt = tr_txt[tr_owner[i]]
            bt = -F.logsigmoid(model(tr_img[i], prompt) - model(tr_img[j], prompt)).mean()
            loss = bt
            aux = torch.zeros((), device=device)
            if aux_txt is not None:
                images = torch.unique(torch.cat([i, j]))
                owner = tr_owner[images]
                candidates = torch.cat([tr_txt[owner][:, None], aux_txt[owner]], dim=1)  # true prompt first
                n, k, d = candidates.shape
                logits = model(tr_img[images][:, None].expand(n, k, -1).reshape(n * k, -1), candidates.reshape(n * k, d)).view(n, k)
                aux = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=device))
                loss = bt + cfg.aux_weight * aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums["loss"] += loss.item()
            sums["bt"] += bt.item()
            sums["aux"] += aux.item()
            steps += 1
        val_acc, val_loss = accuracy(*val) if val is not None else (float("nan"), float("nan"))
        history["epoch"].append(epoch)
        history["train_loss"].append(sums["loss"] / steps)
        history["bt_loss"].append(sums["bt"] / steps)
        history["aux_loss"].append(sums["aux"] / steps)
        history["val_accuracy"].append(val_acc)
        history["val_loss"].append(val_loss)
        log.info("epoch %d: train loss %.4f, val accuracy %.4f", epoch, sums["loss"] / steps, val_acc)
        # keep the best epoch on validation (accuracy, then loss); without a validation split, the last
        score = (val_acc, -val_loss) if val is not None else (epoch, 0.0)
        if score > (best[0], -best[1]):
            best = (score[0], -score[1])
            best_state = copy.deepcopy(model.state_dict())
            history["best_epoch"] = epoch

    # ---- save: the best weights, with the score statistics of the training images for normalisation
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        scores = model(tr_img, tr_txt[tr_owner])
    model.config.mean, model.config.std = float(scores.mean()), float(scores.std().clamp_min(1e-6))
    model.cpu().save(cfg.out)
    metrics = {
        "train_prompts": len(train_recs), "val_prompts": len(val_recs), "train_pairs": len(tr_pairs),
        "val_pairs": int(len(val[3])) if val is not None else 0,
        "best_epoch": history.get("best_epoch"), "best_val_accuracy": best[0] if val is not None else None,
        "history": history, "config": json.loads(cfg.model_dump_json()),
    }
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_curve(history, Path(cfg.out) / "training_curve.png")
    return metrics


def plot_curve(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(history["epoch"], history["train_loss"], label="train loss")
    ax[0].plot(history["epoch"], history["val_loss"], label="validation loss")
    if any(history["aux_loss"]):
        ax[0].plot(history["epoch"], history["aux_loss"], label="auxiliary loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(history["epoch"], history["val_accuracy"], color="tab:green")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation preference accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

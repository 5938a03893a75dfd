"""The thesis reward model (seed 001): an MLP on CLIP ViT-L/14 image and text embeddings.

Input: the L2-normalised CLIP image embedding and text embedding, concatenated (2 x embed_dim).
Layers: Dropout(0.2), Linear(->1024), ReLU, Dropout(0.2), Linear(->256), ReLU, Dropout(0.1),
Linear(->128), ReLU, Linear(->32), ReLU, Linear(->1).
Checkpoint: a directory with `model.safetensors` and `config.json`; the config names the CLIP model the
embeddings must come from and the score statistics measured when it was trained (for normalisation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints import resolve_checkpoint
from ..clip import TINY_CLIP_CONFIG
from ..errors import ModelLoadError
from ..registry import Expert, ExpertConfig, register_expert

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class MLPRewardConfig(BaseModel):
    """The JSON config saved beside the MLP's weights."""

    format: str = Field("t2i-reward-mlp/1", description="Format tag of this checkpoint.")
    clip: str = Field("ViT-L-14/openai", description="The CLIP (open_clip MODEL/PRETRAINED) the embeddings come from.")
    embed_dim: int = Field(768, description="CLIP embedding size; the MLP input is twice this.")
    hidden_sizes: list[int] = Field([1024, 256, 128, 32], description="Hidden layer sizes.")
    dropout: list[float] = Field([0.2, 0.2, 0.1], description="Dropout before the first, second and third Linear.")
    mean: float = Field(0.0, description="Mean score on the training images (used to normalise).")
    std: float = Field(1.0, gt=0, description="Std of the scores on the training images (used to normalise).")


class MLPRewardModel(nn.Module):
    def __init__(self, cfg: MLPRewardConfig):
        super().__init__()
        self.config = cfg
        layers: list[nn.Module] = []
        prev = 2 * cfg.embed_dim
        for i, h in enumerate(cfg.hidden_sizes):
            if i < len(cfg.dropout) and cfg.dropout[i] > 0:
                layers.append(nn.Dropout(cfg.dropout[i]))
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.cat([image_embeds, text_embeds], dim=-1)).squeeze(-1)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, out / WEIGHTS_FILE)
        (out / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2) + "\n")
        return out

    @classmethod
    def load(cls, weights: Path, spec: str | None = None) -> "MLPRewardModel":
        """Load `model.safetensors` and the `config.json` beside it."""
        spec = spec or str(weights)
        config_path = weights.parent / CONFIG_FILE
        if not config_path.is_file():
            raise ModelLoadError(f"MLP reward checkpoint {spec}: {CONFIG_FILE} is missing beside {weights.name}")
        try:
            cfg = MLPRewardConfig(**json.loads(config_path.read_text()))
            model = cls(cfg)
            model.load_state_dict(load_file(weights))
        except Exception as e:
            raise ModelLoadError(f"cannot load MLP reward checkpoint {spec}: {e}") from None
        return model


def build_tiny(out: Path) -> None:
    """A tiny thesis MLP on the tiny CLIP, saved as train-reward saves one."""
    torch.manual_seed(1)
    MLPRewardModel(MLPRewardConfig(clip="tiny", embed_dim=TINY_CLIP_CONFIG["embed_dim"])).save(out)


class MLPConfig(ExpertConfig):
    checkpoint: str = Field(..., description="Directory with model.safetensors and config.json (train-reward writes it), its model.safetensors, a hub id, or 'tiny'/'random'.")
    clip: Optional[str] = Field(None, description="Override the CLIP named in the checkpoint's config.json (rarely needed).")


@register_expert
class MLPExpert(Expert):
    """The thesis MLP; default normalisation: the score statistics stored in its checkpoint."""

    name = "mlp"
    pool = "clip"  # runs beside the other experts on the shared CLIP (one image pass): one Ray Serve pool
    Config = MLPConfig
    needs_text_embeds = True
    build_tiny = staticmethod(build_tiny)

    def __init__(self, model: MLPRewardModel, clip_spec: str, preprocess, checkpoint: str, random_weights: bool):
        super().__init__(preprocess, checkpoint, random_weights, clip_spec)
        self.model = model
        self.default_mean = model.config.mean
        self.default_std = model.config.std

    @classmethod
    def from_config(cls, cfg: MLPConfig, ctx) -> "MLPExpert":
        ckpt = resolve_checkpoint(cfg.checkpoint, WEIGHTS_FILE, "MLP reward checkpoint", ctx.tiny_source(cls))
        if ckpt.path is None:
            clip_spec = cfg.clip or "ViT-L-14/random"
            clip = ctx.get_clip(clip_spec)
            torch.manual_seed(ctx.seed + 2)
            model = MLPRewardModel(MLPRewardConfig(clip=clip_spec, embed_dim=clip.embed_dim))
        else:
            model = MLPRewardModel.load(ckpt.path, cfg.checkpoint)
            clip_spec = cfg.clip or model.config.clip
            clip = ctx.get_clip(clip_spec)
        if clip.embed_dim != model.config.embed_dim:
            raise ModelLoadError(
                f"MLP reward model expects {model.config.embed_dim}-dim CLIP embeddings but {clip_spec} gives {clip.embed_dim}"
            )
        random_weights = ckpt.random_weights or clip.random_weights
        if random_weights:
            log.warning("MLP expert has RANDOM weights (checkpoint %s, CLIP %s)", cfg.checkpoint, clip_spec)
        model.eval().requires_grad_(False).to(ctx.device)
        return cls(model, clip_spec, clip.preprocess, cfg.checkpoint, random_weights)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        return self.model(image_embeds.float(), text_embeds.float())

"""The CLIP backbone shared by the CLIP-based experts (aesthetic, MLP), loaded through open_clip.

Specs: `ViT-L-14/openai` (open_clip model / pretrained tag), `ViT-L-14//models/clip.bin` (model / local
file), `hf-hub:org/repo`, `ViT-L-14/random` (random weights) or `tiny` (the project's tiny CLIP).
One backbone object is built per distinct spec and shared, so each image goes through it once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .checkpoints import TINY, resolve_checkpoint
from .errors import ModelLoadError
from .images import Preprocess

log = logging.getLogger(__name__)

TINY_CLIP_NAME = "t2i-reward-tiny-clip"
TINY_CLIP_WEIGHTS = "open_clip_model.bin"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny_clip(out: Path) -> None:
    """The tiny CLIP as open_clip loads any model: a model config JSON plus a plain state-dict checkpoint."""
    import open_clip

    config = out / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY_CLIP_NAME, pretrained=None).state_dict(), out / TINY_CLIP_WEIGHTS)


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """'ViT-L-14/openai' -> ('ViT-L-14', 'openai'); 'X/random' -> ('X', None); 'hf-hub:o/r' -> ('hf-hub:o/r', None)."""
    if spec.startswith("hf-hub:"):
        return spec, None
    model, sep, pretrained = spec.partition("/")
    if not sep or not model or not pretrained:
        raise ModelLoadError(f"CLIP spec {spec!r} must be MODEL/PRETRAINED (e.g. ViT-L-14/openai or ViT-L-14/random)")
    return model, None if pretrained == "random" else pretrained


class ClipBackbone(nn.Module):
    """An open_clip model with its tokenizer and its preprocessing spec."""

    def __init__(self, spec: str, cache_dir, device: torch.device, dtype: torch.dtype):
        super().__init__()
        import open_clip

        self.spec = spec
        if spec == TINY:
            weights = resolve_checkpoint(TINY, TINY_CLIP_WEIGHTS, "tiny CLIP", tiny=("clip", build_tiny_clip, cache_dir)).path
            open_clip.add_model_config(weights.parent / f"{TINY_CLIP_NAME}.json")
            model_name, pretrained = TINY_CLIP_NAME, str(weights)
            self.random_weights = True
        else:
            model_name, pretrained = parse_clip_spec(spec)
            self.random_weights = pretrained is None and not model_name.startswith("hf-hub:")
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu")
        except Exception as e:
            raise ModelLoadError(
                f"CLIP {spec!r}: could not load open_clip model {model_name!r} with pretrained={pretrained!r} "
                f"({type(e).__name__}: {e}). Use a local weights file (MODEL//path/to/file) or the 'tiny' profile offline."
            ) from None
        if self.random_weights:
            log.warning("CLIP %s has RANDOM weights: its scores mean nothing", spec)
        model.eval().requires_grad_(False)
        self.model = model.to(device=device, dtype=dtype)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = getattr(model.visual, "preprocess_cfg", {})
        size = cfg.get("size", model.visual.image_size)
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.preprocess = Preprocess(int(size), tuple(cfg.get("mean", Preprocess.mean)), tuple(cfg.get("std", Preprocess.std)))
        self.embed_dim = int(model.text_projection.shape[1]) if isinstance(model.text_projection, torch.Tensor) else int(model.text_projection.out_features)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> L2-normalised image embeddings (float32)."""
        dtype = next(self.model.parameters()).dtype
        emb = self.model.encode_image(pixels.to(dtype)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> L2-normalised text embeddings (float32); the tokenizer truncates at 77 tokens."""
        device = next(self.model.parameters()).device
        emb = self.model.encode_text(self.tokenizer(prompts).to(device)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

"""The CLIP backbone shared by the CLIP-based experts (aesthetic, MLP), loaded through open_clip.

Specs: `ViT-L-14/openai` (open_clip model / pretrained tag), `ViT-L-14//models/clip.bin` (model / local
file), `hf-hub:org/repo`, `ViT-L-14/random` (random weights) or `tiny` (the project's tiny CLIP).
One backbone object is built per distinct spec and shared, so each image goes through it once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ModelLoadError
from .images import Preprocess

log = logging.getLogger(__name__)


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
        if spec == "tiny":
            from .tiny import ensure_tiny

            files = ensure_tiny(cache_dir)
            open_clip.add_model_config(files.clip_config)
            model_name, pretrained = files.clip_model_name, str(files.clip_weights)
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

"""The LAION improved-aesthetic-predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

Head layout as released (`sac+logos+ava1-l14-linearMSE.pth`, keys `layers.{0,2,4,6,7}.*`):
Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
Linear(16, 1), no activations. Sizes are read from the file, so the tiny head loads the same way.
The head was trained on OpenAI's CLIP, whose ViT uses QuickGELU: the shared backbone (`clip.py`) builds
QuickGELU for the `openai` tag and for OpenAI-format local files (`ViT-L-14//path/ViT-L-14.pt`), so a
local copy scores as `ViT-L-14/openai` does; the CLIP pass is shared with `mlp` and `clip_score`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from ..checkpoints import resolve_checkpoint
from ..clip import TINY_CLIP_CONFIG
from ..errors import ModelLoadError
from ..registry import Expert, ExpertConfig, register_expert

log = logging.getLogger(__name__)

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
LAYER_IDS = (0, 2, 4, 6, 7)  # the Linear layers; 1, 3, 5 are the dropouts


class AestheticHead(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < 3:
                layers.append(nn.Identity())  # dropout slot: off at inference, kept so indices match the file
        self.layers = nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "AestheticHead":
        try:
            sizes = [sd["layers.0.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in LAYER_IDS]
        except KeyError as e:
            raise ModelLoadError(f"not a LAION aesthetic head: missing tensor {e}") from None
        head = cls(tuple(sizes))
        missing, unexpected = head.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"aesthetic head does not match: missing {missing}, unexpected {unexpected}")
        return head


def build_tiny(out: Path) -> None:
    """A tiny LAION head (.pth, the released key layout) on the tiny CLIP's embedding size."""
    gen = torch.Generator().manual_seed(4321)
    head = AestheticHead((TINY_CLIP_CONFIG["embed_dim"], 1024, 128, 64, 16, 1))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    torch.save(head.state_dict(), out / HEAD_FILE)


class AestheticConfig(ExpertConfig):
    clip: str = Field("ViT-L-14/openai", description="open_clip MODEL/PRETRAINED (tag, local file or 'random'), or 'tiny'.")
    head: str = Field(
        "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
        description="LAION improved-aesthetic-predictor head (.pth): hub file, local file or directory, 'tiny' or 'random'.",
    )


@register_expert
class AestheticExpert(Expert):
    """Predicted AVA-style rating (about 1..10). Default normalisation: the AVA mean-score distribution."""

    name = "aesthetic"
    pool = "clip"  # runs beside the other experts on the shared CLIP (one image pass): one Ray Serve pool
    Config = AestheticConfig
    default_mean = 5.4
    default_std = 0.74
    build_tiny = staticmethod(build_tiny)

    def __init__(self, head: AestheticHead, clip_spec: str, preprocess, checkpoint: str, random_weights: bool):
        super().__init__(preprocess, checkpoint, random_weights, clip_spec)
        self.head = head

    @classmethod
    def from_config(cls, cfg: AestheticConfig, ctx) -> "AestheticExpert":
        clip = ctx.get_clip(cfg.clip)
        ckpt = resolve_checkpoint(cfg.head, HEAD_FILE, "aesthetic head", ctx.tiny_source(cls))
        if ckpt.path is None:
            torch.manual_seed(ctx.seed + 1)
            head = AestheticHead((clip.embed_dim, 1024, 128, 64, 16, 1))
        else:
            try:
                sd = torch.load(ckpt.path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ModelLoadError(f"cannot read aesthetic head {ckpt.path}: {e}") from None
            head = AestheticHead.from_state_dict(sd)
        if head.layers[0].in_features != clip.embed_dim:
            raise ModelLoadError(
                f"aesthetic head expects {head.layers[0].in_features}-dim embeddings but CLIP {cfg.clip} gives {clip.embed_dim}"
            )
        random_weights = ckpt.random_weights or clip.random_weights
        if random_weights:
            log.warning("aesthetic expert has RANDOM weights (head %s, CLIP %s)", cfg.head, cfg.clip)
        head.eval().requires_grad_(False).to(ctx.device)  # float32: the head is tiny and scores stay exact
        return cls(head, cfg.clip, clip.preprocess, cfg.head, random_weights)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        return self.head(image_embeds.float())

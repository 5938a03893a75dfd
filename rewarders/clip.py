"""The CLIP backbone shared by the CLIP-based experts (aesthetic, MLP, clip_score), loaded through open_clip.

Specs: `ViT-L-14/openai` (open_clip model / pretrained tag), `ViT-L-14//models/clip.bin` (model / local
file), `hf-hub:org/repo`, `ViT-L-14/random` (random weights) or `tiny` (the project's tiny CLIP).
One backbone object is built per distinct spec and shared, so each image goes through it once.

Activation: OpenAI trained CLIP with QuickGELU, open_clip's plain model names (`ViT-L-14`) build GELU,
and open_clip 3 only *warns* when the two disagree. GELU on OpenAI weights moves scores (about 0.06 on
the aesthetic scale), so QuickGELU is built whenever the weights are OpenAI's: a pretrained tag that
open_clip marks `quick_gelu` (`openai`), a `-quickgelu` model name, or a local file in OpenAI's release
format (a TorchScript archive, or OpenAI's key layout with float16 projections, as OpenAI's `clip`
package saves them; open_clip and LAION save float32).
Any other local file for a model that OpenAI released gets GELU with a warning naming the override
(`ViT-L-14-quickgelu//path`).
"""

from __future__ import annotations

import json
import logging
import zipfile
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


def _is_torchscript(path: Path) -> bool:
    """OpenAI's released CLIP files are TorchScript archives: a zip holding compiled code and constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a local CLIP file; TorchScript archives (which open_clip's weights-only load refuses) too."""
    if _is_torchscript(path):
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        return {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: only dtypes are read here
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def openai_format(path: Path) -> str | None:
    """Why the local file at `path` holds OpenAI's CLIP release (then it needs QuickGELU), or None."""
    if _is_torchscript(path):
        return "a TorchScript archive, as OpenAI releases CLIP"
    if path.suffix == ".safetensors":
        return None
    try:
        sd = _read_state_dict(path)
    except Exception:
        return None  # open_clip reports unreadable files itself
    # OpenAI's `clip.model.convert_weights` stores the linear layers and both projections in float16 (layer
    # norms and embeddings may stay float32); open_clip and LAION checkpoints are float32
    keys = ("text_projection", "visual.proj", "token_embedding.weight")
    if all(k in sd for k in keys) and all(sd[k].dtype == torch.float16 for k in keys[:2]):
        return "float16 weights in OpenAI's key layout, as OpenAI's CLIP saves them"
    return None


def quick_gelu_for(model_name: str, pretrained: str | None) -> tuple[bool, str]:
    """(QuickGELU?, why) for an open_clip model name and pretrained tag or local file."""
    import open_clip

    if model_name.startswith("hf-hub:"):
        return False, "the hub config decides"
    cfg = open_clip.get_model_config(model_name) or {}
    if cfg.get("quick_gelu"):
        return True, f"{model_name} is a QuickGELU model"
    if not pretrained:
        return False, f"open_clip's {model_name} (random weights)"
    path = Path(pretrained).expanduser()
    if not path.is_file():
        tag = open_clip.get_pretrained_cfg(model_name, pretrained)
        return bool(tag.get("quick_gelu")), f"pretrained tag {pretrained!r}"
    why = openai_format(path)
    if why:
        return True, f"{path.name} is {why}"
    if "openai" in open_clip.list_pretrained_tags_by_model(model_name):
        log.warning("CLIP %s//%s: built with GELU, as open_clip's %s; if these are OpenAI's weights (QuickGELU) "
                    "saved in another format, use %s-quickgelu//%s", model_name, path, model_name, model_name, path)
    return False, f"{path.name} is not in OpenAI's release format"


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
            self.quick_gelu, why = quick_gelu_for(model_name, pretrained)
            log.info("CLIP %s: %s activation (%s)", spec, "QuickGELU" if self.quick_gelu else "GELU", why)
            archive = pretrained is not None and Path(pretrained).is_file() and _is_torchscript(Path(pretrained))
            model = open_clip.create_model(model_name, pretrained=None if archive else pretrained, device="cpu",
                                           force_quick_gelu=self.quick_gelu)
            if archive:
                # TorchScript saves non-persistent buffers (open_clip's attn_mask) too: skip those, strict on the rest
                keep, buffers = model.state_dict().keys(), dict(model.named_buffers())
                model.load_state_dict({k: v for k, v in _read_state_dict(Path(pretrained)).items() if k in keep or k not in buffers})
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

"""HPS v2 / v2.1 (Wu et al. 2023, hub repo `xswu/HPSv2`): an open_clip ViT-H-14 fine-tuned on HPD v2.

Loads the released `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` as they are: `{'state_dict': ...}`
with open_clip's CLIP key names. Both versions share the architecture; its sizes and layer counts are
read from the file (ViT-H-14: heads of 80 channels in the vision tower, of 64 in the text tower, GELU),
so the project's tiny file loads through the same code.

Preprocessing is HPSv2's own (`hpsv2.img_score` builds its transforms with `light_augmentation=True`,
hence `ResizeMaxSize`), not CLIP's PIL path: RGB (an RGBA image's alpha is dropped, not composited),
`ToTensor` first, then a bicubic antialiased resize of the *float* tensor (no clamping of the overshoot)
that brings the LONG side to 224, zero padding (black, before normalisation) to 224 x 224 centred, CLIP
mean/std. Nothing is cropped. Tokenizer: open_clip's CLIP BPE, 77 tokens. Score = cos(image, text) in
float32, no logit scale.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torchvision.transforms import functional as TF

from ..checkpoints import resolve_checkpoint
from ..errors import ModelLoadError
from ..images import _NATIVE_MODES, Preprocess, _to_rgb
from ..registry import Expert, ExpertConfig, register_expert

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "HPS_v2.1_compressed.pt"
V2_FILE = "HPS_v2_compressed.pt"  # v2.0: the same format, taken from a folder that lacks v2.1
VISION_HEAD_WIDTH, TEXT_HEAD_WIDTH = 80, 64  # ViT-H-14's; not recorded in the file
VIT_H_14 = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
TINY_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 160, "head_width": 80, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


def model_cfg(sd: dict[str, torch.Tensor]) -> dict:
    """open_clip's CLIP config for a state dict in open_clip's layout (HPSv2's files)."""
    def count(prefix: str) -> int:
        return len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

    try:
        conv, tok = sd["visual.conv1.weight"], sd["token_embedding.weight"]
        width, text_width = conv.shape[0], tok.shape[1]
        return {
            "embed_dim": sd["text_projection"].shape[1],
            "vision_cfg": {
                "image_size": math.isqrt(sd["visual.positional_embedding"].shape[0] - 1) * conv.shape[-1],
                "layers": count("visual.transformer.resblocks."), "width": width,
                "head_width": VISION_HEAD_WIDTH, "patch_size": conv.shape[-1],
                "mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            },
            "text_cfg": {
                "context_length": sd["positional_embedding"].shape[0], "vocab_size": tok.shape[0], "width": text_width,
                "heads": max(1, text_width // TEXT_HEAD_WIDTH), "layers": count("transformer.resblocks."),
                "mlp_ratio": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
            },
        }
    except KeyError as e:
        raise ModelLoadError(f"not an HPSv2 checkpoint (open_clip CLIP state dict): missing tensor {e}") from None


def build_model(cfg: dict):
    from open_clip.model import CLIP

    return CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=False)


def build_tiny(out: Path) -> None:
    """A tiny open_clip CLIP saved as HPSv2 releases its checkpoints: {'state_dict': ...}."""
    torch.manual_seed(11)
    model = build_model(TINY_CFG)
    with torch.no_grad():  # random projections give nearly equal embeddings: spread them so scores differ
        model.visual.proj.mul_(8.0)
        model.text_projection.mul_(8.0)
    torch.save({"state_dict": model.state_dict()}, out / CHECKPOINT_FILE)


@dataclass(frozen=True)
class HPSPreprocess(Preprocess):
    """HPSv2's `preprocess_val`: ToTensor, then letterbox (long side to `size`, zero padding) and
    normalise, on the float tensor."""

    def pil(self, images: list) -> torch.Tensor:
        # convert("RGB") drops an RGBA image's alpha without compositing, as HPSv2's normalisation of
        # the first three channels does (the reference itself fails on RGBA: 4 channels reach its conv)
        return torch.cat([self.tensor(TF.to_tensor((im if im.mode in _NATIVE_MODES else _to_rgb(im)).convert("RGB"))[None])
                          for im in images])

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.size / max(h, w)
        x = images
        if scale != 1.0:  # HPSv2 rounds both sides and resizes the float tensor (no clamp)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
            x = TF.resize(x, [h, w], TF.InterpolationMode.BICUBIC, antialias=True)
        # zeros, black before normalising (HPSv2 pads only when it resized, so an image whose long side is
        # already 224 reaches its model non-square and fails; we pad it like every other image)
        ph, pw = self.size - h, self.size - w
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return TF.normalize(x, list(self.mean), list(self.std))


class HPSv2Config(ExpertConfig):
    checkpoint: str = Field(
        f"xswu/HPSv2/{CHECKPOINT_FILE}",
        description=f"HPSv2 checkpoint ({CHECKPOINT_FILE} or {V2_FILE}): hub file, local file or directory, 'tiny' or 'random'.",
    )


@register_expert
class HPSv2Expert(Expert):
    """cos(image, text), about 0.2..0.35 with the released weights.

    Default normalisation: mean 0.27, the level of recent models in the published HPS v2 benchmark
    (model averages 0.2355..0.2786, Stable Diffusion v1.4 0.2695); std 0.01, the model's logit unit
    (it is trained with CLIP's logit scale of 100, so 0.01 of cosine is 1 logit of preference)."""

    name = "hpsv2"
    Config = HPSv2Config
    default_mean = 0.27
    default_std = 0.01
    build_tiny = staticmethod(build_tiny)

    def __init__(self, model, tokenizer, preprocess, checkpoint: str, random_weights: bool):
        super().__init__(preprocess, checkpoint, random_weights)
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg: HPSv2Config, ctx) -> "HPSv2Expert":
        from open_clip.tokenizer import SimpleTokenizer

        spec = cfg.checkpoint
        if Path(spec).expanduser().is_dir() and not (Path(spec).expanduser() / CHECKPOINT_FILE).is_file():
            spec = str(Path(spec).expanduser() / V2_FILE)  # a folder holding only the v2.0 file
        ckpt = resolve_checkpoint(spec, CHECKPOINT_FILE, "HPSv2 checkpoint", ctx.tiny_source(cls))
        if ckpt.path is None:
            torch.manual_seed(ctx.seed + 4)
            model = build_model(VIT_H_14)
        else:
            try:
                obj = torch.load(ckpt.path, map_location="cpu", weights_only=True)  # read whole: the weights are assigned, not copied
            except Exception as e:
                raise ModelLoadError(f"cannot read HPSv2 checkpoint {ckpt.path}: {e}") from None
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
            cfg_ = model_cfg(sd)
            with torch.device("meta"):  # no random init of a billion weights that the file replaces
                model = build_model(cfg_)
            try:
                model.load_state_dict(sd, assign=True)  # strict: every released tensor, nothing missing
            except RuntimeError as e:
                raise ModelLoadError(f"HPSv2 checkpoint {ckpt.path} does not match open_clip's CLIP: {e}") from None
            n = cfg_["text_cfg"]["context_length"]
            model.attn_mask = torch.full((n, n), float("-inf")).triu_(1)  # the one buffer not in the file: causal mask
            if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
                raise ModelLoadError(f"HPSv2 checkpoint {ckpt.path}: open_clip's CLIP has tensors the file lacks")
        if ckpt.random_weights:
            log.warning("hpsv2 expert has RANDOM weights (%s)", cfg.checkpoint)
        model.eval().requires_grad_(False).to(device=ctx.device, dtype=ctx.dtype)
        tokenizer = SimpleTokenizer(context_length=model.context_length)  # truncates, keeping the end token last
        return cls(model, tokenizer, HPSPreprocess(model.visual.image_size[0]), cfg.checkpoint, ckpt.random_weights)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        img = self.model.encode_image(pixels.to(dtype))
        # one text pass per distinct prompt; in the batch-invariant mode one per pair, a fixed shape
        unique = list(prompts) if self.batch_invariant else list(dict.fromkeys(prompts))
        txt = self.model.encode_text(self.tokenizer(unique).to(pixels.device))
        if not self.batch_invariant:
            txt = txt[torch.tensor([unique.index(p) for p in prompts], device=txt.device)]
        return (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)

"""PickScore v1 (Kirstain et al. 2023, `yuvalkirstain/PickScore_v1`): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic.

Loaded as released: a transformers `CLIPModel` folder (`config.json` + `model.safetensors` or
`pytorch_model.bin`), scored with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` as the
model card does. Preprocessing is the processor's own image processor (RGB with transparency composited
on white, short side to 224 bicubic, center crop, CLIP mean/std), tokenisation its CLIP tokenizer
truncated at 77 tokens. Score = logit_scale.exp() * cos(image, text), in float32 (about 100 x cosine).
It has its own backbone: nothing is shared with the open_clip experts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torchvision.transforms import functional as TF

from ..checkpoints import TINY, resolve_checkpoint
from ..errors import ModelLoadError
from ..images import _NATIVE_MODES, Preprocess, _to_rgb
from ..registry import Expert, ExpertConfig, register_expert

log = logging.getLogger(__name__)

DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_TOKENS = 77
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# The released architecture (ViT-H/14 vision tower, 24-layer 1024-wide text tower), for `random`.
VIT_H = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)
TINY_CLIP = dict(
    text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407),
    vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2,
                       image_size=224, patch_size=32, hidden_act="gelu"),
    projection_dim=32,
)


def write_clip_processor(out: Path) -> None:
    """The processor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: CLIP's byte-level BPE (vocab.json +
    merges.txt, from open_clip's packaged vocabulary) and CLIP's image preprocessing settings."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    # open_clip names the two special tokens <start_of_text>/<end_of_text>; CLIP's released vocab.json
    # (and transformers' CLIPTokenizer) use <|startoftext|>/<|endoftext|> for the same ids 49406/49407
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(t, t): i for t, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, "do_lower_case": True, **special}))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2))


def build_tiny(out: Path) -> None:
    """A tiny CLIPModel in the released transformers layout, plus the (real) processor files beside it."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(7)
    model = CLIPModel(CLIPConfig(**TINY_CLIP)).eval()
    with torch.no_grad():  # random projections give nearly equal embeddings: spread them so scores differ
        model.visual_projection.weight.mul_(8.0)
        model.text_projection.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    write_clip_processor(out)


def resolve_folder(spec: str, files: tuple[str, ...], what: str, tiny, optional: tuple[str, ...] = ()) -> Optional[Path]:
    """The local folder holding `files` for a checkpoint spec (None for `random`): a folder, a file in it,
    `tiny`, or a hub repo (each file fetched through `resolve_checkpoint`, into one snapshot folder).
    Of `optional`, the first that exists is required (e.g. safetensors or .bin weights)."""
    first = resolve_checkpoint(spec, files[0], what, tiny)
    if first.path is None:
        return None
    folder = first.path.parent
    local = spec == TINY or Path(spec).expanduser().exists()
    prefix = spec if spec.count("/") == 1 else spec.rsplit("/", 1)[0]  # org/repo, or org/repo/sub for a file spec
    for group in [(f,) for f in files[1:]] + ([optional] if optional else []):
        for i, name in enumerate(group):
            if local and (folder / name).is_file():
                break
            if not local:
                try:
                    resolve_checkpoint(f"{prefix}/{name}", name, what)
                    break
                except ModelLoadError:
                    if i == len(group) - 1:
                        raise
        else:
            raise ModelLoadError(f"{what}: {folder} has no {' or '.join(group)}")
    return folder


@dataclass(frozen=True, eq=False)
class ProcessorPreprocess(Preprocess):
    """The processor's own image pipeline; one object per loaded expert (identity hash: the mixture
    preprocesses once per object)."""

    processor: Any = field(default=None, repr=False)

    def pil(self, images: list) -> torch.Tensor:
        images = [im if im.mode in _NATIVE_MODES else _to_rgb(im) for im in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"].float()

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable: short side to `size` (bicubic, antialiased; clamped as the processor's uint8
        pixels are), the processor's center crop (offsets rounded down), normalise."""
        h, w = images.shape[-2:]
        new = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
        x = TF.resize(images, list(new), TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        top, left = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        x = x[:, :, top : top + self.size, left : left + self.size]
        return TF.normalize(x, list(self.mean), list(self.std))


class PickScoreConfig(ExpertConfig):
    checkpoint: str = Field("yuvalkirstain/PickScore_v1", description="CLIPModel folder (config.json + model.safetensors), a file in it, a hub repo, 'tiny' or 'random'.")
    logit_scale: bool = Field(True, description="Multiply the cosine by the model's logit_scale.exp() (the model card's score); False: the raw cosine, as ig-rewarding computes PickScore.")
    processor: Optional[str] = Field(None, description=f"Processor folder or hub repo (preprocessor_config.json + CLIP tokenizer files); default {DEFAULT_PROCESSOR}, or 'tiny' (the same settings and vocabulary, offline) when checkpoint is 'tiny'.")


@register_expert
class PickScoreExpert(Expert):
    """logit_scale.exp() * cosine: about 100 x cos with the released weights.

    Default normalisation: std 1.0, the model's own logit unit (it was trained with a softmax over these
    scores, so a difference of 1 is e:1 odds of being preferred); mean 21.0, the level that papers report
    for Stable Diffusion 1.5 / SDXL images (about 20.5..22)."""

    name = "pickscore"
    Config = PickScoreConfig
    default_mean = 21.0
    default_std = 1.0
    build_tiny = staticmethod(build_tiny)

    def __init__(self, model, tokenizer, logit_scale: float, preprocess, checkpoint: str, random_weights: bool):
        super().__init__(preprocess, checkpoint, random_weights)
        self.model = model
        self.tokenizer = tokenizer
        self.logit_scale = logit_scale  # exp(logit_scale) as a Python float, or 1.0 for the raw cosine

    @classmethod
    def from_config(cls, cfg: PickScoreConfig, ctx) -> "PickScoreExpert":
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        tiny = ctx.tiny_source(cls)
        folder = resolve_folder(cfg.checkpoint, ("config.json",), "PickScore checkpoint", tiny, optional=WEIGHT_FILES)
        processor_spec = cfg.processor or (TINY if cfg.checkpoint == TINY else DEFAULT_PROCESSOR)
        proc_folder = resolve_folder(processor_spec, PROCESSOR_FILES, "PickScore processor", tiny)
        if proc_folder is None:
            raise ModelLoadError(f"PickScore processor: {processor_spec!r} names no files; give a folder, a hub repo or 'tiny'")
        try:
            processor = AutoProcessor.from_pretrained(proc_folder)
            if folder is None:
                torch.manual_seed(ctx.seed + 3)
                model = CLIPModel(CLIPConfig(**VIT_H))
            else:
                model = CLIPModel.from_pretrained(folder, dtype=torch.float32)
        except Exception as e:
            raise ModelLoadError(f"cannot load PickScore from {cfg.checkpoint!r} / processor {processor_spec!r}: {type(e).__name__}: {e}") from None
        random_weights = folder is None or cfg.checkpoint == TINY
        if random_weights:
            log.warning("pickscore expert has RANDOM weights (%s)", cfg.checkpoint)
        # read before a bfloat16 cast rounds it (by ~1%); 1.0 gives the raw cosine
        scale = float(model.logit_scale.detach().float().exp()) if cfg.logit_scale else 1.0
        model.eval().requires_grad_(False).to(device=ctx.device, dtype=ctx.dtype)
        ip = processor.image_processor
        crop = ip.crop_size["height"] if isinstance(ip.crop_size, dict) else ip.crop_size.height
        preprocess = ProcessorPreprocess(int(crop), tuple(ip.image_mean), tuple(ip.image_std), processor=ip)
        return cls(model, processor.tokenizer, scale, preprocess, cfg.checkpoint, random_weights)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor:
        dtype = self.model.dtype
        img = self.model.visual_projection(self.model.vision_model(pixel_values=pixels.to(dtype)).pooler_output)
        # one text pass per distinct prompt, padded to the longest; in the batch-invariant mode one per pair,
        # padded to MAX_TOKENS: a shape the neighbours cannot change (rewarders/invariance.py)
        unique = list(prompts) if self.batch_invariant else list(dict.fromkeys(prompts))
        padding = "max_length" if self.batch_invariant else True
        tok = self.tokenizer(unique, padding=padding, truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(pixels.device)
        txt = self.model.text_projection(self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output)
        if not self.batch_invariant:
            txt = txt[torch.tensor([unique.index(p) for p in prompts], device=txt.device)]
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        return self.logit_scale * (img * txt).sum(-1)

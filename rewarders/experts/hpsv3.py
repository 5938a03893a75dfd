"""HPSv3 (Ma et al., ICCV 2025, hub repo `MizzenAI/HPSv3`): Qwen2-VL-7B-Instruct with a reward head on the
hidden state of a special `<|Reward|>` token, trained on HPD v3 with an uncertainty-aware ranking loss.

Loaded as released: one `HPSv3.safetensors` holding the whole model as the `hpsv3` package saves it, in the
key layout of transformers 4.45's `Qwen2VLForConditionalGeneration` (`visual.*`, `model.*` for the decoder,
`lm_head.weight`) plus `rm_head.*` (Linear(hidden, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2));
its embedding has one row per token of the base tokenizer plus `<|Reward|>`. The architecture's sizes come from
the base model's `config.json` and the file's shapes; tokenizer, chat template and image settings from the base
(`Qwen/Qwen2-VL-7B-Instruct`). We build transformers' own Qwen2-VL vision tower and decoder; `lm_head` is not
needed for a reward and is not loaded.

What the `hpsv3` package (1.0.0, `HPSv3RewardInferencer.reward`) does, and so do we:
- the image converted to RGB (an RGBA image's alpha is dropped, not composited), resized with PIL's bicubic
  filter to the pixel budget (`smart_resize` with min = max = 256 x 28 x 28: the aspect ratio kept, both sides
  multiples of 28), then rescaled to [0, 1] and normalised with CLIP's mean and std; cut into Qwen2-VL's
  14 x 14 patches (each duplicated in time), 2 x 2 of them merged into one image token;
- the prompt put into HPSv3's instruction, followed by "Please provide the overall ratings of this image:
  <|Reward|>", as the user turn of the base's chat template (system prompt, image first, generation prompt);
- positions: the package calls the decoder without Qwen2-VL's multimodal rope indices, so every token,
  image tokens included, has its plain index as its position in all three rope sections;
- score = mu, the first of the head's two outputs at the `<|Reward|>` token (the mean of the predicted
  preference distribution); the second is log sigma (the training loss takes exp), reported as the extra
  "sigma" = exp(second output). The head runs in float32 whatever the backbone's dtype.

HPSv3 sees the whole image at its own aspect ratio, not a square crop. The mixture hands every expert a
square tensor per image, so `HPSv3Preprocess` packs the resized image losslessly into one: its 28 x 28 blocks
(one image token each) in raster order on a square canvas of such blocks, the last block holding the block
grid's height and width. `forward` unpacks it into patches and `grid_thw`. Square and non-square images are
scored exactly as the package scores them; only the canvas's size (a side of 28 x ceil(sqrt(blocks + 1))) is
what the mixture allocates.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, model_validator
from torch import nn
from torchvision.transforms import functional as TF

from ..checkpoints import TINY, resolve_checkpoint
from ..errors import InvalidImageError, InvalidRequestError, ModelLoadError
from ..images import CLIP_MEAN, CLIP_STD, _NATIVE_MODES, Preprocess, _to_rgb
from ..registry import Expert, ExpertConfig, ExpertOutput, register_expert

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "HPSv3.safetensors"
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
BASE_FOLDER = "base"  # the tiny model's stand-in for the base repo, beside its HPSv3.safetensors
PIXELS = 256 * 28 * 28  # HPSv3's pixel budget (min and max): 448 x 448 for a square image
BLOCK = 28  # patch_size 14 x merge_size 2: the pixels of one image token
MAX_RATIO = 200  # qwen-vl-utils' smart_resize refuses longer images
REWARD_TOKEN = "<|Reward|>"

# HPSv3's prompt (hpsv3/dataset/data_collator_qwen.py), to the character: the model was trained on it
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
RATING = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


# ----------------------------------------------------------------------------------------------
# the image: HPSv3's resize, packed into a square canvas of 28 x 28 blocks

def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' rule as HPSv3 vendors it: (height, width) as multiples of 28, the aspect ratio kept and the
    area brought within [min_pixels, max_pixels] (from below it may overshoot by less than a block per side)."""
    if max(height, width) > MAX_RATIO * min(height, width):
        raise InvalidImageError(f"hpsv3: a {width}x{height} image is longer than {MAX_RATIO}:1, which HPSv3 cannot read")
    h = max(BLOCK, round(height / BLOCK) * BLOCK)
    w = max(BLOCK, round(width / BLOCK) * BLOCK)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / BLOCK) * BLOCK, math.floor(width / beta / BLOCK) * BLOCK
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / BLOCK) * BLOCK, math.ceil(width * beta / BLOCK) * BLOCK
    return h, w


def max_blocks(min_pixels: int, max_pixels: int) -> int:
    """The most 28 x 28 blocks `smart_resize` can give: max_pixels / 784 when shrinking, and when growing a
    MAX_RATIO:1 strip (each side overshoots by under a block, most at the longest allowed aspect ratio)."""
    grow = (math.sqrt(min_pixels / MAX_RATIO) + BLOCK) * (math.sqrt(min_pixels * MAX_RATIO) + BLOCK)
    return max(max_pixels // BLOCK**2, math.ceil(grow / BLOCK**2))


@dataclass(frozen=True)
class HPSv3Preprocess(Preprocess):
    """HPSv3's image input, packed square: `size` is the canvas side (28 x blocks per side)."""

    min_pixels: int = PIXELS
    max_pixels: int = PIXELS

    @property
    def side(self) -> int:
        return self.size // BLOCK  # blocks per canvas side

    def pil(self, images: list) -> torch.Tensor:
        out = []
        for im in images:
            im = im.convert("RGB") if im.mode in _NATIVE_MODES else _to_rgb(im)  # alpha dropped, as HPSv3 does
            h, w = smart_resize(im.height, im.width, self.min_pixels, self.max_pixels)
            x = TF.to_tensor(im.resize((w, h), Image.BICUBIC))  # PIL's bicubic in 8 bits, as HPSv3's fetch_image
            out.append(self._pack(self._normalise(x[None])))
        return torch.cat(out)

    # `tensor` (differentiable, torch's antialiased bicubic standing in for PIL's) and `uint8` (resized in 8 bits)
    # are the base's steps: check, resize (HPSv3's own rule, below), clamp, no crop, normalise, then pack.

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = smart_resize(x.shape[-2], x.shape[-1], self.min_pixels, self.max_pixels)
        if (h, w) == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        return x  # HPSv3 sees the whole resized image, at its own aspect ratio: `_pack` makes it square

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 28a, 28b) -> (B, 3, size, size): the a x b blocks in raster order, then zeros, then (a, b)."""
        n, _, h, w = x.shape
        a, b = h // BLOCK, w // BLOCK
        slots = self.side**2
        if a * b > slots - 1:  # max_blocks makes this unreachable; a clear error beats a silent overflow
            raise InvalidImageError(f"hpsv3: {a * b} image tokens do not fit the canvas of {slots - 1}")
        blocks = x.reshape(n, 3, a, BLOCK, b, BLOCK).permute(0, 2, 4, 1, 3, 5).reshape(n, a * b, 3, BLOCK, BLOCK)
        header = torch.zeros(n, 1, 3, BLOCK, BLOCK, dtype=x.dtype, device=x.device)
        header[:, :, 0], header[:, :, 1] = a, b
        pad = torch.zeros(n, slots - 1 - a * b, 3, BLOCK, BLOCK, dtype=x.dtype, device=x.device)
        canvas = torch.cat([blocks, pad, header], 1).reshape(n, self.side, self.side, 3, BLOCK, BLOCK)
        return canvas.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, self.size, self.size)

    def unpack(self, canvas: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """(B, 3, size, size) -> each image's blocks (a*b, 3, 28, 28) in raster order, and its (a, b)."""
        n = canvas.shape[0]
        if canvas.shape[1:] != (3, self.size, self.size):
            raise InvalidImageError(f"hpsv3: expected its packed input (B, 3, {self.size}, {self.size}), got {tuple(canvas.shape)}")
        slots = canvas.reshape(n, 3, self.side, BLOCK, self.side, BLOCK).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, 3, BLOCK, BLOCK)
        head = slots[:, -1, :2, 0, 0].detach().round().long().tolist()  # the header block: (a, b)
        grids = [(a, b) for a, b in head]
        for a, b in grids:
            if not (1 <= a and 1 <= b and a * b <= self.side**2 - 1):
                raise InvalidImageError(f"hpsv3: not a packed HPSv3 input (block grid {a}x{b})")
        return [s[: a * b] for s, (a, b) in zip(slots, grids)], grids


def patches(blocks: torch.Tensor, temporal: int = 2) -> torch.Tensor:
    """One image's blocks (a*b, 3, 28, 28) -> Qwen2-VL's patch rows (4ab, 3 * temporal * 14 * 14): the 2 x 2
    patches of each block in raster order, each patch's channels, its frames (the image repeated) and pixels,
    as Qwen2VLImageProcessor lays them out."""
    n = blocks.shape[0]
    p = blocks.reshape(n, 3, 2, 14, 2, 14).permute(0, 2, 4, 1, 3, 5)  # (block, row, col, channel, y, x)
    p = p.unsqueeze(4).expand(n, 2, 2, 3, temporal, 14, 14)
    return p.reshape(n * 4, 3 * temporal * 14 * 14)


# ----------------------------------------------------------------------------------------------
# the model

def rm_head(hidden: int, sizes: tuple[int, int, int] = (1024, 16, 2)) -> nn.Sequential:
    """HPSv3's 'ranknet' head, with its module indices (the released keys are rm_head.0/3/5)."""
    return nn.Sequential(nn.Linear(hidden, sizes[0]), nn.ReLU(), nn.Dropout(0.05), nn.Linear(sizes[0], sizes[1]),
                         nn.ReLU(), nn.Linear(sizes[1], sizes[2]))


def qwen2vl_config(base_config: dict, vocab: Optional[int] = None):
    """transformers' Qwen2VLConfig from a base `config.json` (the hub's flat layout or transformers 5's)."""
    from transformers import Qwen2VLConfig

    cfg = dict(base_config)
    if vocab is not None:  # the released embedding: the base tokenizer plus <|Reward|>, fewer rows than the base's
        if "text_config" in cfg:
            cfg["text_config"] = {**cfg["text_config"], "vocab_size": vocab}
        cfg["vocab_size"] = vocab
    cfg.pop("architectures", None)
    config = Qwen2VLConfig(**cfg)
    config._attn_implementation = "sdpa"  # the package's choice without flash-attn
    for sub in (getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = "sdpa"
    return config


def map_key(key: str) -> Optional[str]:
    """A released key -> our module's (transformers 5's Qwen2VLModel under `model.`, the head under `head.`);
    None for lm_head, which a reward does not use."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key.removeprefix("model.")
    if key.startswith("rm_head."):
        return "head." + key.removeprefix("rm_head.")
    if key == "lm_head.weight":
        return None
    return key  # unknown: the strict load names it


def legacy_key(key: str) -> str:
    """The inverse of `map_key`: transformers 5's Qwen2-VL key (or our head's) -> the released name."""
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("head."):
        return "rm_head." + key.removeprefix("head.")
    return key


class HPSv3Model(nn.Module):
    """Qwen2-VL's vision tower and decoder (transformers' modules) and HPSv3's head."""

    def __init__(self, config, head_sizes=(1024, 16, 2)):
        super().__init__()
        from transformers import Qwen2VLModel

        self.model = Qwen2VLModel(config)
        self.head = rm_head(config.text_config.hidden_size, head_sizes)

    def load_released(self, sd: Mapping[str, torch.Tensor], where: str) -> None:
        mapped = {}
        for k, v in sd.items():
            m = map_key(k)
            if m is not None:
                mapped[m] = v
        missing, unexpected = self.load_state_dict(mapped, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        if missing or unexpected:
            raise ModelLoadError(f"HPSv3 checkpoint {where} does not match Qwen2-VL + HPSv3's head: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj.get("model", obj) if isinstance(obj, dict) else {}  # the package accepts {'model': sd} .pt files
    except Exception as e:
        raise ModelLoadError(f"cannot read HPSv3 checkpoint {path}: {e}") from None


# ----------------------------------------------------------------------------------------------
# the tiny model: a random Qwen2-VL in the released layout, with a tokenizer built here

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64)
# Qwen2-VL-7B-Instruct's config.json, less the sizes above
QWEN2VL_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN2VL_7B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=3584)
QWEN2VL_2B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN2VL_2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer split
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
# Qwen2-VL-Instruct's chat template
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_base(out: Path, text: dict, vision: dict, vocab_pad: int = 64) -> int:
    """A stand-in for the base repo (Qwen/Qwen2-VL-7B-Instruct) in its released file formats: `config.json`
    (the hub's flat layout) with the given sizes, a byte-level BPE `tokenizer.json` with Qwen2's pre-tokenizer
    and special tokens (trained here on HPSv3's prompt), `tokenizer_config.json`, `preprocessor_config.json`
    and `chat_template.json`. Returns the tokenizer's length."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [INSTRUCTION, RATING, "a red apple on a wooden table", "a blue car at night", "You are a helpful assistant."] * 5
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    n = tok.get_vocab_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "padding_side": "left",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
        "errors": "replace", "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                                      "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
        "added_tokens_decoder": {str(ids[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True} for s in SPECIALS},
        "chat_template": CHAT_TEMPLATE}, indent=1))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, indent=1))
    vocab = -(-n // vocab_pad) * vocab_pad  # the base's embedding is padded past the tokenizer (152064 in the 7B)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_act": "silu",
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "initializer_range": 0.02, "max_position_embeddings": 32768,
        "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False,
        "vocab_size": vocab, **text,
        "vision_config": {"in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, **vision},
    }, indent=1))
    return n


def build_tiny(out: Path) -> None:
    """A tiny random HPSv3: `HPSv3.safetensors` in the released layout and, in `base/`, the base repo's files
    (config, tokenizer, processor, chat template) with the base model's own random weights (`model.safetensors`,
    what `from_pretrained` of the base reads before HPSv3's file replaces every tensor)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    base = out / BASE_FOLDER
    n = write_base(base, TINY_TEXT, TINY_VISION)
    torch.manual_seed(13)
    config = qwen2vl_config(json.loads((base / "config.json").read_text()))
    full = Qwen2VLForConditionalGeneration(config).eval()
    save_file({legacy_key(k): v.contiguous() for k, v in full.state_dict().items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    # HPSv3: the embedding cut to the tokenizer plus <|Reward|> (resize_token_embeddings), a random head
    model = HPSv3Model(qwen2vl_config(json.loads((base / "config.json").read_text()), vocab=n + 1))
    with torch.no_grad():  # random weights give nearly equal hidden states: spread them so scores differ
        for p in model.head.parameters():
            p.normal_(0, 0.2)
    sd = {legacy_key(k): v for k, v in model.state_dict().items()}  # as the package saves them
    sd["lm_head.weight"] = torch.randn(n + 1, TINY_TEXT["hidden_size"]) * 0.02
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / CHECKPOINT_FILE), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# the expert

class HPSv3Config(ExpertConfig):
    checkpoint: str = Field(
        f"MizzenAI/HPSv3/{CHECKPOINT_FILE}",
        description=f"HPSv3 checkpoint ({CHECKPOINT_FILE}, or a .pt state dict): hub file, local file or directory, "
                    "'tiny' or 'random' (the base's architecture, random weights).",
    )
    base: str = Field(
        DEFAULT_BASE,
        description="The Qwen2-VL base whose config.json, tokenizer, chat template and image settings HPSv3 uses: a hub "
                    "repo id or a local folder (with checkpoint 'tiny': the tiny model's own, whatever this says).",
    )
    min_pixels: int = Field(PIXELS, ge=4 * BLOCK**2, description="Pixel budget's lower bound: smaller images are enlarged "
                                                                 "(HPSv3: 256 x 28 x 28).")
    max_pixels: int = Field(PIXELS, ge=4 * BLOCK**2, le=4096 * BLOCK**2,
                            description="Pixel budget's upper bound: larger images are shrunk (HPSv3: 256 x 28 x 28).")
    dtype: Optional[str] = Field(None, description="This expert's backbone dtype ('float32', 'bfloat16', 'float16'); "
                                                   "None: the rewarder's. The head always runs in float32.")

    @model_validator(mode="after")
    def _budget(self):
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is above max_pixels ({self.max_pixels})")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        return self


@register_expert
class HPSv3Expert(Expert):
    """mu of HPSv3's predicted preference: about -5..15 with the released weights (the paper's benchmark puts
    recent models' average at 8.5..11); the spread sigma is the extra "hpsv3.sigma"."""

    name = "hpsv3"
    Config = HPSv3Config
    default_mean = 10.0
    default_std = 2.0
    build_tiny = staticmethod(build_tiny)
    extras = ("sigma",)
    # the batch-invariant mode: a batch's sequences are right-padded to its longest (their length follows the
    # image's aspect and the prompt) and its images' patches run as one sequence, so there each pair runs alone
    per_pair = True

    def __init__(self, model: HPSv3Model, tokenizer, chat_template: str, preprocess: HPSv3Preprocess,
                 checkpoint: str, random_weights: bool):
        super().__init__(preprocess, checkpoint, random_weights)
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_id = model.model.config.image_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.specials = [t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t]
        self._ids: dict[tuple[str, int], list[int]] = {}

    @classmethod
    def from_config(cls, cfg: HPSv3Config, ctx) -> "HPSv3Expert":
        ckpt = resolve_checkpoint(cfg.checkpoint, CHECKPOINT_FILE, "HPSv3 checkpoint", ctx.tiny_source(cls))
        base = cfg.base
        if cfg.checkpoint == TINY:
            base = str(ckpt.path.parent / BASE_FOLDER)
        tokenizer, chat_template, base_config = cls._base(base)
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as the package does
        if ckpt.path is None:
            torch.manual_seed(ctx.seed + 9)
            model = HPSv3Model(qwen2vl_config(base_config, vocab=len(tokenizer)))
        else:
            sd = _read_state_dict(ckpt.path)
            try:
                vocab, hidden = sd["model.embed_tokens.weight"].shape
                head = (sd["rm_head.0.weight"].shape[0], sd["rm_head.3.weight"].shape[0], sd["rm_head.5.weight"].shape[0])
            except KeyError as e:
                raise ModelLoadError(f"not an HPSv3 checkpoint ({ckpt.path}): missing tensor {e}") from None
            if vocab != len(tokenizer):
                raise ModelLoadError(f"HPSv3 checkpoint {ckpt.path} has {vocab} token embeddings; the base {base}'s "
                                     f"tokenizer with {REWARD_TOKEN} has {len(tokenizer)}")
            with torch.device("meta"):  # no random init of billions of weights that the file replaces
                model = HPSv3Model(qwen2vl_config(base_config, vocab=vocab), head)
            model.load_released(sd, str(ckpt.path))
            _rebuild_buffers(model)
            if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
                raise ModelLoadError(f"HPSv3 checkpoint {ckpt.path}: the model has tensors the file lacks")
        if ckpt.random_weights:
            log.warning("hpsv3 expert has RANDOM weights (%s)", cfg.checkpoint)
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else ctx.dtype
        model.eval().requires_grad_(False).to(device=ctx.device, dtype=dtype)
        model.head.float()  # the package keeps rm_head in float32
        size = BLOCK * math.ceil(math.sqrt(max_blocks(cfg.min_pixels, cfg.max_pixels) + 1))
        pre = HPSv3Preprocess(size, CLIP_MEAN, CLIP_STD, cfg.min_pixels, cfg.max_pixels)
        return cls(model, tokenizer, chat_template, pre, cfg.checkpoint, ckpt.random_weights)

    @staticmethod
    def _base(base: str):
        """The base's tokenizer, chat template and config.json (a local folder or a hub repo)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(base)
            folder = Path(base).expanduser()
            if folder.is_dir():
                config = json.loads((folder / "config.json").read_text())
                template_file = folder / "chat_template.json"
            else:
                from huggingface_hub import hf_hub_download

                config = json.loads(Path(hf_hub_download(base, "config.json")).read_text())
                template_file = Path(hf_hub_download(base, "chat_template.json"))
            # the processor's template (chat_template.json) is the one the package's processor applies
            template = json.loads(template_file.read_text())["chat_template"] if template_file.is_file() else tokenizer.chat_template
        except Exception as e:
            raise ModelLoadError(f"HPSv3 base {base!r}: cannot load its tokenizer, config or chat template "
                                 f"({type(e).__name__}: {e})") from None
        if not template:
            raise ModelLoadError(f"HPSv3 base {base!r} has no chat template")
        return tokenizer, template, config

    def check_pair(self, prompt: str, metadata: Mapping[str, Any]) -> None:
        # a special token in the prompt would become one: a second <|Reward|> or stray image tokens
        for t in self.specials:
            if t in prompt:
                raise InvalidRequestError(f"hpsv3: the prompt may not contain the special token {t!r}")

    def input_ids(self, prompt: str, image_tokens: int) -> list[int]:
        """The package's text: its chat message rendered by the base's template, the image pad repeated once per
        image token (as Qwen2VLProcessor expands it), tokenized."""
        key = (prompt, image_tokens)
        if key not in self._ids:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + RATING}]}]
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens, 1)
            ids = self.tokenizer(text)["input_ids"]
            if ids.count(self.reward_id) != 1 or ids.count(self.image_id) != image_tokens:
                raise InvalidRequestError("hpsv3: the prompt does not tokenize to one reward token and the image's tokens")
            if len(self._ids) > 4096:
                self._ids.clear()
            self._ids[key] = ids
        return self._ids[key]

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None, **kwargs) -> ExpertOutput:
        if self.batch_invariant:  # one pair at a time: its shapes are its own (`per_pair`)
            mu, log_sigma = (torch.cat(t) for t in zip(*(self.predict(pixels[i : i + 1], prompts[i : i + 1]) for i in range(len(prompts)))))
        else:
            mu, log_sigma = self.predict(pixels, prompts)
        return ExpertOutput(mu, extras={"sigma": log_sigma.exp()})

    def predict(self, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma) per image, float32; differentiable in `pixels`."""
        blocks, grids = self.preprocess.unpack(pixels)
        vision = self.model.model.visual
        dtype, device = vision.get_dtype(), vision.get_device()
        temporal = vision.config.temporal_patch_size
        values = torch.cat([patches(b, temporal) for b in blocks]).to(device=device, dtype=dtype)
        grid_thw = torch.tensor([[1, 2 * a, 2 * b] for a, b in grids], device=device)
        image = vision(values, grid_thw=grid_thw).pooler_output  # one row per image token, images in order

        rows = [self.input_ids(p, a * b) for p, (a, b) in zip(prompts, grids)]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding, as the package's processor
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        text = self.model.model.language_model
        embeds = text.embed_tokens(ids)
        embeds = embeds.masked_scatter((ids == self.image_id).unsqueeze(-1).expand_as(embeds), image.to(embeds.dtype))
        positions = torch.arange(length, device=device).expand(len(rows), length)  # the package's plain positions
        hidden = text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        at = torch.tensor([r.index(self.reward_id) for r in rows], device=device)
        out = self.model.head(hidden[torch.arange(len(rows), device=device), at].float())
        return out[:, 0], out[:, 1]


def _rebuild_buffers(model: nn.Module) -> None:
    """The buffers that checkpoints do not hold (the rope tables), made anew on the CPU by their module's init."""
    for m in model.modules():
        if any(b.is_meta for b in m.buffers(recurse=False)):
            fresh = type(m)(m.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(m, name, buf)

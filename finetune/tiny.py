"""Tiny random diffusers pipelines in the real layouts, built on first use: `tiny` (SD 1.x),
`tiny-sdxl` (SDXL) and `tiny-sd3` (SD3, flow matching).

Each loads with its pipeline class's `from_pretrained(dir)` like any published one (the component folders
and model_index.json that `save_pretrained` writes), so jobs, LoRA saving and `load_lora_weights` run
through exactly the code that full-size models use, on a CPU in seconds. The CLIP tokenizers use CLIP's
real BPE vocabulary, written from the copy the open_clip package ships. SD3's T5 tokenizer is a T5
tokenizer (sentencepiece-style Unigram, `T5TokenizerFast`) whose pieces are taken from that same CLIP
vocabulary: no T5 sentencepiece model is packaged offline (nor is sentencepiece installed), and
transformers builds a T5 tokenizer from a list of (piece, score) pairs without one.
Each is built into a temporary folder and renamed into place (`t2i_reward.rewarders.tiny.build_once`), once.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import torch

TINY_SD_VERSION = "2"
TINY_SDXL_VERSION = "2"
TINY_SD3_VERSION = "2"
# TINY_VAE_GROUPS: the tiny VAEs normalise with one group (version 2). With a group per channel, as a random
# decoder with SD's 32 groups has, every GroupNorm removes each channel's mean, so an image's colours barely
# depend on its latents (a colour reward moved by 0.001 whatever the sample) and no job could show learning;
# with one group, shifting a latent channel by 1 moves the mean redness by about 0.03.


def ensure_tiny_sd(cache_dir: str | Path) -> Path:
    from t2i_reward.rewarders.tiny import build_once

    return build_once(Path(cache_dir) / f"tiny-sd-v{TINY_SD_VERSION}", "model_index.json", _build)


def ensure_tiny_sdxl(cache_dir: str | Path) -> Path:
    from t2i_reward.rewarders.tiny import build_once

    return build_once(Path(cache_dir) / f"tiny-sdxl-v{TINY_SDXL_VERSION}", "model_index.json", _build_sdxl)


def ensure_tiny_sd3(cache_dir: str | Path) -> Path:
    from t2i_reward.rewarders.tiny import build_once

    return build_once(Path(cache_dir) / f"tiny-sd3-v{TINY_SD3_VERSION}", "model_index.json", _build_sd3)


def clip_tokenizer_files(out: Path) -> None:
    """vocab.json and merges.txt of CLIP's BPE tokenizer, from open_clip's packaged merges file."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _build(out: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=1,  # see TINY_VAE_GROUPS
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    )
    tok_dir = out / ".tokenizer-src"
    clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir)


def _clip_text_config(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=projection or hidden, vocab_size=49408, max_position_embeddings=77,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _clip_tokenizers(tok_dir: Path):
    """The two CLIP tokenizers of SDXL and SD3: the same vocabulary; the second pads with '!' as theirs do."""
    from transformers import CLIPTokenizer

    clip_tokenizer_files(tok_dir)
    files = str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt")
    return CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, pad_token="!", model_max_length=77)


def t5_tokenizer(size: int = 16000):
    """A T5 tokenizer (Unigram over sentencepiece-style pieces: '▁' starts a word) whose pieces are
    CLIP's BPE tokens, most frequent merges first, as word starts and as continuations."""
    import math

    import open_clip
    from transformers import T5TokenizerFast

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    letters = [chr(c) for c in range(33, 127)]  # printable ASCII: every ASCII word has a segmentation
    tokens = letters + ["".join(m.split()).removesuffix("</w>") for m in merges]
    pieces: dict[str, float] = {}
    for rank, t in enumerate(tokens):
        for piece in ("\u2581" + t, t):
            if len(pieces) < size - 3 - 100:
                pieces.setdefault(piece, -math.log(rank + 2))
    pieces.setdefault("\u2581", -2.0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces.items()]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5TokenizerFast(vocab=vocab, extra_ids=100, model_max_length=256)


def _build_sdxl(out: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # as SDXL: text_time added conditioning (pooled text embeds of encoder 2 + 6 size/crop numbers), cross
    # attention on the two encoders' hidden states side by side (32 + 64), linear projections, no attention
    # in the first block, several transformer layers deeper down
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32 + 64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=1,  # see TINY_VAE_GROUPS
        sample_size=32,
        scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(_clip_text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(64, projection=32))
    tok_dir = out / ".tokenizer-src"
    tokenizer, tokenizer_2 = _clip_tokenizers(tok_dir)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir)


def _build_sd3(out: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    # as SD3: an MMDiT on 2x2 patches of 16 latent channels; its context is the two CLIP encoders'
    # penultimate hidden states (32 + 32) zero-padded to T5's width (96) followed by T5's; the pooled
    # projections of both CLIPs (32 + 32) condition the timestep embedding
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 32,
        pos_embed_max_size=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=16,
        norm_num_groups=1,  # see TINY_VAE_GROUPS
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32))
    tok_dir = out / ".tokenizer-src"
    tokenizer, tokenizer_2 = _clip_tokenizers(tok_dir)
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=96, d_kv=16, d_ff=128, num_layers=2,
                                             num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir)


TINY_PIPELINES = {"tiny": ensure_tiny_sd, "tiny-sdxl": ensure_tiny_sdxl, "tiny-sd3": ensure_tiny_sd3}
"""The built-in tiny pipelines by `base_model` name: each `builder(cache_dir)` returns the pipeline's folder."""

"""A tiny random-weight vision-language model in transformers' real LLaVA layout, built offline on first use.

`config.json`, `model.safetensors`, `generation_config.json`, `tokenizer.json` (+ config), the processor's
config and `chat_template.jinja`, as `save_pretrained` writes them: `AutoModelForImageTextToText` and
`AutoProcessor` load the folder, and `transformers serve <folder>` serves it over the OpenAI-compatible API
(and `/v1/systemone`), so the MLLM peer's code paths run against a real server in tests. The model is a
2-layer CLIP vision tower and a 2-layer Llama; the tokenizer is a byte-level BPE trained here on a few
sentences, with "Yes" and "No" single tokens (yes/no probabilities read one logit each). Its answers are
noise, but deterministic ones.
"""

from __future__ import annotations

from pathlib import Path

TINY_VLM_VERSION = "1"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<pad>"]

# ChatML; a message's content is a string or a list of {"type": "text" | "image"} parts
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_CORPUS = ["Yes", "No", "Answer Yes or No only.", "Does the image match the prompt?", "a photo of a cat on a sofa",
           "Rate how well the image matches the prompt from 0 to 10.", "0 1 2 3 4 5 6 7 8 9 10",
           "a red square on a white background", "In one line, why?", "system user assistant"] * 10


# the model's shape: `tiny` for tests; `2b` is real-size (a CLIP ViT-L/14-336 tower and a 1.7B Llama with
# Qwen2-VL-2B's vocabulary size: 2.0 B parameters) for the judge's GPU benchmark, random all the same
SHAPES = {
    "tiny": dict(image=56, vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                 vocab=None),
    "2b": dict(image=336, vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
               text=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4),
               vocab=151_936),
}


def ensure_tiny_vlm(cache_dir: str | Path) -> Path:
    return ensure_random_vlm(cache_dir, "tiny")


def ensure_random_vlm(cache_dir: str | Path, shape: str = "tiny") -> Path:
    """The random VLM of `shape` (see SHAPES), built once into `cache_dir`."""
    from .tiny import build_once

    name = f"tiny-vlm-v{TINY_VLM_VERSION}" if shape == "tiny" else f"random-vlm-{shape}-v{TINY_VLM_VERSION}"
    return build_once(Path(cache_dir) / name, "model.safetensors", lambda out: _build(out, shape))


def vlm_config(shape: str = "tiny"):
    """The LlavaConfig of `shape` and its tokenizer (the config alone builds the model on the meta device)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = _tokenizer()
    spec = SHAPES[shape]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=spec["image"], patch_size=14, **spec["vision"]).to_dict(),
        text_config=LlamaConfig(vocab_size=spec["vocab"] or len(tok), max_position_embeddings=4096 if spec["vocab"] else 1024,
                                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec["text"]).to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.architectures = ["LlavaForConditionalGeneration"]
    return config, tok


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # no post-processor: the chat template writes the special tokens (transformers serve's decision endpoint
    # refuses tokenizers that add their own)
    tok.train_from_iterator(_CORPUS, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"}, model_max_length=1024)
    for word in ("Yes", "No"):
        assert len(fast(word, add_special_tokens=False)["input_ids"]) == 1, word
    return fast


def _build(out: Path, shape: str = "tiny") -> None:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor

    torch.manual_seed(0)
    config, tok = vlm_config(shape)
    size, patch = SHAPES[shape]["image"], 14  # tiny: 16 image tokens; 2b: 576
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=16)
    model.save_pretrained(out)
    LlavaProcessor(image_processor=LlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
                   tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(out)


def ensure_scripted_vlm(cache_dir: str | Path, answer: str) -> Path:
    """The tiny VLM whose greedy answer to anything is `answer`: the same weights and files, with a
    `generation_config.json` whose `sequence_bias` (a standard generation setting, honoured in-process and by
    `transformers serve`) favours each token of `answer` after the ones before it, then the end of the turn. Its
    log-probabilities and yes/no logits are the tiny VLM's (no generation settings apply there). The judges' tests
    use it: a real model whose answers, and so whose preferences, are known."""
    import hashlib
    import shutil

    from .tiny import build_once

    def build(out: Path) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        src = ensure_tiny_vlm(cache_dir)
        shutil.copytree(src, out, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(out)
        ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        config = GenerationConfig.from_pretrained(out)
        # the k-th token after the first k-1: its bias grows with k, so the longest matching prefix always wins
        config.sequence_bias = [[ids[: k + 1], 100.0 * (k + 1)] for k in range(len(ids))]
        config.save_pretrained(out)
        (out / "SCRIPTED").write_text(answer)

    digest = hashlib.sha256(answer.encode()).hexdigest()[:12]
    return build_once(Path(cache_dir) / f"scripted-vlm-v{TINY_VLM_VERSION}-{digest}", "SCRIPTED", build)

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


def ensure_tiny_vlm(cache_dir: str | Path) -> Path:
    from .tiny import build_once

    return build_once(Path(cache_dir) / f"tiny-vlm-v{TINY_VLM_VERSION}", "model.safetensors", _build)


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


def _build(out: Path) -> None:
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessor,
                              LlavaProcessor)

    torch.manual_seed(0)
    tok = _tokenizer()
    size, patch = 56, 14  # 16 image tokens
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=size, patch_size=patch, projection_dim=32).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=16)
    model.save_pretrained(out)
    LlavaProcessor(image_processor=LlavaImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
                   tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(out)

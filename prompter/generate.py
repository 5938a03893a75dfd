"""Prompts generated from topics: MagicPrompt continues each topic, then (optionally) a Fooocus-style
expansion appends style words.

- MagicPrompt (`Gustavosta/MagicPrompt-Stable-Diffusion`) is a GPT-2 fine-tuned on Lexica prompts; it is
  sampled (top-k / top-p) from the topic, so every prompt starts with its topic.
- The expansion is a second GPT-2 (Fooocus's `prompt_expansion/fooocus_expansion` folder) whose sampling
  may only pick tokens of a list of positive words (`positive.txt` in the model folder), or a comma;
  a word never comes twice. The mask is a transformers `LogitsProcessor` (`PositiveWordsProcessor`).

Both models load with `AutoModelForCausalLM` / `AutoTokenizer` from a local folder or a hub id; `tiny`
builds, once under `cache_dir`, a tiny random GPT-2 in the real layout (config.json, model.safetensors,
vocab.json, merges.txt, tokenizer files; plus positive.txt for the expansion), for tests and demos.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch
from t2i_reward.rewarders.errors import InvalidPromptError, InvalidRequestError, ModelLoadError

DEFAULT_MAGICPROMPT = "Gustavosta/MagicPrompt-Stable-Diffusion"
MAX_NEW_TOKENS = 77  # longest continuation (and expansion) in tokens: one CLIP text window
MAX_SEED = 2**32 - 1
TINY = "tiny"
NONE = "none"
TINY_GPT2_VERSION = "1"

# the tiny models' positive words (Fooocus's list is far longer); each is one token of the tiny vocabulary
TINY_POSITIVE_WORDS = (
    "beautiful", "detailed", "intricate", "elegant", "cinematic", "dramatic", "vibrant", "sharp", "focus",
    "highly", "colorful", "atmospheric", "epic", "glowing", "stunning", "gorgeous", "majestic", "serene",
    "peaceful", "magical", "ethereal", "radiant", "luminous", "vivid", "rich", "deep", "soft", "warm",
    "light", "lighting", "illuminated", "composition", "masterpiece", "professional", "polished",
    "refined", "amazing", "inspiring", "fantastic", "perfect", "fine", "delicate", "balanced", "dynamic",
    "symmetry", "clear", "crisp", "pristine", "lush", "breathtaking",
)


class PositiveWordsProcessor:
    """Keeps only `allowed` token ids (and the `separators`, e.g. the comma), each allowed token at most
    once per sequence (the prompt's own tokens count), and never two separators in a row. When nothing is
    left, only `eos_id` remains, which ends the sequence. A transformers `LogitsProcessor`."""

    def __init__(self, allowed: Sequence[int], separators: Sequence[int], eos_id: int):
        self.allowed = torch.tensor(sorted(set(allowed)), dtype=torch.long)
        self.separators = torch.tensor(sorted(set(separators)), dtype=torch.long)
        self.eos_id = eos_id
        if not len(self.allowed):
            raise ModelLoadError("no positive word is a single token of the expansion's vocabulary")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = scores.device
        allowed, seps = self.allowed.to(device), self.separators.to(device)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[:, allowed] = True
        keep.scatter_(1, input_ids, False)  # no word twice
        if len(seps):
            after_sep = torch.isin(input_ids[:, -1], seps)
            keep[:, seps] = ~after_sep[:, None]
        stuck = ~keep.any(dim=1)
        keep[stuck, self.eos_id] = True
        return scores.masked_fill(~keep, float("-inf"))


def _as_logits_processor(processor: PositiveWordsProcessor):
    from transformers import LogitsProcessor

    class _Processor(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return processor(input_ids, scores)

    return _Processor()


def _seeded(seed: int, device: torch.device):
    """A scope whose random numbers come from `seed` and leave the global generators as they were."""
    devices = [device.index or 0] if device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=devices)

    class _Scope:
        def __enter__(self):
            rng.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return rng.__exit__(*exc)

    return _Scope()


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load(name: str | Path, device: torch.device, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(name))
    except Exception as e:
        raise ModelLoadError(f"cannot load the {what} model {name!s}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name))
    except Exception as e:  # MagicPrompt is used with GPT-2's own tokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained("gpt2")
        except Exception:
            raise ModelLoadError(f"cannot load the {what} tokenizer of {name!s}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _read_positive(name: str | Path) -> list[str]:
    path = Path(name) / "positive.txt"
    if not path.is_file() and not Path(name).exists():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(name), "positive.txt"))
        except Exception as e:
            raise ModelLoadError(f"the expansion model {name!s} has no positive.txt: {e}") from None
    if not path.is_file():
        raise ModelLoadError(f"the expansion model {name!s} has no positive.txt")
    return [w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]


def positive_token_ids(tokenizer, words: Sequence[str]) -> dict[int, str]:
    """Token id -> word, for each positive word that is one token after a space (GPT-2's `Ġword`)."""
    vocab = tokenizer.get_vocab()
    out = {}
    for w in words:
        for form in (w, w.capitalize()):
            i = vocab.get("\u0120" + form)
            if i is not None:
                out[i] = w
    return out


class PromptGenerator:
    """`generate(topics, n_prompts, seed)`: per topic, n prompts that each start with the topic."""

    def __init__(self, magicprompt: str | Path = DEFAULT_MAGICPROMPT, expansion: str | Path = NONE,
                 device: str | None = "auto", cache_dir: str | Path | None = None):
        self.device = _pick_device(device)
        self.magicprompt_name = str(magicprompt)
        self.expansion_name = str(expansion)
        self._lock = threading.Lock()  # one generation at a time per model (and per RNG scope)
        self.model, self.tokenizer = _load(self._resolve(magicprompt, "magicprompt", cache_dir), self.device, "MagicPrompt")
        self.expander = None
        if self.expansion_name.lower() != NONE:
            folder = self._resolve(expansion, "expansion", cache_dir)
            self.expander, self.expander_tokenizer = _load(folder, self.device, "expansion")
            self.positive = _read_positive(folder)
            ids = positive_token_ids(self.expander_tokenizer, self.positive)
            commas = [i for i in self.expander_tokenizer.encode(",", add_special_tokens=False)][:1]
            self.processor = PositiveWordsProcessor(list(ids), commas, self.expander_tokenizer.eos_token_id)

    @staticmethod
    def _resolve(name: str | Path, kind: str, cache_dir: str | Path | None) -> str | Path:
        if str(name) != TINY:
            return name
        if cache_dir is None:
            from t2i_reward.rewarders.config import RewardConfig

            cache_dir = RewardConfig().cache_dir  # T2I_REWARD_CACHE_DIR, else ~/.cache/t2i-reward
        return ensure_tiny_gpt2(cache_dir, kind)

    def _check_length(self, ids: list[int], new_tokens: int, model, what: str) -> None:
        limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
        if len(ids) + new_tokens > limit:
            raise InvalidPromptError(f"{what} is {len(ids)} tokens; with {new_tokens} new tokens the model's limit of {limit} is exceeded")

    def _sample(self, model, tokenizer, text: str, n: int, max_new_tokens: int, what: str, **kw) -> list[str]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise InvalidPromptError(f"{what} is empty after tokenization")
        self._check_length(ids, max_new_tokens, model, what)
        inputs = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                                 max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw)
        return [tokenizer.decode(seq[len(ids):], skip_special_tokens=True) for seq in out]

    def generate(self, topics: Sequence[str], n_prompts: int, seed: int = 0, max_new_tokens: int = 60,
                 expansion_tokens: Optional[int] = None) -> list[list[str]]:
        """Per topic, `n_prompts` MagicPrompt continuations (each starting with the topic), each with the
        expansion's positive words appended unless the expansion is 'none'. The same seed gives the same
        prompts (on the same device and library versions)."""
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidRequestError(f"max_new_tokens is {max_new_tokens}; it must be in [1, {MAX_NEW_TOKENS}]")
        expansion_tokens = max_new_tokens if expansion_tokens is None else expansion_tokens
        if not 1 <= expansion_tokens <= MAX_NEW_TOKENS:
            raise InvalidRequestError(f"expansion_tokens is {expansion_tokens}; it must be in [1, {MAX_NEW_TOKENS}]")
        if n_prompts < 1:
            raise InvalidRequestError(f"n_prompts is {n_prompts}; it must be at least 1")
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequestError(f"seed is {seed}; it must be in [0, {MAX_SEED}]")
        with self._lock:
            out = []
            with _seeded(seed, self.device):
                for topic in topics:
                    conts = self._sample(self.model, self.tokenizer, topic, n_prompts, max_new_tokens, "a topic",
                                         top_k=50, top_p=0.95, temperature=0.9, repetition_penalty=1.2)
                    out.append([topic + _clean_continuation(c) for c in conts])
            if self.expander is not None:  # its own scope: the same seed gives the same base prompts with or without it
                with _seeded((seed + 1) % (MAX_SEED + 1), self.device):
                    out = [[self._expand(p, expansion_tokens) for p in prompts] for prompts in out]
        return out

    def _expand(self, prompt: str, max_new_tokens: int) -> str:
        base = prompt.rstrip().rstrip(",").rstrip()
        (words,) = self._sample(self.expander, self.expander_tokenizer, base + ",", 1, max_new_tokens, "a prompt",
                                top_k=100, logits_processor=[_as_logits_processor(self.processor)])
        words = re.sub(r"\s+", " ", words).strip(" ,")
        words = re.sub(r"\s*,\s*", ", ", words)
        return f"{base}, {words}" if words else base


def _clean_continuation(text: str) -> str:
    """The continuation up to its first line break, whitespace collapsed, no trailing space."""
    text = text.split("\n", 1)[0]
    text = re.sub(r"[\x00-\x1f\x7f\ufffd]", " ", text)
    return re.sub(r"\s+", " ", text).rstrip()


# ---- tiny random GPT-2s in the real layout -------------------------------------------------------------

def ensure_tiny_gpt2(cache_dir: str | Path, kind: str = "magicprompt") -> Path:
    """`cache_dir/tiny-gpt2-v{N}/{kind}`: a tiny random GPT2LMHeadModel and a GPT-2 byte-level BPE
    tokenizer (trained offline on the project's corpus), saved like a hub GPT-2; the expansion kind
    also has positive.txt. Built once."""
    from t2i_reward.rewarders.tiny import build_once

    if kind not in ("magicprompt", "expansion"):
        raise ValueError(f"unknown tiny GPT-2 kind {kind!r}")
    seed = 0 if kind == "magicprompt" else 1
    return build_once(Path(cache_dir) / f"tiny-gpt2-v{TINY_GPT2_VERSION}" / kind, "COMPLETE",
                      lambda out: _build_tiny_gpt2(out, seed, kind == "expansion"))


def _train_tokenizer(out: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    from .corpus import default_prompts

    texts = list(default_prompts()) + [" " + " ".join(TINY_POSITIVE_WORDS)] * 20
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=1024, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save_model(str(out))


def _build_tiny_gpt2(out: Path, seed: int, expansion: bool) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    src = out / ".tokenizer-src"
    src.mkdir(parents=True)
    _train_tokenizer(src)
    tokenizer = GPT2TokenizerFast(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"),
                                  unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  model_max_length=256)
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       n_inner=64, bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):  # GPT-2's slow-tokenizer files, beside tokenizer.json, as on the hub
        (src / name).rename(out / name)
    src.rmdir()
    if expansion:
        ids = positive_token_ids(tokenizer, TINY_POSITIVE_WORDS)
        words = [w for w in TINY_POSITIVE_WORDS if w in ids.values()]
        missing = set(TINY_POSITIVE_WORDS) - set(words)
        assert not missing, f"tiny positive words that are not one token: {missing}"
        (out / "positive.txt").write_text("\n".join(words) + "\n")
    (out / "COMPLETE").write_text("random weights: this model is for tests and demos only\n")

"""Prompts by topic: FAISS retrieval over a prompt corpus (ImageRewardDB, or any file) embedded with
sentence-transformers, or generation from topic prefixes (MagicPrompt, optionally Fooocus-style expansion)."""

from .corpus import default_prompts
from .generate import PromptGenerator
from .index import DEFAULT_MODEL, PromptIndex, PromptIndexError, build_index, default_index, open_index
from .sources import DEFAULT_SOURCE, PromptSourceError, read_prompts

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SOURCE",
    "PromptGenerator",
    "PromptIndex",
    "PromptIndexError",
    "PromptSourceError",
    "build_index",
    "default_index",
    "default_prompts",
    "open_index",
    "read_prompts",
]

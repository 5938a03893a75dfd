"""Prompts by topic: FAISS retrieval over a prompt corpus (ImageRewardDB, or any file) embedded with
sentence-transformers."""

from .corpus import default_prompts
from .index import DEFAULT_MODEL, PromptIndex, PromptIndexError, build_index, default_index, open_index
from .sources import DEFAULT_SOURCE, PromptSourceError, read_prompts

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SOURCE",
    "PromptIndex",
    "PromptIndexError",
    "PromptSourceError",
    "build_index",
    "default_index",
    "default_prompts",
    "open_index",
    "read_prompts",
]

"""Prompt enhancement (the seed's stage 1): the MLLM peer rewrites a user's prompt into `n` richer prompts
that keep its intent. One request per prompt, each with its own seed, so servers that sample give
different rewrites (a server that decodes greedily gives the same one n times)."""

from __future__ import annotations

from t2i_reward.rewarders.mllm import MLLMError, first_line

DEFAULT_SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model. Keep every subject, attribute, count and relation the user "
    "asked for, and change none of them; add concrete detail about composition, lighting, style and setting. "
    "Answer with the rewritten prompt only, on one line, under 60 words."
)
MAX_ENHANCED = 16


def enhance_prompt(peer, prompt: str, n: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_tokens: int = 96,
                   seed: int = 0) -> list[str]:
    """`n` rewrites of `prompt` (the first line of each answer, stripped). MLLMError when an answer is empty."""
    if not 1 <= n <= MAX_ENHANCED:
        raise ValueError(f"n must be in 1..{MAX_ENHANCED}, got {n}")
    out = []
    for k in range(n):
        text = peer.complete(system_prompt, prompt, max_tokens, seed + k)
        line = first_line(text)
        if not line:
            raise MLLMError("bad_answer", "the MLLM peer answered an empty prompt")
        out.append(line)
    return out

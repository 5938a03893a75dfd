"""ig-rewarding's Validator API over t2i-reward, so its users switch with one import.

    from prompter.validator import Validator          # also: from service.client import Validator
    validator = Validator(base_url="http://127.0.0.1:8000")      # through the service
    validator = Validator(profile="tiny")                         # in this process
    prompts = validator.generate_prompt(["landscape, detailed"], n_prompts=2)
    mean_reward, component_rewards = validator.get_reward_score(images, prompts[0][0])
"""

from __future__ import annotations

import os
from typing import Sequence

from rewarders.client import RewardClient

from .index import PromptIndex, open_index


class Validator:
    """ig-rewarding's Validator API over t2i-reward, so its users switch with one import.

    Validator(base_url="http://host:8000") uses the service; Validator(profile=...) or
    Validator(config=...) loads the experts in this process, with the prompt index at `prompts_index`
    (default: the built-in corpus, built into the cache on first use).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, config=None, profile: str | None = None,
                 prompts_index: str | os.PathLike | None = None):
        self.client: RewardClient | None = None
        self.rewarder = None
        self._prompts_index = prompts_index
        self._prompter: PromptIndex | None = None
        if base_url is not None:
            self.client = RewardClient(base_url, api_key=api_key)
        else:
            from rewarders import create_rewarder

            self.rewarder = create_rewarder(config, profile=profile)

    def generate_prompt(self, topics: Sequence[str], n_prompts: int = 1) -> list[list[str]]:
        """Per topic, `n_prompts` prompts from the corpus (most similar first)."""
        if self.client is not None:
            return self.client.prompts(topics, n_prompts)["prompts"]
        if self._prompter is None:
            self._prompter = open_index(self._prompts_index, self.rewarder.config.cache_dir)
        return self._prompter.search(list(topics), n_prompts)[0]

    def get_reward_score(self, images: Sequence, prompt: str) -> tuple[float, dict[str, float]]:
        """(mean_reward, component_rewards) for images generated from `prompt`."""
        if self.client is not None:
            out = self.client.reward(prompt, images)
            return out["mean_reward"], out["component_rewards"]
        result = self.rewarder.score(prompt, list(images))
        return result.mean_reward, result.component_rewards

"""ig-rewarding's Validator API over t2i-reward, so its users switch with one import.

    from t2i_reward.prompter.validator import Validator          # also: from t2i_reward.service.client import Validator
    config = yaml.safe_load(open("ig_rewarding/config/baseline.yaml"))
    validator = Validator(config["rewarder"], config["prompter"])  # ig-rewarding's own config dicts
    validator = Validator(base_url="http://127.0.0.1:8000")      # through the service
    validator = Validator(profile="tiny")                         # in this process
    prompts = validator.generate_prompt(["landscape, detailed"], n_prompts=2)
    mean_reward, component_rewards = validator.get_reward_score(images, prompts[0][0])

With ig-rewarding's config dicts, each `rewarder_configs` entry's `target` class maps to one of our experts
(`IG_EXPERTS`; the class name counts, not its module), its `weight` is kept, the total is the raw
weighted sum of the per-expert means as ig-rewarding computes it, and `component_rewards` are keyed by
the entry names (`image_rewarder`, ...). ig-rewarding's own params (`device`, `name`, timm `model`) have
no meaning here and are ignored; params that are fields of our expert's config (`checkpoint`, `clip`, ...)
are passed on. Its prompters map by class: `GPTPrompt` (its baseline) generates prompts as it does, with
MagicPrompt (`params.model_name`) and the Fooocus expansion (`t2i_reward.prompter.generate.PromptGenerator`; the
expansion needs a local Fooocus folder, `prompt_expansion=`, since ig-rewarding's `fooocus_cfg.url` is a
bare weights file without its tokenizer and word list); `PromptGenerator` (its retrieval prompter)
retrieves prompts from our prompt index.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any, Mapping, Sequence

from t2i_reward.rewarders.client import RewardClient
from t2i_reward.rewarders.config import PROFILES, RewardConfig, load_config
from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.rewarders.registry import get_expert_class

from .index import PromptIndex, open_index

log = logging.getLogger(__name__)

# ig-rewarding's rewarder classes -> (our expert, the fields that make it compute what that class computes)
IG_EXPERTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ImageRewardModel": ("imagereward", {}),
    "ImageReward": ("imagereward", {}),
    "CLIPAestheticRewardModel": ("aesthetic", {}),
    "AestheticScore": ("aesthetic", {}),
    "PickRewardModel": ("pickscore", {"logit_scale": False}),  # its score is the raw cosine
    "PickScore": ("pickscore", {"logit_scale": False}),
    "HPSv2": ("hpsv2", {}),
    "BLIPRewardModel": ("blip_score", {}),
    "DiversityRewardModel": ("diversity", {"variant": "ig_rewarding"}),  # on CLIP embeddings, not a timm model
}
IG_PROMPTERS = {"PromptGenerator": "retrieve", "GPTPrompt": "generate"}  # its prompter class -> our /prompts mode
# ig-rewarding's GPTPrompt samples with max_length=28 tokens in all; with a topic of a few tokens, about this many new
IG_NEW_TOKENS = 24


def _class_name(cfg: Any, what: str) -> str:
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("target"), str):
        raise InvalidRequestError(f"{what} must be a mapping with a 'target' class path, as in ig-rewarding's config")
    return cfg["target"].rsplit(".", 1)[-1]


def ig_reward_config(rewarder_cfg: Mapping, profile: str = "ig-rewarding", device: str | None = None,
                     **overrides: Any) -> tuple[RewardConfig, dict[str, str]]:
    """Our config for ig-rewarding's `rewarder` config dict, and our expert name -> its entry name.

    The experts it lists, exactly, each over `profile`'s defaults for its fields; `normalize: false`.
    """
    _class_name(rewarder_cfg, "the rewarder config")
    entries = (rewarder_cfg.get("params") or {}).get("rewarder_configs")
    if not isinstance(entries, Mapping) or not entries:
        raise InvalidRequestError("the rewarder config has no params.rewarder_configs")
    experts: dict[str, Any] = {}
    names: dict[str, str] = {}
    for ig_name, entry in entries.items():
        cls = _class_name(entry, f"rewarder {ig_name!r}")
        if cls not in IG_EXPERTS:
            raise InvalidRequestError(f"rewarder {ig_name!r}: unknown target class {cls!r}; known: {', '.join(IG_EXPERTS)}")
        expert, fixed = IG_EXPERTS[cls]
        if expert in names:
            raise InvalidRequestError(f"rewarders {names[expert]!r} and {ig_name!r} both map to expert {expert!r}")
        fields = get_expert_class(expert).Config.model_fields
        params = {k: v for k, v in (entry.get("params") or {}).items() if k in fields and k not in ("weight", "mean", "std")}
        experts[expert] = {**params, **fixed, "weight": float(entry.get("weight", 1.0))}
        names[expert] = ig_name
    for n in PROFILES[profile][0]()["experts"] if profile in PROFILES else ():
        experts.setdefault(n, None)  # exactly the listed experts, not the profile's others
    if device is not None:
        overrides["device"] = device
    return load_config(profile=profile, **{**overrides, "normalize": False, "experts": experts}), names


class Validator:
    """ig-rewarding's Validator API over t2i-reward, so its users switch with one import.

    Validator(rewarder_cfg, prompter_cfg[, device]) takes ig-rewarding's own config dicts (the module
    docstring says how they map; `profile` gives the experts' field defaults, `ig-rewarding` unless set;
    `device` defaults to ours, 'auto', rather than ig-rewarding's 'cuda').
    Validator(base_url="http://host:8000") uses the service; Validator(profile=...) or Validator(config=...)
    loads the experts in this process. The prompt index is `prompts_index` (default: the built-in corpus,
    built into the cache on first use).
    """

    def __init__(self, rewarder_cfg: Mapping | str | None = None, prompter_cfg: Mapping | None = None,
                 device: str | None = None, *, base_url: str | None = None, api_key: str | None = None, config=None,
                 profile: str | None = None, prompts_index: str | os.PathLike | None = None,
                 prompt_generator: str | None = None, prompt_expansion: str | None = None):
        if isinstance(rewarder_cfg, str):  # Validator("http://...") as before
            base_url, rewarder_cfg = rewarder_cfg, None
        self.client: RewardClient | None = None
        self.rewarder = None
        self.names: dict[str, str] = {}  # our expert -> ig-rewarding's entry name, with its configs
        self._prompts_index = prompts_index
        self._prompter: PromptIndex | None = None
        self._generator = None
        self.prompt_mode = "generate" if prompt_generator is not None else "retrieve"
        self._generator_args = (prompt_generator, prompt_expansion or "none")
        if prompter_cfg is not None:
            cls = _class_name(prompter_cfg, "the prompter config")
            if cls not in IG_PROMPTERS:
                raise InvalidRequestError(f"unknown prompter class {cls!r}; known: {', '.join(sorted(IG_PROMPTERS))}")
            self.prompt_mode = IG_PROMPTERS[cls]
            params = prompter_cfg.get("params") or {}
            if self.prompt_mode == "generate":
                model = prompt_generator or params.get("model_name") or "Gustavosta/MagicPrompt-Stable-Diffusion"
                fooocus = params.get("use_fooocus", True)
                if fooocus and prompt_expansion is None:
                    log.warning("ig-rewarding's Fooocus expansion needs a local Fooocus expansion folder "
                                "(Validator(..., prompt_expansion=PATH)); generating MagicPrompt prompts without it")
                self._generator_args = (model, (prompt_expansion or "none") if fooocus else "none")
        self.device = device
        if base_url is not None:
            self.client = RewardClient(base_url, api_key=api_key)
            return
        from t2i_reward.rewarders import create_rewarder

        if rewarder_cfg is not None:
            config, self.names = ig_reward_config(rewarder_cfg, profile or "ig-rewarding", device)
        self.rewarder = create_rewarder(config, profile=profile)

    def generate_prompt(self, topics: Sequence[str], n_prompts: int = 1, seed: int | None = None) -> list[list[str]]:
        """Per topic, `n_prompts` prompts: generated from the topic (ig-rewarding's GPTPrompt, or
        `prompt_generator=`; `seed` makes them reproducible, a random one otherwise) or retrieved from the
        corpus, most similar first. Remotely, generation uses the service's own generator."""
        if self.prompt_mode == "generate":
            seed = secrets.randbelow(2**32) if seed is None else seed
            if self.client is not None:
                return self.client.prompts(topics, n_prompts, mode="generate", seed=seed, max_new_tokens=IG_NEW_TOKENS)["prompts"]
            if self._generator is None:
                from .generate import PromptGenerator

                cache = self.rewarder.config.cache_dir
                self._generator = PromptGenerator(*self._generator_args, device=self.device or "auto", cache_dir=cache)
            return self._generator.generate(list(topics), n_prompts, seed=seed, max_new_tokens=IG_NEW_TOKENS)
        if self.client is not None:
            return self.client.prompts(topics, n_prompts)["prompts"]
        if self._prompter is None:
            self._prompter = open_index(self._prompts_index, self.rewarder.config.cache_dir)
        return self._prompter.search(list(topics), n_prompts)[0]

    def get_reward_score(self, images: Sequence, prompt: str) -> tuple[float, dict[str, float]]:
        """(mean_reward, component_rewards) for images generated from `prompt`; with ig-rewarding's configs,
        the components are keyed by its rewarder names, in its order."""
        if self.client is not None:
            out = self.client.reward(prompt, images)
            return out["mean_reward"], out["component_rewards"]
        result = self.rewarder.score(prompt, list(images))
        if self.names:
            return result.mean_reward, {ig: result.component_rewards[n] for n, ig in self.names.items()}
        return result.mean_reward, result.component_rewards

"""vlm_judge: a multimodal LLM asked whether each image matches its prompt (the MLLM peer, `rewarders/mllm.py`).

The score is the peer's probability of "yes", in [0, 1]: read from its log-probabilities where it returns
them, from transformers serve's yes/no endpoint, or, with neither, its 0-10 rating divided by 10 (the
`yes_no` mode; in-process it is always the model's Yes/No logits). Images go to the peer downscaled to
`image_size` (the longer side). Not differentiable: a job optimising it uses GRPO or reward-weighted
likelihood. A peer that is down, too slow or unparseable raises `MLLMError`, and the scoring call fails
with that message; nothing else is affected. With `required: false` the failure is that pair's only: its
component is null, the answer's `errors` say why, and the other pairs keep their scores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from pydantic import Field

from ..images import Preprocess
from ..mllm import MATCH_QUESTION, MLLMConfig, MLLMError, create_peer, question_for
from ..registry import Expert, ExpertConfig, ExpertOutput, register_expert


class VLMJudgeConfig(ExpertConfig, MLLMConfig):
    """The peer's settings (`MLLMConfig`: url, model, api_key, timeout_s, max_concurrency, retries, image_size,
    yes_no), the question, and an expert's weight and normalisation."""

    question: str = Field(MATCH_QUESTION, min_length=1, max_length=2000, description="The yes/no question; {prompt} is the image's prompt.")


@register_expert
class VLMJudge(Expert):
    name = "vlm_judge"
    Config = VLMJudgeConfig
    default_mean = 0.5  # a probability: centred on "can't tell"
    default_std = 0.25
    per_pair = True  # one question per pair: never padded in the batch-invariant mode (the peer's own batching is its own)

    def __init__(self, peer, cfg: VLMJudgeConfig):
        # the pixels stay in [0, 1] at the size sent to the peer (square, as every expert's input)
        super().__init__(Preprocess(cfg.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), cfg.url or cfg.model, cfg.model == "tiny")
        self.peer, self.question, self.workers = peer, cfg.question, cfg.max_concurrency
        self.per_pair_errors = not cfg.required  # an optional judge fails pair by pair

    @classmethod
    def from_config(cls, cfg: VLMJudgeConfig, ctx) -> "VLMJudge":
        peer_cfg = MLLMConfig(**cfg.model_dump(include=set(MLLMConfig.model_fields)))
        return cls(create_peer(peer_cfg, ctx.cache_dir, str(ctx.device)), cfg)

    def ask(self, pixels: torch.Tensor, prompts: list[str]) -> list[float]:
        from torchvision.transforms.functional import to_pil_image

        images = [to_pil_image(p.detach().float().clamp(0, 1).cpu()) for p in pixels]
        questions = [question_for(self.question, p) for p in prompts]
        def one(image, question):
            try:
                return self.peer.yes_probability(image, question)
            except MLLMError as e:
                if not self.per_pair_errors:
                    raise
                return e

        with ThreadPoolExecutor(max(1, min(self.workers, len(images)))) as pool:
            return list(pool.map(one, images, questions))

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> torch.Tensor | ExpertOutput:
        answers = self.ask(pixels, prompts)
        errors = {i: str(a) for i, a in enumerate(answers) if isinstance(a, MLLMError)}
        scores = torch.tensor([float("nan") if isinstance(a, MLLMError) else a for a in answers], dtype=torch.float32)
        return ExpertOutput(scores.to(pixels.device), errors=errors) if errors else scores.to(pixels.device)

    def describe(self) -> dict:
        return {**super().describe(), "peer": self.peer.describe()}

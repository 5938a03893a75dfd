"""vqascore: VQAScore (Lin et al., t2v-metrics), the MLLM peer's probability of answering "Yes" to
'Does this figure show "{prompt}"? Please answer yes or no.' about the image, in [0, 1].

The probability is t2v-metrics' (github.com/linzhiqiu/t2v_metrics): the softmax over the whole vocabulary at the
first answer token, read at "Yes" (not yes / (yes + no), which `vlm_judge` reads). Where it comes from, by
`yes_no` (rewarders/mllm.py, `vqa_probability`):
- in-process (no `url`): the model's next-token logits;
- `logprobs` (vLLM, SGLang, OpenAI): the server's top log-probabilities of the first answer token, read as
  t2v-metrics reads an API model's (exp(logprob) of "yes", else 1 - exp(logprob) of "no"; neither among the
  `top_logprobs`: an error for that pair);
- `systemone` (`transformers serve`, which returns no log-probabilities): its yes/no endpoint, a probability
  normalised over "Yes" and "No" with that server's own prompt around the question: not t2v-metrics' number;
- `auto`: the first of these the server supports.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..images import Preprocess
from ..judges import VQA_ANSWER, VQA_QUESTION, ask_all, failed, fill, pil_images
from ..mllm import MLLMConfig, create_peer
from ..registry import Expert, ExpertConfig, ExpertOutput, register_expert


class VQAScoreConfig(ExpertConfig, MLLMConfig):
    """The peer's settings (`MLLMConfig`; `yes_no`: auto, logprobs or systemone), VQAScore's question and answer,
    and an expert's weight and normalisation."""

    question: str = Field(VQA_QUESTION, min_length=1, max_length=2000, description="The question; {prompt} is the image's prompt "
                          "(default: t2v-metrics' for CLIP-FlanT5 and LLaVA-1.5).")
    answer: str = Field(VQA_ANSWER, min_length=1, max_length=20, description="The answer whose probability is the score "
                        "(one token of the model's tokenizer in-process).")
    top_logprobs: int = Field(2, ge=1, le=20, description="Top log-probabilities asked of a server (t2v-metrics asks 2).")

    @field_validator("yes_no")
    @classmethod
    def _probability_modes(cls, v):
        if v == "rating":
            raise ValueError("vqascore reads a probability: yes_no must be auto, logprobs or systemone")
        return v


@register_expert
class VQAScoreExpert(Expert):
    name = "vqascore"
    Config = VQAScoreConfig
    default_mean = 0.5
    default_std = 0.25
    per_pair = True  # one question per pair: never padded in the batch-invariant mode

    def __init__(self, peer, cfg: VQAScoreConfig):
        super().__init__(Preprocess(cfg.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), cfg.url or cfg.model, cfg.model == "tiny")
        self.peer, self.cfg = peer, cfg
        self.per_pair_errors = not cfg.required

    @classmethod
    def from_config(cls, cfg: VQAScoreConfig, ctx) -> "VQAScoreExpert":
        peer_cfg = MLLMConfig(**cfg.model_dump(include=set(MLLMConfig.model_fields)))
        peer = create_peer(peer_cfg, ctx.cache_dir, str(ctx.device))
        if hasattr(peer, "answer_token"):
            peer.answer_token(cfg.answer)  # in-process: a multi-token answer is refused at load, not per image
        return cls(peer, cfg)

    def ask(self, item) -> float:
        image, prompt = item
        return self.peer.vqa_probability(image, fill(self.cfg.question, prompt), self.cfg.answer, self.cfg.top_logprobs)

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None) -> ExpertOutput:
        answers = ask_all(self.ask, list(zip(pil_images(pixels), prompts)), self.cfg.max_concurrency, self.per_pair_errors)
        errors = {i: str(a) for i, a in enumerate(answers) if failed(a)}
        scores = torch.tensor([float("nan") if failed(a) else a for a in answers], dtype=torch.float32)
        return ExpertOutput(scores, errors=errors)

    def describe(self) -> dict:
        return {**super().describe(), "peer": self.peer.describe()}

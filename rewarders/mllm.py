"""The MLLM peer: a multimodal LLM asked about images, behind any OpenAI-compatible chat-completions server
(vLLM, SGLang, Ollama, TGI, LM Studio, `transformers serve`, OpenAI) or in-process (transformers'
`AutoModelForImageTextToText`). `create_peer(config)` is the one door; the `vlm_judge` expert and prompt
enhancement ask through it.

The yes/no probability (`yes_probability`), by `yes_no` mode:
- `logprobs`: one token of a chat completion with `logprobs`/`top_logprobs`; P(yes) = p(Yes) / (p(Yes) + p(No))
  over the top tokens (vLLM, SGLang, TGI and OpenAI return them);
- `systemone`: `transformers serve`'s `/v1/systemone` endpoint, a yes/no ("noul") question whose answer is
  P(yes) read from the model's Yes/No logits (that server ignores `logprobs`);
- `rating`: the model's 0-10 rating in a short chat answer, divided by 10 (any server);
- `auto` (default): the first of these that the peer supports, remembered after the first call.
In-process, P(yes) is always read from the model's next-token logits over "Yes" and "No".

The judges (`rewarders/judges.py`, the experts `unified_reward`, `pairwise_judge`, `vqascore`) ask through two more
methods: `answer(images, text, max_tokens)`, the greedy text answer to a message holding one or more images (a
pairwise comparison shows two), and `vqa_probability(image, question, answer)`, VQAScore's P(answer) as t2v-metrics
computes it (the full-vocabulary softmax at the first answer token, not yes / (yes + no); see `t2v_probability`).
Every peer counts its model calls (`calls`), which the judges report per request.

Errors are `MLLMError` with a `kind`: `unavailable` (refused connection, 429 or 5xx after the retries),
`timeout`, `bad_answer` (a 4xx, a body that is not the API's JSON, or an answer without what was asked).
429 and 5xx are retried with exponential back-off (honouring `Retry-After`); at most `max_concurrency`
requests are in flight per peer.
"""

from __future__ import annotations

import base64
import io
import math
import re
import threading
import time
from pathlib import Path
from typing import Literal, Optional

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from .errors import RewardError

YesNoMode = Literal["auto", "logprobs", "systemone", "rating"]


class MLLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Optional[str] = Field(None, description="Base URL of an OpenAI-compatible server (e.g. http://host:8000); None: in-process.")
    model: str = Field("tiny", description="The model name the server serves; in-process: a local folder, a hub id, or 'tiny'.")
    api_key: Optional[SecretStr] = Field(None, description="Bearer token for the server, if it wants one.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds to wait for one answer.")
    max_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight to the peer at once.")
    retries: int = Field(2, ge=0, le=10, description="Retries after a 429, a 5xx or a refused connection.")
    image_size: int = Field(384, ge=16, le=2048, description="Images are downscaled so that their longer side is at most this.")
    yes_no: YesNoMode = Field("auto", description="How a yes/no probability is read (see rewarders/mllm.py).")


class MLLMError(RewardError):
    """The peer is down, too slow, or answered something unusable; `kind` says which."""

    def __init__(self, kind: Literal["unavailable", "timeout", "bad_answer"], message: str):
        super().__init__(message)
        self.kind = kind


def downscaled(image: Image.Image, max_side: int) -> Image.Image:
    """`image` as RGB, its longer side at most `max_side` (never enlarged): what a peer is shown."""
    im = image.convert("RGB")
    im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return im


def data_url(image: Image.Image, max_side: int) -> str:
    """PNG data URL of `image`, downscaled so that its longer side is at most `max_side`."""
    buf = io.BytesIO()
    downscaled(image, max_side).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_rating(text: str) -> float:
    """The first integer 0..10 in `text`, divided by 10; MLLMError when there is none."""
    m = re.search(r"(?<!\d)(10|[0-9])(?!\d)", text or "")
    if m is None:
        raise MLLMError("bad_answer", f"the MLLM peer's answer holds no 0-10 rating: {text[:80]!r}")
    return int(m.group(1)) / 10


RATING_SUFFIX = " Rate it from 0 (not at all) to 10 (perfectly). Answer with one integer only."
MATCH_QUESTION = 'Does this image match the prompt "{prompt}"?'  # the judge's, /verify's and generate's default


def question_for(template: str, prompt: str) -> str:
    """A configurable question (`MATCH_QUESTION`, `vlm_judge`'s `question`, the /verify setting) for one prompt:
    `{prompt}` replaced, nothing else (a prompt's own braces stay as they are)."""
    return template.replace("{prompt}", prompt)


def first_line(text: str, limit: int | None = None) -> str:
    """The first non-blank line of a model's answer, stripped (and cut to `limit` characters)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:limit]


def t2v_probability(top_logprobs: list[tuple[str, float]], answer: str = "Yes") -> float:
    """P(`answer`) from the top log-probabilities of the first answer token, as t2v-metrics' API models read it
    (t2v_metrics/models/vqascore_models/gpt4v_model.py, `forward_single`): the tokens are compared stripped and
    lower-cased; the probability is exp(logprob) of the answer (the last matching entry, as there), else
    1 - exp(logprob) of the opposite yes/no word, else there is none: MLLMError (t2v-metrics returns 0.0; a score
    must not be made up)."""
    target = answer.strip().lower()
    opposite = "no" if target == "yes" else "yes"
    hit = miss = None
    for token, logprob in top_logprobs:
        word = token.strip().lower()
        if word == target:
            hit = logprob
        elif word == opposite:
            miss = logprob
    if hit is not None:
        return math.exp(hit)
    if miss is not None:
        return 1.0 - math.exp(miss)
    raise MLLMError("bad_answer", f"neither {target!r} nor {opposite!r} is among the MLLM peer's top tokens")


class HTTPPeer:
    """An OpenAI-compatible server. Thread-safe."""

    def __init__(self, cfg: MLLMConfig):
        import httpx

        self.cfg, self.url = cfg, cfg.url.rstrip("/")
        headers = {"Authorization": f"Bearer {cfg.api_key.get_secret_value()}"} if cfg.api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=cfg.timeout_s, headers=headers,
                                 limits=httpx.Limits(max_connections=cfg.max_concurrency))
        self.slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self.mode: YesNoMode = cfg.yes_no
        self.last_error: str | None = None  # the last call's error (None after a success): /readyz shows it
        self.calls = 0  # requests sent (a retried one counts once): the judges report them per request
        self._count = threading.Lock()

    def describe(self) -> dict:
        return {"url": self.url, "model": self.cfg.model, "yes_no": self.mode, "last_error": self.last_error}

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, body: dict) -> dict:
        """POST JSON, with the retries and errors of the module doc."""
        with self._count:
            self.calls += 1
        try:
            out = self._post(path, body)
        except MLLMError as e:
            self.last_error = str(e)
            raise
        self.last_error = None
        return out

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        error: MLLMError | None = None
        for attempt in range(self.cfg.retries + 1):
            wait = 0.2 * 2**attempt
            with self.slots:
                try:
                    r = self.http.post(path, json=body)
                except httpx.TimeoutException:
                    raise MLLMError("timeout", f"the MLLM peer at {self.url} did not answer within {self.cfg.timeout_s:g} s") from None
                except httpx.TransportError as e:
                    error = MLLMError("unavailable", f"the MLLM peer at {self.url} is unreachable ({type(e).__name__})")
                else:
                    if r.status_code == 429 or r.status_code >= 500:
                        error = MLLMError("unavailable", f"the MLLM peer at {self.url} answered {r.status_code} to {path}")
                        after = r.headers.get("retry-after", "")
                        wait = max(wait, min(float(after), 30.0)) if after.replace(".", "", 1).isdigit() else wait
                    elif r.status_code >= 400:
                        raise MLLMError("bad_answer", f"the MLLM peer at {self.url} refused {path}: {r.status_code} {r.text[:200]}")
                    else:
                        try:
                            return r.json()
                        except ValueError:
                            raise MLLMError("bad_answer", f"the MLLM peer at {self.url} answered {path} with something that is not JSON") from None
            if attempt < self.cfg.retries:
                time.sleep(wait)
        raise error

    def chat(self, messages: list[dict], max_tokens: int = 64, **extra) -> dict:
        """One chat completion (greedy); the API's JSON answer."""
        out = self.post("/v1/chat/completions", {"model": self.cfg.model, "messages": messages, "max_tokens": max_tokens,
                                                 "temperature": 0, **extra})  # extra may override the temperature
        if not isinstance(out, dict) or not isinstance(out.get("choices"), list) or not out["choices"]:
            raise MLLMError("bad_answer", "the MLLM peer's chat answer has no choices")
        return out

    def text(self, messages: list[dict], max_tokens: int = 64, **extra) -> str:
        """The text of one chat completion (`extra`: more request fields, e.g. temperature and seed)."""
        content = (self.chat(messages, max_tokens, **extra)["choices"][0].get("message") or {}).get("content")
        if not isinstance(content, str):
            raise MLLMError("bad_answer", "the MLLM peer's chat answer has no text")
        return content

    @staticmethod
    def messages(image: Image.Image, question: str, max_side: int) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image, max_side)}},
                                             {"type": "text", "text": question}]}]

    @staticmethod
    def multi_image_messages(images: list[Image.Image], text: str, max_side: int) -> list[dict]:
        """One user message: the images in order (Image 1, Image 2, ...), then the text, as UnifiedReward's and
        Pref-GRPO's clients send a comparison."""
        return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(im, max_side)}} for im in images),
                                             {"type": "text", "text": text}]}]

    def answer(self, images: list[Image.Image], text: str, max_tokens: int) -> str:
        """The greedy text answer to `text` about `images` (shown in order)."""
        return self.text(self.multi_image_messages(images, text, self.cfg.image_size), max_tokens=max_tokens)

    def vqa_probability(self, image: Image.Image, question: str, answer: str = "Yes", top_logprobs: int = 2) -> float:
        """VQAScore: P(`answer`) for `question` about `image`. `logprobs`: t2v-metrics' rule on the server's top
        log-probabilities of the first answer token (`t2v_probability`); `systemone`: transformers serve's yes/no
        endpoint, whose probability is normalised over "Yes" and "No" only (its own prompt around the question), so
        it is not t2v-metrics' number; `auto`: the first of the two that the server supports."""
        auto = self.mode == "auto"  # (a 0-10 rating is no probability: vqascore's config refuses `rating`)
        modes = ["logprobs", "systemone"] if auto else [self.mode]
        for mode in modes:
            try:
                if mode == "logprobs":
                    out = self.chat(self.messages(image, question, self.cfg.image_size), max_tokens=1, logprobs=True,
                                    top_logprobs=top_logprobs)
                    try:
                        top = [(str(t["token"]), float(t["logprob"])) for t in out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]
                    except (KeyError, IndexError, TypeError, ValueError):
                        raise MLLMError("bad_answer", "the MLLM peer returns no log-probabilities") from None
                    p = t2v_probability(top, answer)
                else:
                    if answer.strip().lower() not in ("yes", "no"):
                        raise MLLMError("bad_answer", f"the yes/no endpoint answers 'Yes' or 'No', not {answer!r}")
                    p = self._yes_systemone(image, question)
                    p = p if answer.strip().lower() == "yes" else 1.0 - p
            except MLLMError as e:
                if not auto or mode == modes[-1] or e.kind != "bad_answer":
                    raise
                continue
            self.mode = mode  # remembered: later calls go straight there
            return p
        raise AssertionError("unreachable")

    def yes_probability(self, image: Image.Image, question: str) -> float:
        auto = self.mode == "auto"  # read once: a concurrent call may settle the mode while this one probes
        modes = ["logprobs", "systemone", "rating"] if auto else [self.mode]
        for mode in modes:
            try:
                p = getattr(self, f"_yes_{mode}")(image, question)
            except MLLMError as e:
                if not auto or mode == modes[-1] or e.kind != "bad_answer":
                    raise
                continue  # this peer does not offer the mode: try the next one
            self.mode = mode  # remembered: later calls go straight there
            return p
        raise AssertionError("unreachable")

    def _yes_logprobs(self, image, question) -> float:
        out = self.chat(self.messages(image, question + " Answer Yes or No only.", self.cfg.image_size), max_tokens=1,
                        logprobs=True, top_logprobs=20)
        try:
            top = out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            p = {"yes": 0.0, "no": 0.0}
            for t in top:
                word = str(t["token"]).strip().lower()
                if word in p:
                    p[word] += math.exp(float(t["logprob"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise MLLMError("bad_answer", "the MLLM peer returns no log-probabilities") from None
        if p["yes"] + p["no"] == 0:
            raise MLLMError("bad_answer", "neither 'Yes' nor 'No' is among the MLLM peer's top tokens")
        return p["yes"] / (p["yes"] + p["no"])

    def _yes_systemone(self, image, question) -> float:
        b64 = data_url(image, self.cfg.image_size).split(",", 1)[1]
        out = self.post("/v1/systemone", {
            "model": self.cfg.model, "state": {"image": "image-1"},
            "questions": {"q": {"type": "noul", "instructions": question}},
            "assets": {"image-1": {"type": "image", "format": "png", "data_base64": b64}}})
        try:
            p = float(out["answers"]["q"]["noul"])
        except (KeyError, TypeError, ValueError):
            raise MLLMError("bad_answer", "the MLLM peer's /v1/systemone answer has no yes/no probability") from None
        if not 0.0 <= p <= 1.0:
            raise MLLMError("bad_answer", f"the MLLM peer's yes probability {p} is not in [0, 1]")
        return p

    def _yes_rating(self, image, question) -> float:
        return parse_rating(self.text(self.messages(image, question + RATING_SUFFIX, self.cfg.image_size), max_tokens=8))

    def reason(self, image: Image.Image, question: str) -> str:
        """The model's one-line reason for its answer to `question`."""
        return first_line(self.text(self.messages(image, question + " In one line, why?", self.cfg.image_size), max_tokens=48), 300)

    def complete(self, system: str, user: str, max_tokens: int, seed: int) -> str:
        """A text-only answer, sampled (temperature 0.8) with `seed` where the server samples."""
        return self.text([{"role": "system", "content": system}, {"role": "user", "content": user}], max_tokens,
                         temperature=0.8, seed=seed)


class LocalPeer:
    """The model in this process (`AutoModelForImageTextToText` + `AutoProcessor`). Thread-safe (one call at
    a time)."""

    def __init__(self, cfg: MLLMConfig, cache_dir: Path | None = None, device: str = "cpu", dtype=None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .tiny_vlm import ensure_tiny_vlm

        self.cfg = cfg
        path = str(ensure_tiny_vlm(cache_dir or Path.home() / ".cache" / "t2i-reward")) if cfg.model == "tiny" else cfg.model
        self.processor = AutoProcessor.from_pretrained(path)
        # bfloat16 on a GPU, as the experts run there; elsewhere the checkpoint's own dtype (the processor's
        # float32 pixels are cast to the vision tower's dtype by the model)
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else "auto")
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device, self.lock, self.torch = device, threading.Lock(), torch
        tok = self.processor.tokenizer
        ids = [tok(w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No")]
        if any(len(i) != 1 for i in ids):
            raise MLLMError("bad_answer", f"model {cfg.model!r}: 'Yes' and 'No' are not single tokens of its tokenizer")
        self.yes_no_ids = [i[0] for i in ids]
        self.calls = 0  # model calls (forward passes or generations): the judges report them per request

    def describe(self) -> dict:
        return {"url": None, "model": self.cfg.model, "yes_no": "logits", "last_error": None}

    def close(self) -> None:
        pass

    def _encode(self, messages: list[dict]):
        """The chat, templated and tokenised (images through the processor), on the model's device."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt").to(self.device)

    def _inputs(self, image: Image.Image, question: str):
        im = downscaled(image, self.cfg.image_size)
        return self._encode([{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": question}]}])

    def yes_probability(self, image: Image.Image, question: str) -> float:
        with self.lock, self.torch.no_grad():
            self.calls += 1
            logits = self.model(**self._inputs(image, question + " Answer Yes or No only.")).logits[0, -1]
        return float(self.torch.softmax(logits[self.yes_no_ids].float(), dim=0)[0])

    def answer_logits(self, image: Image.Image, question: str):
        """The model's next-token logits (float32, the whole vocabulary) after `question` about `image`: where the
        answer's first token is read."""
        with self.lock, self.torch.no_grad():
            self.calls += 1
            return self.model(**self._inputs(image, question)).logits[0, -1].float()

    def answer_token(self, answer: str) -> int:
        ids = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise MLLMError("bad_answer", f"model {self.cfg.model!r}: the answer {answer!r} is not one token of its tokenizer")
        return ids[0]

    def vqa_probability(self, image: Image.Image, question: str, answer: str = "Yes", top_logprobs: int = 2) -> float:
        """VQAScore as t2v-metrics computes it for open models (clip_t5_model.py: exp(-cross-entropy) of the answer
        token; qwen2vl_model.py: softmax(logits)[answer]): the softmax over the whole vocabulary of the logits at the
        first answer position, read at the answer's token (one token: "Yes")."""
        token = self.answer_token(answer)
        return float(self.torch.softmax(self.answer_logits(image, question), dim=-1)[token])

    def answer(self, images: list[Image.Image], text: str, max_tokens: int) -> str:
        """The greedy text answer to `text` about `images` (shown in order)."""
        content = [*({"type": "image", "image": downscaled(im, self.cfg.image_size)} for im in images), {"type": "text", "text": text}]
        return self._generate(self._encode([{"role": "user", "content": content}]), max_tokens, None)

    def _generate(self, inputs, max_tokens: int, seed: int | None) -> str:
        kwargs = {"do_sample": False} if seed is None else {"do_sample": True, "temperature": 0.8}
        with self.lock, self.torch.no_grad():
            self.calls += 1
            if seed is not None:
                self.torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, **kwargs)
        return self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def reason(self, image: Image.Image, question: str) -> str:
        return first_line(self._generate(self._inputs(image, question + " In one line, why?"), 48, None), 300)

    def complete(self, system: str, user: str, max_tokens: int, seed: int) -> str:
        return self._generate(self._encode([{"role": "system", "content": system}, {"role": "user", "content": user}]), max_tokens, seed)


def create_peer(cfg: MLLMConfig, cache_dir: Path | None = None, device: str = "cpu", dtype=None):
    """The peer of `cfg`: over HTTP when it has a `url`, else in-process (on `device`; `dtype` None: bfloat16
    on a GPU, the checkpoint's dtype elsewhere)."""
    return HTTPPeer(cfg) if cfg.url else LocalPeer(cfg, cache_dir, device, dtype)

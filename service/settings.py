"""The service's one Settings object: environment variables `T2I_SERVICE_*` (or a .env file).

It extends the fine-tuning settings (Redis, job directories and limits, the rewarder's config and the
prompt index), so the API and the workers read the same variables.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field
from t2i_reward.finetune.settings import FinetuneSettings
from t2i_reward.prompter.enhance import DEFAULT_SYSTEM_PROMPT
from t2i_reward.rewarders import Limits
from t2i_reward.rewarders.limits import limit_field
from t2i_reward.rewarders.mllm import MATCH_QUESTION


class Settings(FinetuneSettings):
    host: str = Field("127.0.0.1", description="Address `t2i-reward serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port `t2i-reward serve` listens on.")
    api_keys: list[str] = Field(default_factory=list, description="Accepted API keys (JSON list); empty: no auth.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413.")
    body_timeout_s: float = Field(30.0, gt=0, description="Longest time a request body may take to arrive; slower gets 408.")
    keep_freed_mb: int = Field(256, ge=0, le=65536, description="Freed memory (MB) the server keeps for the next request instead "
                               "of giving it back to the kernel (glibc): large bodies then reuse it rather than page-fault it "
                               "in again (service/memory.py); 0: the allocator's defaults.")
    max_concurrent_uploads: int = Field(32, ge=1, description="Request bodies being received at once; more gets 429.")
    max_active_jobs: int = Field(1000, ge=1, description="Most fine-tuning jobs queued or running at once, all keys together; more gets 429.")
    max_active_jobs_per_key: int = Field(100, ge=1, description="Most fine-tuning jobs queued or running at once per API key (without "
                                         "keys: for everyone together); more gets 429.")
    max_spec_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest stored job spec in bytes (its JSON, topics turned into "
                                "prompts); larger gets 413.")
    max_client_uploads: int = Field(16, ge=1, description="Request bodies being received at once from one client (its API key, "
                                    "or its address without keys); more gets 429, so one client cannot take every upload slot.")
    min_upload_bytes_per_s: int = Field(65536, ge=0, description="Slowest a request body may arrive, after a first "
                                        "`upload_grace_s`; slower gets 408 (0: only `body_timeout_s`).")
    upload_grace_s: float = Field(2.0, ge=0, description="Seconds a body may take before `min_upload_bytes_per_s` applies.")
    flow_grpo_compat: bool = Field(False, description="Serve Flow-GRPO's reward-server protocol (pickled bodies, read by the "
                                   "safe unpickler) at POST /compat/flow-grpo and /compat/flow-grpo/geneval; off: 404.")
    # the HTTP server's own limits (`t2i-reward serve`, service/server.py)
    max_header_bytes: int = Field(65536, ge=1024, le=1 << 24, description="Largest request line plus headers; larger gets 431.")
    header_timeout_s: float = Field(10.0, gt=0, description="Longest the request line and headers may take from their first "
                                    "byte; slower gets 408 and the connection is closed.")
    idle_timeout_s: float = Field(5.0, gt=0, description="A connection that sends nothing this long, before its first request "
                                  "or between requests, is closed.")
    max_connections: int = Field(1000, ge=1, description="Open connections at once; a connection beyond it is closed at "
                                 "once. `serve` raises the process's open-files limit to its hard limit and keeps this below it.")
    # the request limits: defaults and bounds from the library's (rewarders/limits.py)
    max_images: int = limit_field("max_images", "Most images in one request (a GRPO batch); more gets 422.")
    max_image_pixels: int = limit_field("max_image_pixels", "Most pixels per image, checked from the header; more gets 413.")
    max_prompt_chars: int = limit_field("max_prompt_chars", "Longest prompt in characters; longer gets 422.")
    max_request_pixels: int = limit_field("max_request_pixels", "Most pixels decoded for one request (all its images, "
                                          "after draft/reduce), checked from the headers; more gets 413.")
    max_aspect_ratio: float = limit_field("max_aspect_ratio", "Longest image side over the shortest; more gets 400 (bounds the resize's work).")
    max_metadata_bytes: int = limit_field("max_metadata_bytes", "Largest metadata object of one (prompt, image) pair, as compact "
                                          "JSON; larger gets 422.")
    max_metadata_depth: int = limit_field("max_metadata_depth", "Deepest nesting in one pair's metadata; deeper gets 422.")
    max_batch_images: int = Field(64, ge=1, description="Most images pooled into one micro-batch (run in forward passes of the rewarder's max_batch_size).")
    batch_invariant: Optional[bool] = Field(None, description="true: every pair's scores are bit-identical whatever it is "
                                            "micro-batched with (the rewarder's `batch_invariant`: forward passes of exactly "
                                            "max_batch_images pairs, the last padded; set max_batch_images near your trainers' "
                                            "batch size to bound the padding); none: the reward config decides (docs: Scores).")
    prepare_workers: Optional[int] = Field(None, ge=1, le=256, description="Threads that decode and preprocess images "
                                           "beside the model thread; default: the number of cores.")
    max_wait_ms: float = Field(0.0, ge=0, description="Extra wait for more requests before a batch runs (0: run as soon as the model is free, batching what queued meanwhile).")
    max_queue_images: int = Field(256, ge=1, description="Most images waiting for the model; more gets 429.")
    max_queue_wait_s: float = Field(60.0, gt=0, description="Longest a request waits in the queue for the model; then 504.")
    max_queue_bytes: int = Field(1 << 30, ge=1 << 20, description="Most bytes the admitted requests hold at once (their bodies "
                                 "until decoded, then their tensors and prepared pixels); more gets 429.")
    max_prepare_s: float = Field(30.0, gt=0, description="Longest a request's images may take to decode and prepare; then 504 "
                                 "(checked between images).")
    max_prepare_pixels: int = Field(80_000_000, ge=1, description="Decoded pixels the preprocessing pool holds at once, all "
                                    "requests together (two images at the default max_image_pixels); an image waits for room.")
    max_topics: int = Field(16, ge=1, le=16, description="Most topics in one /prompts request (at most the schema's 16).")
    prompt_generator: str = Field("Gustavosta/MagicPrompt-Stable-Diffusion", description="/prompts mode generate: MagicPrompt "
                                  "model (hub id, local folder, or 'tiny': a tiny random GPT-2 for tests).")
    prompt_expansion: str = Field("none", description="/prompts mode generate: Fooocus-style expansion model folder (with "
                                  "positive.txt), hub id, 'tiny', or 'none' (no expansion).")
    max_n_prompts: int = Field(100, ge=1, le=100, description="Most prompts per topic in one /prompts request (at most the schema's 100).")
    verify_threshold: float = Field(0.5, ge=0.0, le=1.0, description="/verify: an image passes when the judge's P(yes) is at least this.")
    verify_question: str = Field(MATCH_QUESTION, min_length=1, description="/verify: the yes/no question; {prompt} is the prompt.")
    enhance_system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, min_length=1, description="/prompts/enhance: the system prompt sent to the MLLM peer.")
    enhance_max_tokens: int = Field(96, ge=8, le=1024, description="/prompts/enhance: most tokens of one rewrite.")

    def limits(self) -> Limits:
        """The limits of one request, which the library checks (`rewarders.Limits`)."""
        return Limits.of(self)

    def rewarder_overrides(self) -> dict:
        """The rewarder loaded by the service gets the same limits and batch size."""
        out = {**self.limits().model_dump(), "max_batch_size": self.max_batch_images}
        if self.batch_invariant is not None:
            out["batch_invariant"] = self.batch_invariant
        return out

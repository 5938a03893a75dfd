"""The Python clients of the reward service: plain httpx, no FastAPI, so fine-tuning workers and users
import them without the server's dependencies.

    from t2i_reward.rewarders.client import RewardClient, AsyncRewardClient
    client = RewardClient("http://127.0.0.1:8000", api_key=None)
    client.reward("a red apple", ["a.png", pil_image, png_bytes])    # -> the /reward JSON as a dict
    scores = client.score_batch(prompts, images, group_ids=ids)       # raw tensors in, BatchScores out
    rewards, grad = client.reward_gradient(images_tensor, prompts)    # for ReFL workers

`transport=` takes any httpx transport (an in-process app in tests, a proxy); `AsyncRewardClient` takes
the same arguments (an async transport) and has the same methods, awaited.

Several replicas: `RewardClient("http://a:8000,http://b:8000")` (or a list) spreads calls over them in
turn. A call that finds a replica down (connection refused, reset, timeout) or busy (429, 502, 503, 504)
moves to the next one after a back-off (honouring `Retry-After`), at most `retries` times, then raises
`RewardServiceError` saying what the last attempt got. Only calls that are safe to repeat are retried
after a timeout; `submit_job` is retried only when its request never reached a server. The decision
(`_judge`: final or retry; `_next_wait`: how long, or give up) is shared by both clients.

`score_batch` sends the images as one raw tensor (safetensors, `Content-Type: application/octet-stream`)
and reads a safetensors answer: nothing is encoded as PNG, and the scores equal the library's
`check_tensor_request` + `score_checked` on the same pixels. The bodies and answers are encoded and
decoded by `wire.py`, the module the service's router uses too.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import time
from typing import Any, Hashable, Mapping, Sequence

import httpx
import numpy as np
import torch
from PIL import Image

from . import wire
from .wire import BatchScores, batch_scores_from_result  # noqa: F401  (public here too, as before wire.py held them)

# statuses that say "this replica cannot take it now", not "this request is wrong"
RETRY_STATUSES = (429, 502, 503, 504)
# the longest wait between two attempts, whatever Retry-After says
MAX_WAIT_S = 30.0


class RewardServiceError(RuntimeError):
    """The service answered with an error status, or could not be reached (`status` 0); `status` and
    `detail` say which and why."""

    def __init__(self, status: int, detail: Any):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def image_bytes(image) -> bytes:
    """PIL image -> PNG bytes; path -> file bytes; bytes pass through."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a PIL image, a path or bytes")


# ------------------------------------------------------------------------------------------------
# image batches for the tensor path

def to_image_tensor(images) -> torch.Tensor:
    """A batch of images as the tensor path takes it, on the CPU and contiguous: uint8 (B, H, W, 3) or
    float16/float32 (B, 3, H, W) in [0, 1].

    `images`: a uint8 tensor or numpy array (B, H, W, 3); a float tensor or array (B, 3, H, W) in [0, 1]
    (bfloat16 and float64 become float32); or a list of PIL images / uint8 (H, W, 3) arrays or tensors /
    float (3, H, W) tensors, all of one size (stacked). Images of different sizes: ValueError. The
    values are checked by the service (or the library), not here.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        images = _from_numpy(images)
    elif isinstance(images, (list, tuple)):
        images = _stack(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor, a numpy array or a list of images, got {type(images).__name__}")
    images = images.detach()
    if images.is_floating_point() and images.dtype not in (torch.float16, torch.float32):
        images = images.float()
    return images.cpu().contiguous()


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _stack(images: Sequence) -> torch.Tensor:
    if len(images) == 0:
        raise ValueError("no images to score")
    items = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            t = torch.from_numpy(np.array(im.convert("RGB")))
        elif isinstance(im, np.ndarray):
            t = _from_numpy(im)
        elif isinstance(im, torch.Tensor):
            t = im.detach().cpu()
        else:
            raise TypeError(f"images[{i}]: unsupported type {type(im).__name__}: pass PIL images, uint8 (H, W, 3) arrays "
                            "or float (3, H, W) tensors")
        if t.dtype == torch.uint8 and t.ndim == 3 and t.shape[2] == 3:
            size = (t.shape[1], t.shape[0])
        elif t.is_floating_point() and t.ndim == 3 and t.shape[0] == 3:
            size = (t.shape[2], t.shape[1])
        else:
            raise ValueError(f"images[{i}]: expected a uint8 (H, W, 3) or float (3, H, W) image, got {t.dtype} {tuple(t.shape)}")
        items.append((t, size))
    kinds = {t.dtype == torch.uint8 for t, _ in items}
    if len(kinds) > 1:
        raise ValueError("images mix uint8 (H, W, 3) and float (3, H, W) images: pass one kind")
    sizes = list(dict.fromkeys(size for _, size in items))
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        raise ValueError(f"images have different sizes ({listed}); one tensor call takes images of one size: "
                         "resize them, or score each size in its own call")
    return torch.stack([t for t, _ in items])


# ------------------------------------------------------------------------------------------------
# splitting a batch into requests, and joining the answers

def _prompt_list(prompts, n: int) -> str | list[str]:
    """One prompt for all (a str) or a list with one per image (checked against n)."""
    if isinstance(prompts, str):
        return prompts
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images: pass one prompt, or one per image")
    return prompts


def plan_chunks(n: int, group_ids: Sequence[Hashable] | None, chunk_size: int | None) -> list[list[int]]:
    """The image indices of each request: one request without `chunk_size`; else requests of at most
    `chunk_size` images, consecutive without group ids, and with group ids whole groups packed in order
    of first appearance (a group never spans two requests, so its advantages are the whole group's).
    A group larger than `chunk_size`: ValueError."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    if chunk_size is None or n <= chunk_size:
        return [list(range(n))]
    if group_ids is None:
        return [list(range(a, min(a + chunk_size, n))) for a in range(0, n, chunk_size)]
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    chunks: list[list[int]] = []
    current: list[int] = []
    for g, members in groups.items():
        if len(members) > chunk_size:
            raise ValueError(f"group {g!r} has {len(members)} images, more than chunk_size={chunk_size}: a group is "
                             "scored in one request so that its advantages cover the whole group; raise chunk_size")
        if len(current) + len(members) > chunk_size:
            chunks.append(current)
            current = []
        current += members
    chunks.append(current)
    return chunks


def _checked_batch(prompts, images, group_ids, chunk_size, metadata=None):
    """(the image tensor, prompts, group ids, metadata, the chunks' indices) after the local checks.
    `metadata`: None, one mapping for every image, or one mapping (or None) per image (the server checks
    what is in them)."""
    images = to_image_tensor(images)
    if images.ndim == 0 or images.shape[0] == 0:
        raise ValueError("no images to score")
    n = int(images.shape[0])
    prompts = _prompt_list(prompts, n)
    if group_ids is not None:
        group_ids = list(group_ids)
        if len(group_ids) != n:
            raise ValueError(f"{len(group_ids)} group_ids for {n} images: pass one per image")
    if metadata is not None and not isinstance(metadata, Mapping):
        metadata = list(metadata)  # a trainer's tuple of per-prompt dicts
        if len(metadata) != n:
            raise ValueError(f"{len(metadata)} metadata objects for {n} images: pass one per image, or one for all")
    return images, prompts, group_ids, metadata, plan_chunks(n, group_ids, chunk_size)


def _part(chunk: list[int], n: int, images: torch.Tensor, prompts, group_ids, metadata=None):
    """The images, prompts, group ids and metadata of one chunk."""
    if len(chunk) == n:
        return images, prompts, group_ids, metadata
    index = torch.tensor(chunk)
    return (images.index_select(0, index), prompts if isinstance(prompts, str) else [prompts[i] for i in chunk],
            None if group_ids is None else [group_ids[i] for i in chunk],
            metadata if metadata is None or isinstance(metadata, Mapping) else [metadata[i] for i in chunk])


def merge_scores(chunks: list[list[int]], parts: list[BatchScores], n: int) -> BatchScores:
    """The answers of the chunks' requests as one BatchScores, each image back in its place."""
    if len(parts) == 1:
        return parts[0]

    def scatter(get) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.float32)
        for chunk, p in zip(chunks, parts):
            out[torch.tensor(chunk)] = get(p).float()
        return out

    def scatter_all(get) -> dict[str, torch.Tensor] | None:
        if any(get(p) is None for p in parts):
            return None
        return {k: scatter(lambda p, k=k: get(p)[k]) for k in get(parts[0])}

    rewards = scatter(lambda p: p.rewards)
    errors = None
    if any(p.errors for p in parts):
        errors = [None] * n
        for chunk, p in zip(chunks, parts):
            for i, e in zip(chunk, p.errors or [None] * len(chunk)):
                errors[i] = e
    # a request-level summary covers its own chunk only: with several chunks there is none for the whole batch
    return BatchScores(rewards, scatter_all(lambda p: p.components), scatter_all(lambda p: p.advantages),
                       scatter_all(lambda p: p.percentiles), float(rewards.nanmean()), parts[0].experts,
                       extras=scatter_all(lambda p: p.extras) or {}, errors=errors, summaries=None)


def _prompts_body(topics, n_prompts, diversity, min_length, max_length, mode, seed, max_new_tokens) -> dict:
    body: dict[str, Any] = {"topics": list(topics), "n_prompts": n_prompts, "mode": mode}
    if mode == "retrieve":
        body.update(diversity=diversity, min_length=min_length, max_length=max_length)
    if seed is not None:
        body["seed"] = seed
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    return body


# ------------------------------------------------------------------------------------------------
# retries and failover, shared by both clients

_NEVER_REACHED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _judge(outcome: httpx.Response | httpx.TransportError, base_url, idempotent: bool):
    """What one attempt's outcome means: `(response, None, None)` when it is final (an error status that
    is not a retry one raises RewardServiceError), or `(None, error, retry_after)` when the call should go
    to the next replica. A transport error after the request reached a server raises at once for a call
    that is not safe to repeat."""
    if isinstance(outcome, _NEVER_REACHED):
        return None, RewardServiceError(0, f"{base_url} unreachable: {outcome}"), None
    if isinstance(outcome, httpx.TransportError):  # reached it, then lost it: repeat only what is safe to repeat
        error = RewardServiceError(0, f"{base_url}: {type(outcome).__name__}: {outcome}")
        if not idempotent:
            raise error
        return None, error, None
    if outcome.status_code in RETRY_STATUSES:
        return None, RewardServiceError(outcome.status_code, _detail(outcome)), _retry_after(outcome)
    return _check(outcome), None, None


def _next_wait(error: RewardServiceError, retry_after: float | None, attempt: int, retries: int, backoff_s: float,
               urls: Sequence[str]) -> float:
    """Seconds to wait before attempt `attempt + 1`: `Retry-After` when the server sent one, else an
    exponential back-off, at most MAX_WAIT_S. After the last attempt: RewardServiceError (giving up)."""
    if attempt >= retries:
        attempts = f"{retries + 1} attempt{'s' if retries else ''}"
        raise RewardServiceError(error.status, f"gave up after {attempts} on {', '.join(urls)}: {error.detail}")
    return min(retry_after if retry_after is not None else backoff_s * 2**attempt, MAX_WAIT_S)


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        raise RewardServiceError(r.status_code, _detail(r))
    return r


def _replica_urls(base_url: str | Sequence[str], retries: int, backoff_s: float, who: str) -> list[str]:
    urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    urls = [u.strip().rstrip("/") for u in urls if u.strip()]
    if not urls:
        raise ValueError(f"{who} needs at least one service URL")
    if retries < 0 or backoff_s < 0:
        raise ValueError("retries and backoff_s must be >= 0")
    return urls


# ------------------------------------------------------------------------------------------------

class _Replicas:
    """One pooled httpx client per replica (connections kept alive), taken in turn; the sync and async
    clients differ only in the httpx class."""

    _http = httpx.Client

    def __init__(self, base_url: str | Sequence[str], api_key: str | None = None, timeout: float = 120.0,
                 transport=None, retries: int = 2, backoff_s: float = 0.5):
        urls = _replica_urls(base_url, retries, backoff_s, type(self).__name__)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients = [self._http(base_url=u, headers=headers, timeout=timeout, transport=transport) for u in urls]
        self._turn = itertools.count()
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def urls(self) -> list[str]:
        return [str(c.base_url) for c in self._clients]


class RewardClient(_Replicas):
    """The sync client (`transport`: an httpx.BaseTransport)."""

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs) -> httpx.Response:
        """One call, on the replicas in turn; transient failures go to the next one (see the module doc)."""
        for attempt in itertools.count():
            client = self._clients[next(self._turn) % len(self._clients)]
            try:
                outcome = client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                outcome = e
            response, error, retry_after = _judge(outcome, client.base_url, idempotent)
            if response is not None:
                return response
            time.sleep(_next_wait(error, retry_after, attempt, self.retries, self.backoff_s, self.urls))
        raise AssertionError("unreachable")

    def _check(self, r: httpx.Response) -> httpx.Response:
        return _check(r)

    def reward(self, prompt: str | Sequence[str], images: Sequence, weights: Mapping[str, float] | None = None,
               metadata: Mapping | Sequence | None = None) -> dict:
        """POST /reward: `{"mean_reward", "component_rewards", "images": [...], "experts": {...}}`."""
        body = wire.encode_json_request(prompt, [image_bytes(im) for im in images], weights, metadata)
        return self._request("POST", "/reward", json=body).json()

    def score_batch(self, prompts: str | Sequence[str], images, group_ids: Sequence[Hashable] | None = None,
                    weights: Mapping[str, float] | None = None, explain: bool = False,
                    chunk_size: int | None = None, metadata: Mapping | Sequence | None = None) -> BatchScores:
        """POST /reward with the images as one raw tensor (safetensors in, safetensors out): BatchScores.

        `prompts`: one for all images or one per image. `images`: see `to_image_tensor` (uint8
        (B, H, W, 3), float (B, 3, H, W) in [0, 1], or a list of same-size PIL images / arrays).
        `group_ids`: one str|int per image; the answer then holds group advantages. `weights`: expert ->
        weight for this call. `explain`: per-expert percentiles. `metadata`: one JSON object per image (or
        one for all) for the experts that read it (geneval's record, ocr's `text`).

        `chunk_size`: None sends one request (a server refuses more than its `max_images` with 422); else
        requests of at most `chunk_size` images, one after another, joined in order. With `group_ids`,
        whole groups go into each request, so advantages are always computed over whole groups (ValueError
        when one group is larger than `chunk_size`). Batch-level experts (diversity) score each request
        on its own images, so with such an expert chunking changes their scores.
        """
        images, prompts, group_ids, metadata, chunks = _checked_batch(prompts, images, group_ids, chunk_size, metadata)
        n = int(images.shape[0])
        parts = []
        for chunk in chunks:
            ims, ps, gs, ms = _part(chunk, n, images, prompts, group_ids, metadata)
            body = wire.encode_tensor_request(ims, ps, weights, gs, explain, ms)
            parts.append(_scores(self._request("POST", "/reward", content=body, headers=wire.TENSOR_HEADERS)))
        return merge_scores(chunks, parts, n)

    def reward_gradient(
        self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
        metadata: Mapping | Sequence | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """POST /reward/gradient: (rewards (B,), d(sum of rewards)/d(images) (B, 3, H, W)) for a [0, 1] tensor.

        Chain rule across the network: `images.backward(-grad)` on the worker maximises the reward.
        """
        out = self.reward_tensors(images, prompts, weights, metadata)
        return out["rewards"].to(images.device), out["grad"].to(images.device, images.dtype)

    def reward_tensors(
        self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
        metadata: Mapping | Sequence | None = None,
    ) -> dict[str, torch.Tensor]:
        """POST /reward/gradient, the whole answer (CPU tensors): `rewards`, `grad` and `components.<expert>`."""
        body = wire.encode_tensor_request(images, prompts, weights, metadata=metadata)
        r = self._request("POST", "/reward/gradient", content=body, headers={"content-type": wire.OCTET})
        return wire.decode_gradient_answer(r.content)

    def prompts(self, topics: Sequence[str], n_prompts: int, diversity: float = 0.0,
                min_length: int | None = None, max_length: int | None = None, *, mode: str = "retrieve",
                seed: int | None = None, max_new_tokens: int | None = None) -> dict:
        """POST /prompts: `{"prompts": [[...] per topic], "scores": [[...] per topic] or null, "seed"}`.
        `mode="generate"` generates them (MagicPrompt, then the service's expansion) with `seed`."""
        body = _prompts_body(topics, n_prompts, diversity, min_length, max_length, mode, seed, max_new_tokens)
        return self._request("POST", "/prompts", json=body).json()

    def submit_job(self, spec: Mapping[str, Any]) -> str:
        """POST /jobs: the new job's id."""
        return self._request("POST", "/jobs", json=dict(spec), idempotent=False).json()["id"]

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/jobs/{job_id}").json()

    def jobs(self, offset: int = 0, limit: int = 20) -> dict:
        return self._request("GET", "/jobs", params={"offset": offset, "limit": limit}).json()

    def cancel_job(self, job_id: str) -> str:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()["status"]

    def artifact(self, job_id: str, name: str) -> bytes:
        return self._request("GET", f"/jobs/{job_id}/artifacts/{name}").content

    def models(self) -> dict:
        return self._request("GET", "/models").json()

    def ready(self) -> bool:
        """True when every replica answers /readyz with 200."""
        return all(c.get("/readyz").status_code == 200 for c in self._clients)

    def wait_ready(self, timeout: float = 600.0, interval: float = 0.2) -> None:
        """Block until /readyz answers 200 (a refused connection counts as not ready yet); TimeoutError after `timeout` s."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{', '.join(self.urls)} was not ready within {timeout:.0f} s")
            time.sleep(interval)


class AsyncRewardClient(_Replicas):
    """The asyncio twin of `RewardClient`: the same arguments (`transport` an async httpx transport), the
    same replicas, retries and failover, and the same methods, awaited. Close it with `await aclose()`
    or use `async with AsyncRewardClient(...) as client:`.

    `score_batch` with `chunk_size` sends its requests concurrently, at most one per replica at a time.
    """

    _http = httpx.AsyncClient  # `transport`: an httpx.AsyncBaseTransport

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients))

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs) -> httpx.Response:
        """One call, on the replicas in turn; transient failures go to the next one (see the module doc)."""
        for attempt in itertools.count():
            client = self._clients[next(self._turn) % len(self._clients)]
            try:
                outcome = await client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                outcome = e
            response, error, retry_after = _judge(outcome, client.base_url, idempotent)
            if response is not None:
                return response
            await asyncio.sleep(_next_wait(error, retry_after, attempt, self.retries, self.backoff_s, self.urls))
        raise AssertionError("unreachable")

    async def reward(self, prompt: str | Sequence[str], images: Sequence, weights: Mapping[str, float] | None = None,
                     metadata: Mapping | Sequence | None = None) -> dict:
        """POST /reward: `{"mean_reward", "component_rewards", "images": [...], "experts": {...}}`."""
        body = wire.encode_json_request(prompt, [image_bytes(im) for im in images], weights, metadata)
        return (await self._request("POST", "/reward", json=body)).json()

    async def score_batch(self, prompts: str | Sequence[str], images, group_ids: Sequence[Hashable] | None = None,
                          weights: Mapping[str, float] | None = None, explain: bool = False,
                          chunk_size: int | None = None, metadata: Mapping | Sequence | None = None) -> BatchScores:
        """`RewardClient.score_batch`, awaited; the chunks' requests run concurrently (one per replica at a time)."""
        images, prompts, group_ids, metadata, chunks = _checked_batch(prompts, images, group_ids, chunk_size, metadata)
        n = int(images.shape[0])
        slots = asyncio.Semaphore(len(self._clients))

        async def send(chunk: list[int]) -> BatchScores:
            ims, ps, gs, ms = _part(chunk, n, images, prompts, group_ids, metadata)
            body = wire.encode_tensor_request(ims, ps, weights, gs, explain, ms)
            async with slots:
                r = await self._request("POST", "/reward", content=body, headers=wire.TENSOR_HEADERS)
            return _scores(r)

        parts = await asyncio.gather(*(send(c) for c in chunks))
        return merge_scores(chunks, list(parts), n)

    async def reward_gradient(
        self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
        metadata: Mapping | Sequence | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """POST /reward/gradient: (rewards (B,), d(sum of rewards)/d(images)), on the images' device and dtype."""
        out = await self.reward_tensors(images, prompts, weights, metadata)
        return out["rewards"].to(images.device), out["grad"].to(images.device, images.dtype)

    async def reward_tensors(
        self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None,
        metadata: Mapping | Sequence | None = None,
    ) -> dict[str, torch.Tensor]:
        """POST /reward/gradient, the whole answer (CPU tensors): `rewards`, `grad` and `components.<expert>`."""
        body = wire.encode_tensor_request(images, prompts, weights, metadata=metadata)
        r = await self._request("POST", "/reward/gradient", content=body, headers={"content-type": wire.OCTET})
        return wire.decode_gradient_answer(r.content)

    async def prompts(self, topics: Sequence[str], n_prompts: int, diversity: float = 0.0,
                      min_length: int | None = None, max_length: int | None = None, *, mode: str = "retrieve",
                      seed: int | None = None, max_new_tokens: int | None = None) -> dict:
        """POST /prompts (see `RewardClient.prompts`)."""
        body = _prompts_body(topics, n_prompts, diversity, min_length, max_length, mode, seed, max_new_tokens)
        return (await self._request("POST", "/prompts", json=body)).json()

    async def models(self) -> dict:
        return (await self._request("GET", "/models")).json()

    async def ready(self) -> bool:
        """True when every replica answers /readyz with 200."""
        answers = await asyncio.gather(*(c.get("/readyz") for c in self._clients))
        return all(r.status_code == 200 for r in answers)

    async def wait_ready(self, timeout: float = 600.0, interval: float = 0.2) -> None:
        """Wait until /readyz answers 200 (a refused connection counts as not ready yet); TimeoutError after `timeout` s."""
        end = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{', '.join(self.urls)} was not ready within {timeout:.0f} s")
            await asyncio.sleep(interval)


def _scores(r: httpx.Response) -> BatchScores:
    """A /reward answer, safetensors (asked for) or JSON (a server that ignores Accept), as BatchScores."""
    return wire.decode_scores(wire.media_type(r.headers.get("content-type")), r.content)


def _detail(r: httpx.Response) -> Any:
    try:
        return r.json().get("detail")
    except (ValueError, AttributeError):
        return r.text


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None

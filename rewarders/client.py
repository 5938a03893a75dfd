"""The Python client of the reward service: plain httpx, no FastAPI, so fine-tuning workers and users
import it without the server's dependencies.

    from rewarders.client import RewardClient
    client = RewardClient("http://127.0.0.1:8000", api_key=None)
    client.reward("a red apple", ["a.png", pil_image, png_bytes])    # -> the /reward JSON as a dict
    rewards, grad = client.reward_gradient(images_tensor, prompts)    # for ReFL workers

`transport=` takes any httpx transport (an in-process app in tests, a proxy).

Several replicas: `RewardClient("http://a:8000,http://b:8000")` (or a list) spreads calls over them in
turn. A call that finds a replica down (connection refused, reset, timeout) or busy (429, 502, 503, 504)
moves to the next one after a back-off (honouring `Retry-After`), at most `retries` times, then raises
`RewardServiceError` saying what the last attempt got. Only calls that are safe to repeat are retried
after a timeout; `submit_job` is retried only when its request never reached a server.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import time
from typing import Any, Mapping, Sequence

import httpx
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


# statuses that say "this replica cannot take it now", not "this request is wrong"
RETRY_STATUSES = (429, 502, 503, 504)


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


class RewardClient:
    def __init__(self, base_url: str | Sequence[str], api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 2, backoff_s: float = 0.5):
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not urls:
            raise ValueError("RewardClient needs at least one service URL")
        if retries < 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients = [httpx.Client(base_url=u, headers=headers, timeout=timeout, transport=transport) for u in urls]
        self._turn = itertools.count()
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def urls(self) -> list[str]:
        return [str(c.base_url) for c in self._clients]

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs) -> httpx.Response:
        """One call, on the replicas in turn; transient failures go to the next one (see the module doc)."""
        for attempt in range(self.retries + 1):
            client = self._clients[next(self._turn) % len(self._clients)]
            last = attempt == self.retries
            try:
                r = client.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:  # never reached a server
                error, wait = RewardServiceError(0, f"{client.base_url} unreachable: {e}"), None
            except httpx.TransportError as e:  # reached it, then lost it: repeat only what is safe to repeat
                error, wait = RewardServiceError(0, f"{client.base_url}: {type(e).__name__}: {e}"), None
                if not idempotent:
                    raise error from None
            else:
                if r.status_code not in RETRY_STATUSES:
                    return self._check(r)
                error, wait = RewardServiceError(r.status_code, _detail(r)), _retry_after(r)
            if last:
                attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
                raise RewardServiceError(error.status, f"gave up after {attempts} on {', '.join(self.urls)}: {error.detail}") from None
            time.sleep(min(wait if wait is not None else self.backoff_s * 2**attempt, 30.0))
        raise AssertionError("unreachable")

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            raise RewardServiceError(r.status_code, _detail(r))
        return r

    def reward(self, prompt: str, images: Sequence, weights: Mapping[str, float] | None = None) -> dict:
        """POST /reward: `{"mean_reward", "component_rewards", "images": [...], "experts": {...}}`."""
        body = {"prompt": prompt, "images": [base64.b64encode(image_bytes(im)).decode() for im in images]}
        if weights is not None:
            body["weights"] = dict(weights)
        return self._request("POST", "/reward", json=body).json()

    def reward_gradient(
        self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """POST /reward/gradient: (rewards (B,), d(sum of rewards)/d(images) (B, 3, H, W)) for a [0, 1] tensor.

        Chain rule across the network: `images.backward(-grad)` on the worker maximises the reward.
        """
        out = self.reward_tensors(images, prompts, weights)
        return out["rewards"].to(images.device), out["grad"].to(images.device, images.dtype)

    def reward_tensors(
        self, images: torch.Tensor, prompts: str | Sequence[str], weights: Mapping[str, float] | None = None
    ) -> dict[str, torch.Tensor]:
        """POST /reward/gradient, the whole answer (CPU tensors): `rewards`, `grad` and `components.<expert>`."""
        meta = {"prompts": json.dumps(prompts if isinstance(prompts, str) else list(prompts))}
        if weights is not None:
            meta["weights"] = json.dumps(dict(weights))
        payload = save_safetensors({"images": images.detach().cpu().contiguous()}, metadata=meta)
        r = self._request("POST", "/reward/gradient", content=payload, headers={"content-type": "application/octet-stream"})
        return load_safetensors(r.content)

    def prompts(self, topics: Sequence[str], n_prompts: int, diversity: float = 0.0,
                min_length: int | None = None, max_length: int | None = None) -> dict:
        """POST /prompts: `{"prompts": [[...] per topic], "scores": [[...] per topic]}`."""
        body = {"topics": list(topics), "n_prompts": n_prompts, "diversity": diversity,
                "min_length": min_length, "max_length": max_length}
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
        import time

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


def _detail(r: httpx.Response) -> Any:
    try:
        return r.json().get("detail")
    except (ValueError, AttributeError):
        return r.text


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None

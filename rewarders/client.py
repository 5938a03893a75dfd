"""The Python client of the reward service: plain httpx, no FastAPI, so fine-tuning workers and users
import it without the server's dependencies.

    from rewarders.client import RewardClient
    client = RewardClient("http://127.0.0.1:8000", api_key=None)
    client.reward("a red apple", ["a.png", pil_image, png_bytes])    # -> the /reward JSON as a dict
    rewards, grad = client.reward_gradient(images_tensor, prompts)    # for ReFL workers

`transport=` takes any httpx transport (an in-process app in tests, a proxy, retries).
"""

from __future__ import annotations

import base64
import io
import json
import os
from typing import Any, Mapping, Sequence

import httpx
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


class RewardServiceError(RuntimeError):
    """The service answered with an error status; `status` and `detail` say which and why."""

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
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0, transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            raise RewardServiceError(r.status_code, detail)
        return r

    def reward(self, prompt: str, images: Sequence, weights: Mapping[str, float] | None = None) -> dict:
        """POST /reward: `{"mean_reward", "component_rewards", "images": [...], "experts": {...}}`."""
        body = {"prompt": prompt, "images": [base64.b64encode(image_bytes(im)).decode() for im in images]}
        if weights is not None:
            body["weights"] = dict(weights)
        return self._check(self._http.post("/reward", json=body)).json()

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
        r = self._check(self._http.post("/reward/gradient", content=payload, headers={"content-type": "application/octet-stream"}))
        return load_safetensors(r.content)

    def prompts(self, topics: Sequence[str], n_prompts: int, diversity: float = 0.0,
                min_length: int | None = None, max_length: int | None = None) -> dict:
        """POST /prompts: `{"prompts": [[...] per topic], "scores": [[...] per topic]}`."""
        body = {"topics": list(topics), "n_prompts": n_prompts, "diversity": diversity,
                "min_length": min_length, "max_length": max_length}
        return self._check(self._http.post("/prompts", json=body)).json()

    def submit_job(self, spec: Mapping[str, Any]) -> str:
        """POST /jobs: the new job's id."""
        return self._check(self._http.post("/jobs", json=dict(spec))).json()["id"]

    def job(self, job_id: str) -> dict:
        return self._check(self._http.get(f"/jobs/{job_id}")).json()

    def jobs(self, offset: int = 0, limit: int = 20) -> dict:
        return self._check(self._http.get("/jobs", params={"offset": offset, "limit": limit})).json()

    def cancel_job(self, job_id: str) -> str:
        return self._check(self._http.post(f"/jobs/{job_id}/cancel")).json()["status"]

    def artifact(self, job_id: str, name: str) -> bytes:
        return self._check(self._http.get(f"/jobs/{job_id}/artifacts/{name}")).content

    def models(self) -> dict:
        return self._check(self._http.get("/models")).json()

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

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
                raise TimeoutError(f"{self._http.base_url} was not ready within {timeout:.0f} s")
            time.sleep(interval)

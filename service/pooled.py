"""The mixture across pools, without Ray: what a pool replica runs (`Pool`) and what the ingress scores with
(`PooledMixture`). service/ray_serve.py puts each behind a Ray Serve deployment; the tests also join them
in one process.

- A `Pool` holds a `Mixture` of its experts only (rewarders/pools.py: which experts), loaded on its model
  thread. It answers `info()` (what the ingress needs to know of its experts), `check(...)` (its experts'
  own per-pair checks) and `score(...)`: the raw per-expert `Scores` of a run of requests whose pixels the
  ingress already prepared, computed by the same `Mixture._scores` as in one process.
- A `PooledMixture` is a `Mixture` whose experts are stand-ins (`PooledExpert`: their input, checkpoint,
  normalisation, what they need of a request) for the experts in the pools. Everything the single-process
  service does before and after the models is the `Mixture`'s own code, run once in the ingress: the checks
  and limits, decoding and preparing the pixels of every input the pools read (each once per image), and
  after the pools answered, the totals, means, advantages, percentiles and summaries (`Mixture.results`).
  Only `_scores` differs: the run goes to every pool at once (`call`), and their `Scores` are merged.

The differentiable path is not served: a gradient runs every expert's backward pass on one tensor, so the
pools' processes (and machines) would have to send activations' gradients back and forth; the pooled
mixture answers 501 (`NotServed`) and the single-process service serves `/reward/gradient`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import torch
from t2i_reward.rewarders import Limits, Mixture
from t2i_reward.rewarders.calibration import load_calibration
from t2i_reward.rewarders.config import RewardConfig
from t2i_reward.rewarders.factory import create_rewarder
from t2i_reward.rewarders.images import Preprocess
from t2i_reward.rewarders.mixture import Scores
from t2i_reward.rewarders.pools import plan_pools
from t2i_reward.rewarders.registry import Expert

from .batcher import model_thread_executor
from .errors import NotServed

log = logging.getLogger(__name__)

GRADIENT_NOT_SERVED = ("gradients are not served on Ray: one needs every expert's backward pass on the "
                       "same tensor, and the experts run in separate pools; use the single-process service "
                       "(`t2i-reward serve`) for gradients")


def pool_config(config: RewardConfig, experts: Sequence[str]) -> RewardConfig:
    """The config of a pool: the same settings, only its experts, no calibration (the ingress places the
    scores in it)."""
    return config.model_copy(update={"experts": {n: config.experts[n] for n in experts}, "calibration": None})


class PreparedPixels:
    """`Pixels` for inputs the ingress prepared: a tensor per spec for the whole run, sliced per batch."""

    def __init__(self, pixels: Mapping[Preprocess, torch.Tensor], device: torch.device):
        self.pixels = pixels
        self.device = device

    def get(self, spec: Preprocess, start: int, stop: int) -> torch.Tensor:
        return self.pixels[spec][start:stop].to(self.device, non_blocking=True)


class Pool:
    """One pool replica's work: its experts' mixture, on the one model thread that loaded it."""

    def __init__(self, name: str, config: RewardConfig, experts: Sequence[str]):
        self.name = name
        self.executor = model_thread_executor()  # loaded where it runs: its OpenMP team is the process's only one
        self.mixture = self.executor.submit(create_rewarder, pool_config(config, experts)).result()
        log.info("pool %s ready: %s", name, ", ".join(self.mixture.experts))

    def info(self) -> dict:
        """What the ingress needs to know of this pool's experts (`PooledExpert`) and of the inputs it reads."""
        m = self.mixture
        experts = {}
        for n, e in m.experts.items():
            experts[n] = {
                "preprocess": e.preprocess, "checkpoint": e.checkpoint, "random_weights": e.random_weights,
                "clip_spec": e.clip_spec, "describe": e.describe(), "default_mean": e.default_mean,
                "default_std": e.default_std, "batch_level": bool(getattr(e, "batch_level", False)),
                "min_images": getattr(e, "min_images", 1), "uses_metadata": e.uses_metadata,
                "metadata_fields": tuple(e.metadata_fields),
                "checks_pairs": type(e).check_pair is not Expert.check_pair,
            }
        return {"name": self.name, "experts": experts, "input_specs": m.input_specs}

    def check(self, prompts: list[str], metadata, limits: Limits) -> None:
        """Its experts' checks of each pair (`check_pair`, metadata fields): InvalidRequestError names the first problem."""
        self.mixture.check_metadata(prompts, metadata, limits)

    def score(self, pixels: Mapping[Preprocess, torch.Tensor], prompts: list[str], groups: Sequence[int],
              metadata: Sequence[dict] | None, group_ids: Sequence | None = None) -> tuple[Scores, list[tuple[str, float]]]:
        """Its experts' raw scores of a run of requests (`groups`: their sizes) and the seconds of each
        backbone and expert pass (the ingress's metrics). Call it on `executor`, the model thread."""
        timings: list[tuple[str, float]] = []
        scores = self.mixture._scores(PreparedPixels(pixels, self.mixture.device), prompts, groups, metadata,
                                      lambda name, s: timings.append((name, s)), group_ids=group_ids)
        return scores, timings


class PooledExpert(Expert):
    """Stand-in for an expert that runs in a pool: what the ingress's mixture reads of it (its input, its
    checkpoint, its normalisation, what it needs of a request). Its own per-pair checks run in the pool
    (`PooledMixture.check_metadata`), and its model only there."""

    def __init__(self, name: str, pool: str, info: dict):
        super().__init__(info["preprocess"], info["checkpoint"], info["random_weights"], info["clip_spec"])
        self.name = name  # per instance: the class is shared by every stand-in
        self.pool = pool
        self.default_mean, self.default_std = info["default_mean"], info["default_std"]
        self.batch_level, self.min_images = info["batch_level"], info["min_images"]
        self.uses_metadata, self.metadata_fields = info["uses_metadata"], info["metadata_fields"]
        self.checks_pairs = info["checks_pairs"]
        self._describe = info["describe"]

    def describe(self) -> dict:
        return dict(self._describe)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"expert {self.name!r} runs in pool {self.pool!r}, not here")


# call(pool, method, *args) -> the pool's answer, raising what the pool raised (a RewardError as itself)
PoolCall = Callable[..., Any]


class PooledMixture(Mixture):
    """The ingress's mixture: `Mixture`'s checks, preparation and results over experts that run in pools.

    `infos`: each pool's `Pool.info()`; `call(pool, method, *args)` runs a `Pool` method there; `executor`
    runs the calls to several pools at once (the gather waits on all)."""

    differentiable = False

    def __init__(self, config: RewardConfig, infos: Mapping[str, dict], call: PoolCall, executor: ThreadPoolExecutor | None = None):
        experts = {}
        for pool, info in infos.items():
            for name, e in info["experts"].items():
                experts[name] = PooledExpert(name, pool, e)
        missing = [n for n in config.experts if n not in experts]
        if missing:
            raise RuntimeError(f"no pool holds {', '.join(missing)}")
        experts = {n: experts[n] for n in config.experts}  # the config's order: the answers' order
        # no backbones here: the inputs to prepare are the pools' (`input_specs`), the models run there
        super().__init__(config, experts, [], torch.device("cpu"), torch.float32)
        self.pools = {pool: info for pool, info in infos.items()}
        self._specs = list(dict.fromkeys(s for info in infos.values() for s in info["input_specs"]))
        self._call = call
        self._fan = executor or ThreadPoolExecutor(max_workers=max(1, len(infos)), thread_name_prefix="t2i-pools")
        if config.calibration:
            self.calibration = load_calibration(config.calibration, config.cache_dir)

    @property
    def input_specs(self) -> list[Preprocess]:
        """Every input any pool reads, each prepared once per image by the ingress."""
        return self._specs

    def check_metadata(self, prompts: Sequence[str], metadata, limits: Limits | None = None) -> list[dict] | None:
        """The mixture's checks here (the metadata's form, each expert's fields), then those of the pools whose
        experts check pairs themselves (`check_pair`), concurrently, before any model runs."""
        checked = super().check_metadata(prompts, metadata, limits)
        pools = list(dict.fromkeys(e.pool for e in self.experts.values() if e.checks_pairs))
        args = (list(prompts), checked, limits or self.limits)
        for f in [self._fan.submit(self._call, pool, "check", *args) for pool in pools]:
            f.result()
        return checked

    def _scores(self, pixels, prompts: list[str], groups: Sequence[int], metadata: Sequence[dict] | None,
                on_timing=None, group_ids: Sequence | None = None) -> Scores:
        """Every pool's raw scores of the run, asked of all pools at once, each sent the inputs it reads."""
        self.check_group_sizes(groups)
        n = len(prompts)
        futures = []
        for pool, info in self.pools.items():
            inputs = {spec: pixels.get(spec, 0, n) for spec in info["input_specs"]}
            futures.append(self._fan.submit(self._call, pool, "score", inputs, prompts, list(groups), metadata, group_ids))
        try:
            answers = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        if on_timing is not None:
            for _, timings in answers:
                for name, seconds in timings:
                    on_timing(name, seconds)
        return Scores.merge([scores for scores, _ in answers], list(self.experts))

    def forward(self, *args, **kwargs):
        raise NotServed(GRADIENT_NOT_SERVED)

    score_tensor = forward

    def reward_and_gradient_many(self, *args, **kwargs):
        raise NotServed(GRADIENT_NOT_SERVED)


def local_pools(config: RewardConfig) -> dict[str, Pool]:
    """Every pool of the config in this process (tests, and the parity check against one mixture)."""
    return {name: Pool(name, config, experts) for name, experts in plan_pools(list(config.experts), config.ray).items()}


def pooled_over_local(config: RewardConfig, pools: Mapping[str, Pool]) -> PooledMixture:
    """A `PooledMixture` whose pools are `Pool`s in this process, each called on its own model thread."""
    def call(pool: str, method: str, *args):
        p = pools[pool]
        if method == "score":
            return p.executor.submit(p.score, *args).result()
        return getattr(p, method)(*args)

    return PooledMixture(config, {name: p.info() for name, p in pools.items()}, call)

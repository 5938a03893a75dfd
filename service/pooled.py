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

A pool can be down (no replica placed: its node is missing; or its replicas stopped answering): the mixture
still knows its experts from the config (`plan_pools`), so the answers keep their form. Its experts fail
their pairs as an expert that raised does in one process (`ExpertOutput` errors, null components, the total
renormalised) when they are optional or weighted 0 by the request; a request that needs a required expert
of a pool that is down is answered 503 with Retry-After (`Unavailable`), before any pool works on it. The
caller marks pools up (`pool_up`, with their `info()`) and sees which are down (`down`); a call that fails
marks its pool down, so later requests do not wait on it.

The differentiable path is not served: a gradient runs every expert's backward pass on one tensor, so the
pools' processes (and machines) would have to send activations' gradients back and forth; the pooled
mixture answers 501 (`NotServed`) and the single-process service serves `/reward/gradient`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np
import torch
from t2i_reward.rewarders import Limits, Mixture
from t2i_reward.rewarders.calibration import load_calibration
from t2i_reward.rewarders.config import RewardConfig
from t2i_reward.rewarders.factory import create_rewarder
from t2i_reward.rewarders.images import Preprocess
from t2i_reward.rewarders.inputs import Checked
from t2i_reward.rewarders.mixture import RewardResult, Scores
from t2i_reward.rewarders.pools import plan_pools
from t2i_reward.rewarders.registry import Expert, get_expert_class

from .batcher import model_thread_executor
from .errors import NotServed, Unavailable

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # a pool's replica restarted or placed again takes seconds (the tiny models); a model of several GB longer

GRADIENT_NOT_SERVED = ("gradients are not served on Ray: one needs every expert's backward pass on the "
                       "same tensor, and the experts run in separate pools; use the single-process service "
                       "(`t2i-reward serve`) for gradients")


def pool_config(config: RewardConfig, experts: Sequence[str]) -> RewardConfig:
    """The config of a pool: the same settings, only its experts, no calibration (the ingress places the
    scores in it)."""
    return config.model_copy(update={"experts": {n: config.experts[n] for n in experts}, "calibration": None})


class PreparedPixels:
    """`Pixels` for inputs the ingress prepared: an array per spec for the whole run (`to_wire`), sliced per batch."""

    def __init__(self, pixels: Mapping[Preprocess, np.ndarray], device: torch.device):
        # a copy each: Ray hands the arrays over read-only, from its object store
        self.pixels = {spec: torch.from_numpy(np.array(a)) for spec, a in pixels.items()}
        self.device = device

    def get(self, spec: Preprocess, start: int, stop: int) -> torch.Tensor:
        return self.pixels[spec][start:stop].to(self.device, non_blocking=True)


def to_wire(pixels: torch.Tensor) -> np.ndarray:
    """Prepared pixels as the ingress sends them to a pool: a numpy array. Why: Ray pickles a torch tensor
    in-band, its bytes copied into the pickle and out again; a numpy array's buffer goes out-of-band, through
    the object store (32 images at 224 px: 68 ms per call as a tensor, 16 ms as an array on the 2-core VM,
    benchmarks/ray_transfer.py, docs/benchmarks.md)."""
    return pixels.contiguous().numpy()


def traits(e: Expert | type[Expert]) -> dict:
    """What an expert (loaded: its own values; or its class: the defaults) says of itself that the ingress's
    stand-in needs: its normalisation, what it needs of a request, which checks its pool runs for it."""
    cls = e if isinstance(e, type) else type(e)
    return {"default_mean": e.default_mean, "default_std": e.default_std, "batch_level": bool(getattr(e, "batch_level", False)),
            "min_images": getattr(e, "min_images", 1), "uses_metadata": e.uses_metadata,
            "metadata_fields": tuple(e.metadata_fields), "checks_pairs": cls.check_pair is not Expert.check_pair,
            "uses_group_ids": bool(getattr(e, "uses_group_ids", False))}


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
                "clip_spec": e.clip_spec, "describe": e.describe(), **traits(e),
            }
        return {"name": self.name, "experts": experts, "input_specs": m.input_specs}

    def check(self, prompts: list[str], metadata, limits: Limits) -> None:
        """Its experts' checks of each pair (`check_pair`, metadata fields): InvalidRequestError names the first problem."""
        self.mixture.check_metadata(prompts, metadata, limits)

    def check_groups(self, prompts: list[str], group_ids: Sequence | None) -> None:
        """Its group-scoring experts' checks of each group of one request (`check_group`)."""
        self.mixture.check_groups(prompts, group_ids)

    def score(self, pixels: Mapping[Preprocess, np.ndarray], prompts: list[str], groups: Sequence[int],
              metadata: Sequence[dict] | None, group_ids: Sequence | None = None) -> tuple[Scores, list[tuple[str, float]]]:
        """Its experts' raw scores of a run of requests (`groups`: their sizes) and the seconds of each
        backbone and expert pass (the ingress's metrics). Call it on `executor`, the model thread."""
        timings: list[tuple[str, float]] = []
        scores = self.mixture._scores(PreparedPixels(pixels, self.mixture.device), prompts, groups, metadata,
                                      lambda name, s: timings.append((name, s)), group_ids=group_ids)
        return scores, timings


# one `Pool.score` call's arguments: (pixels by input, prompts, request sizes, metadata or None, group ids per request or None)
ScoreCall = tuple


def merge_calls(calls: Sequence[ScoreCall]) -> ScoreCall:
    """Several `Pool.score` calls (micro-batches that queued at a pool replica) as one: their pairs and
    requests one after the other, so the replica runs them in one run of forward passes (`split_answer`
    hands each call its part back)."""
    if len(calls) == 1:
        return calls[0]
    specs = calls[0][0].keys()
    pixels = {spec: np.concatenate([c[0][spec] for c in calls]) for spec in specs}
    prompts = [p for c in calls for p in c[1]]
    groups = [g for c in calls for g in c[2]]
    metadata = None
    if any(c[3] is not None for c in calls):  # pairs without metadata have none ({}), as `check_metadata` gives them
        metadata = [m for c in calls for m in (c[3] if c[3] is not None else [{}] * len(c[1]))]
    group_ids = None
    if any(c[4] is not None for c in calls):
        group_ids = [g for c in calls for g in (c[4] if c[4] is not None else [None] * len(c[2]))]
    return pixels, prompts, groups, metadata, group_ids


def split_answer(answer: tuple[Scores, list], calls: Sequence[ScoreCall]) -> list[tuple[Scores, list]]:
    """`Pool.score`'s answer to `merge_calls(calls)` as each call's own: its pairs' scores, extras and errors
    (renumbered from 0), its requests' summaries; the passes' timings go with the first call (counted once)."""
    if len(calls) == 1:
        return [answer]
    scores, timings = answer
    out, a, r = [], 0, 0
    for i, c in enumerate(calls):
        n, m = len(c[1]), len(c[2])
        part = scores.part(a, a + n)
        part.summaries = scores.summaries[r:r + m]
        out.append((part, timings if i == 0 else []))
        a, r = a + n, r + m
    return out


class CallMerger:
    """A pool replica's `merge_calls`: the `Pool.score` calls that arrive while a run is on the model thread
    wait here, and the next run takes them all (at most `cap`) as one (`merge_calls`, `split_answer`). A merged
    run that fails is run again call by call, so one call's error (a bad pair, a model error) reaches only its
    caller. `stats`: runs, calls, the largest run, the fallbacks. Lives on the replica's event loop."""

    def __init__(self, run: Callable[[ScoreCall], Awaitable[tuple[Scores, list]]], cap: int):
        self.run, self.cap = run, max(1, cap)
        self.pending: list[tuple[ScoreCall, asyncio.Future]] = []
        self._task: asyncio.Task | None = None  # the drain running now, if any (held: the loop keeps a weak reference)
        self.stats = {"runs": 0, "calls": 0, "largest": 0, "fallbacks": 0}

    async def __call__(self, call: ScoreCall) -> tuple[Scores, list]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((call, future))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        # why no flag: between its last look at `pending` and its end the task never yields, so a call that finds
        # it done has nobody else to run it
        while self.pending:
            taken, self.pending = self.pending[:self.cap], self.pending[self.cap:]
            try:
                answers = await self._score([call for call, _ in taken])
            except BaseException as e:  # never leave a caller waiting
                answers = [(False, e)] * len(taken)
            for (_, future), (ok, value) in zip(taken, answers):
                if not future.done():  # done: its caller gave up
                    future.set_result(value) if ok else future.set_exception(value)

    async def _score(self, calls: list[ScoreCall]) -> list[tuple[bool, Any]]:
        self.stats["runs"] += 1
        self.stats["calls"] += len(calls)
        self.stats["largest"] = max(self.stats["largest"], len(calls))
        try:
            answer = await self.run(merge_calls(calls))
        except Exception as e:
            if len(calls) == 1:
                return [(False, e)]
            self.stats["fallbacks"] += 1
            out = []
            for call in calls:
                try:
                    out.append((True, await self.run(call)))
                except Exception as e:
                    out.append((False, e))
            return out
        return [(True, a) for a in split_answer(answer, calls)]


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
        self.checks_pairs, self.uses_group_ids = info["checks_pairs"], info["uses_group_ids"]
        self._describe = info["describe"]

    @classmethod
    def unreached(cls, name: str, pool: str) -> "PooledExpert":
        """The stand-in of an expert whose pool has not answered yet: what its class says of it (its checks,
        its normalisation); its checkpoint and input are known once the pool answers (`PooledMixture.pool_up`)."""
        c = get_expert_class(name)
        return cls(name, pool, {
            "preprocess": None, "checkpoint": "", "random_weights": False, "clip_spec": None,
            "describe": {"checkpoint": "", "random_weights": False, "pool": pool, "available": False}, **traits(c)})

    def describe(self) -> dict:
        return dict(self._describe)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"expert {self.name!r} runs in pool {self.pool!r}, not here")


@dataclass
class PooledScores(Scores):
    """A run's scores gathered from the pools, with the pools that could not score it and why."""

    down: dict[str, str] = field(default_factory=dict)


# call(pool, method, *args) -> the pool's answer, raising what the pool raised (a RewardError as itself)
PoolCall = Callable[..., Any]


class PooledMixture(Mixture):
    """The ingress's mixture: `Mixture`'s checks, preparation and results over experts that run in pools.

    `infos`: `Pool.info()` of each pool that answered (the others start down); `call(pool, method, *args)` runs
    a `Pool` method there, raising `Unavailable` when the pool does not answer; `executor` runs the calls to
    several pools at once (the gather waits on all)."""

    differentiable = False

    def __init__(self, config: RewardConfig, infos: Mapping[str, dict], call: PoolCall, executor: ThreadPoolExecutor | None = None,
                 retry_after: int = RETRY_AFTER_S):
        self.plan = plan_pools(list(config.experts), config.ray)  # pool -> its experts: known without the pools
        for pool, info in infos.items():
            if pool not in self.plan or sorted(info["experts"]) != sorted(self.plan[pool]):
                raise RuntimeError(f"pool {pool!r} holds {', '.join(info['experts'])}; the config puts "
                                   f"{', '.join(self.plan.get(pool, [])) or 'no such pool'} there")
        experts = {}
        for pool, names in self.plan.items():
            for name in names:
                experts[name] = (PooledExpert(name, pool, infos[pool]["experts"][name]) if pool in infos
                                 else PooledExpert.unreached(name, pool))
        experts = {n: experts[n] for n in config.experts}  # the config's order: the answers' order
        # no backbones here: the inputs to prepare are the pools' (`input_specs`), the models run there
        super().__init__(config, experts, [], torch.device("cpu"), torch.float32)
        self.pools = {pool: info for pool, info in infos.items()}  # the pools that answered `info` once
        self.down = {pool: "no replica has answered yet" for pool in self.plan if pool not in infos}  # pool -> why
        self._lock = threading.Lock()
        self._specs = self._input_specs()
        self._call = call
        self._fan = executor or ThreadPoolExecutor(max_workers=max(1, len(self.plan)), thread_name_prefix="t2i-pools")
        # why apart from `_fan`: a request's checks must not wait behind the micro-batches being scored
        self._checks = ThreadPoolExecutor(max_workers=max(1, len(self.plan)), thread_name_prefix="t2i-pool-checks")
        self.retry_after = retry_after
        if config.calibration:
            self.calibration = load_calibration(config.calibration, config.cache_dir)

    def _input_specs(self) -> list[Preprocess]:
        return list(dict.fromkeys(s for info in self.pools.values() for s in info["input_specs"]))

    @property
    def input_specs(self) -> list[Preprocess]:
        """Every input any pool that answered reads, each prepared once per image by the ingress."""
        return self._specs

    def pool_up(self, pool: str, info: dict) -> None:
        """Pool `pool` answered (`info`: its `Pool.info()`): its experts are scored again, from the next request on."""
        with self._lock:
            if pool not in self.pools:  # first answer: its experts' stand-ins, normalisation and inputs
                for name, e in info["experts"].items():
                    self.experts[name] = PooledExpert(name, pool, e)
                    self.norm[name] = self._norm(name, self.experts[name])
                self.pools = {**self.pools, pool: info}
                self._specs = self._input_specs()
            if self.down.pop(pool, None) is not None:
                log.warning("pool %s is up", pool)

    def pool_down(self, pool: str, why: str) -> None:
        """Pool `pool` failed a call: until it answers again (`pool_up`), its experts fail without a call."""
        with self._lock:
            if pool not in self.down:
                log.warning("pool %s is down: %s", pool, why)
            self.down[pool] = why

    def _needs(self, checked: Sequence[Checked], down: Mapping[str, str]) -> None:
        """Unavailable (503) when a request gives a required expert of a pool that is down a weight: its total
        cannot be computed. An optional expert, or one the request weights 0, fails its pairs instead."""
        for pool, why in down.items():
            for c in checked:
                need = [n for n in self.plan[pool] if self.required[n] and c.weights[n] != 0]
                if need:
                    raise Unavailable(f"pool {pool!r}, which holds the required expert(s) {', '.join(need)}, is "
                                      f"unavailable: {why}", retry_after=self.retry_after)

    def score_checked(self, checked: Sequence[Checked], *, on_timing=None) -> list[RewardResult]:
        self._needs(checked, dict(self.down))  # before any pool works on a request that cannot be answered
        return super().score_checked(checked, on_timing=on_timing)

    def results(self, checked: Sequence[Checked], raw: Scores, required: Mapping[str, bool] | None = None) -> list[RewardResult]:
        """`Mixture.results`; the experts of the pools that could not score the run are not required (they
        failed every pair, and `_needs` refused the requests that weighted a required one)."""
        down = getattr(raw, "down", {})
        self._needs(checked, down)
        missing = {n for pool in down for n in self.plan[pool]}
        return super().results(checked, raw, {n: r and n not in missing for n, r in (required or self.required).items()})

    def _ask(self, holds: Callable[[PooledExpert], bool], method: str, *args) -> None:
        """Call `method` of every pool that is up and holds an expert `holds` picks, concurrently; the first
        InvalidRequestError raised is the request's. A pool that does not answer is marked down: its experts
        will not run on the request."""
        pools = [p for p in dict.fromkeys(e.pool for e in self.experts.values() if holds(e))
                 if p in self.pools and p not in self.down]
        for pool, f in [(pool, self._checks.submit(self._call, pool, method, *args)) for pool in pools]:
            try:
                f.result()
            except Unavailable as e:
                self.pool_down(pool, str(e))

    def check_metadata(self, prompts: Sequence[str], metadata, limits: Limits | None = None) -> list[dict] | None:
        """The mixture's checks here (the metadata's form, each expert's fields), then those of the pools whose
        experts check pairs themselves (`check_pair`), before any model runs. A pool that is down checks
        nothing: its experts will not run on these pairs."""
        checked = super().check_metadata(prompts, metadata, limits)
        self._ask(lambda e: e.checks_pairs, "check", list(prompts), checked, limits or self.limits)
        return checked

    def check_groups(self, prompts: Sequence[str], group_ids: Sequence | None) -> None:
        """The groups of one request through the pools whose experts score groups (`check_group`: a pairwise
        judge's one prompt per group, its comparisons' bound), before any pool scores it."""
        self._ask(lambda e: e.uses_group_ids, "check_groups", list(prompts), None if group_ids is None else list(group_ids))

    def _failed(self, pool: str, why: str, n: int) -> Scores:
        """The scores of a pool that could not score a run of n pairs: NaN, each pair's error saying why."""
        message = f"pool {pool!r} is unavailable: {why}"
        return Scores({name: torch.full((n,), math.nan) for name in self.plan[pool]},
                      errors={name: dict.fromkeys(range(n), message) for name in self.plan[pool]})

    def _scores(self, pixels, prompts: list[str], groups: Sequence[int], metadata: Sequence[dict] | None,
                on_timing=None, group_ids: Sequence | None = None) -> PooledScores:
        """Every pool's raw scores of the run, asked of all pools that are up at once, each sent the inputs it
        reads; the experts of a pool that is down, or fails the call, fail their pairs (`_failed`)."""
        self.check_group_sizes(groups)
        n = len(prompts)
        down, pools = dict(self.down), self.pools
        futures = {}
        for pool in self.plan:
            if pool in down:
                continue
            try:
                inputs = {spec: to_wire(pixels.get(spec, 0, n)) for spec in pools[pool]["input_specs"]}
            except KeyError:  # it came up after these requests were prepared, without its inputs
                down[pool] = "it is starting"
                continue
            futures[pool] = self._fan.submit(self._call, pool, "score", inputs, prompts, list(groups), metadata, group_ids)
        answers = []
        try:
            for pool, f in futures.items():
                try:
                    answers.append(f.result())
                except Unavailable as e:
                    down[pool] = str(e)
                    self.pool_down(pool, str(e))
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
        if on_timing is not None:
            for _, timings in answers:
                for name, seconds in timings:
                    on_timing(name, seconds)
        merged = Scores.merge([scores for scores, _ in answers] + [self._failed(p, why, n) for p, why in down.items()],
                              list(self.experts))
        return PooledScores(merged.scores, merged.extras, merged.errors, merged.summaries, down=down)

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

"""Pools: which experts run together when the service runs on Ray Serve (`t2i-reward serve --ray`), and each
pool's replicas and resources: the reward config's `ray:` section.

A pool is one Ray Serve deployment whose replicas each hold a mixture of its experts only. By default the
experts that read a shared CLIP backbone (their class's `pool = "clip"`: aesthetic, mlp, clip_score,
diversity) share one pool, so the one CLIP image pass per image is kept; every other expert (ImageReward,
PickScore, HPSv3, GenEval's detector, a judge) is a pool of its own, sized on its own. `ray.pools` names
pools and, with `experts`, regroups them. Nothing here imports Ray: the deployments are the service's
(service/ray_serve.py).

    ray:
      pools:
        clip: {num_gpus: 0.25, max_replicas: 4}          # the CLIP family on a quarter of a GPU, autoscaled 1..4
        imagereward: {num_gpus: 0.5, replicas: 2}
        judges: {experts: [vlm_judge], num_cpus: 0.25}   # a pool named and filled by hand
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InvalidRequestError
from .registry import get_expert_class


class PoolConfig(BaseModel):
    """One pool's replicas and the resources of each (a Ray Serve deployment's options)."""

    model_config = ConfigDict(extra="forbid")

    experts: Optional[list[str]] = Field(None, description="The experts this pool holds (None: those the default "
                                         "grouping puts in a pool of this name).")
    replicas: int = Field(1, ge=1, description="Replicas; with `max_replicas`, the fewest that autoscaling keeps.")
    max_replicas: Optional[int] = Field(None, ge=1, description="Autoscale between `replicas` and this many replicas "
                                        "on the requests in flight (None: a fixed `replicas`).")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling: the requests in flight per replica "
                                           "that it aims at (more adds replicas, fewer removes them).")
    upscale_delay_s: float = Field(30.0, ge=0, description="Autoscaling: how long the load must stay above the target "
                                   "before a replica is added.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Autoscaling: how long the load must stay below the "
                                     "target before a replica is removed.")
    look_back_period_s: float = Field(30.0, gt=0, description="Autoscaling: the window the requests in flight are "
                                      "averaged over.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica (fractions allowed).")
    num_gpus: Optional[float] = Field(None, ge=0, le=1, description="GPUs per replica, fractions allowed (several "
                                      "pools share one GPU); None: an equal share of one GPU per pool when the "
                                      "cluster has GPUs, 0 when it has none.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources each replica needs "
                                        "(pins a pool to nodes started with `ray start --resources`).")
    threads: Optional[int] = Field(None, ge=1, description="Torch threads of a replica on a CPU (None: Ray's default, "
                                   "`floor(num_cpus)` and at least 1). More threads than reserved CPUs lets a pool "
                                   "that sets the pace use idle cores without reserving them.")
    max_ongoing_requests: int = Field(8, ge=1, description="Calls a replica takes at once; more wait at the caller. "
                                      "A replica runs one call at a time on its model thread, the others queue there.")
    merge_calls: bool = Field(False, description="Merge the calls (micro-batches) that arrive at a replica while it "
                              "scores into its next run of forward passes (service/pooled.py: CallMerger); off: one run "
                              "per call.")

    @model_validator(mode="after")
    def _bounds(self) -> "PoolConfig":
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
        return self


class IngressConfig(BaseModel):
    """The ingress deployment: the HTTP API, which decodes, checks and prepares each request once and fans it
    out to the pools."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, description="Ingress replicas (the HTTP proxy spreads requests over them).")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per ingress replica (its preprocessing pool uses "
                            "`prepare_workers` threads).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources an ingress replica needs.")
    max_ongoing_requests: int = Field(256, ge=1, description="HTTP requests one ingress replica takes at once (its own "
                                      "admission control answers 429 past `max_queue_images`).")
    max_inflight_batches: int = Field(4, ge=1, description="Micro-batches an ingress replica has out at the pools at "
                                      "once (one in the single-process service: its one model thread).")


class RayConfig(BaseModel):
    """The service on Ray Serve (`t2i-reward serve --ray`): pools, their replicas and resources, the ingress."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field("t2i-reward", min_length=1, description="The Serve application's name on the cluster.")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field("EveryNode", description="Where Serve runs its HTTP "
                                                              "proxies (on `--port`): every node, or the head only.")
    pools: dict[str, PoolConfig] = Field(default_factory=dict, description="Pools by name (see `PoolConfig`); a pool "
                                         "not listed gets `default_pool`'s settings.")
    default_pool: PoolConfig = Field(default_factory=PoolConfig, description="The settings of every pool that `pools` "
                                     "does not list.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The ingress deployment (see `IngressConfig`).")
    pool_timeout_s: float = Field(60.0, gt=0, description="Longest the ingress waits for a pool's answer (a pool "
                                  "with no replica placed, a replica stuck); then the pool is down until it answers "
                                  "again: its experts fail their pairs (optional ones), or 503 with Retry-After (a "
                                  "request that needs a required one).")
    pool_start_timeout_s: float = Field(600.0, gt=0, description="Longest start-up waits for the pools that some alive "
                                        "node can hold (loading their models) before the ingress is ready without "
                                        "them; pools no node can hold (a node missing) are not waited for. Either "
                                        "kind is picked up when it answers.")
    pool_retries: int = Field(2, ge=0, description="Times the ingress sends a call again when the replica that had "
                                                   "it died (Serve restarts it); then the pool is down, as after "
                                                   "`pool_timeout_s`.")


def plan_pools(experts: list[str], ray: RayConfig) -> dict[str, list[str]]:
    """Pool name -> its experts, in the config's order: the pools `ray.pools` fills by hand first, then every
    other expert by its class's `pool` (experts naming the same one share it) or in a pool of its own name."""
    out: dict[str, list[str]] = {}
    placed: dict[str, str] = {}
    for pool, cfg in ray.pools.items():
        for name in cfg.experts or ():
            if name not in experts:
                raise InvalidRequestError(f"ray.pools.{pool} names expert {name!r}, which the config does not enable")
            if name in placed:
                raise InvalidRequestError(f"expert {name!r} is in two pools: {placed[name]!r} and {pool!r}")
            placed[name] = pool
    for name in experts:
        pool = placed.get(name) or get_expert_class(name).pool or name
        out.setdefault(pool, []).append(name)
    for pool, cfg in ray.pools.items():
        if pool not in out:
            raise InvalidRequestError(f"ray.pools.{pool} holds no enabled expert; pools: {', '.join(out)}")
    return out


def pool_config(pool: str, ray: RayConfig) -> PoolConfig:
    """The settings of one pool: its own entry, or `default_pool`."""
    return ray.pools.get(pool, ray.default_pool)

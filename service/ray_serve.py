"""The reward service on Ray Serve: `t2i-reward serve --ray` (after `pip install .[ray]`).

One Serve application on a running Ray cluster (`RAY_ADDRESS`, or a local one when none is given):

- one deployment per **pool** (`pool-<name>`, rewarders/pools.py: the CLIP family together, every other
  expert alone, or as the config's `ray:` section says), each replica a `Pool` (service/pooled.py): a
  mixture of its experts only, on its model thread, with the replicas, autoscaling bounds and resources
  per replica (CPUs, GPUs or a fraction of one, custom resources) of its `PoolConfig`;
- the **ingress** deployment (`ingress`): the same FastAPI app as `t2i-reward serve` (every route, auth,
  body limits, admission control, micro-batching, metrics: service/app.py) over a `PooledMixture`, which
  decodes, checks and prepares each request once in the ingress's preprocessing pool, sends each micro-batch
  to every pool at once, and computes totals, advantages, percentiles and summaries from their scores.

Faults: a pool replica that dies is restarted by Serve; a call that was on it is sent again (`pool_retries`).
A pool that still fails, or does not answer within `pool_timeout_s`, is down: its experts fail their pairs
(optional ones: null components and `errors`; a request that needs a required one: 503 with Retry-After,
service/pooled.py) without further calls, until the ingress's watcher sees it answer again. Start-up waits
for the pools some alive node can hold (`pool_start_timeout_s` at most), not for those no node can (a node
missing): they are picked up when they answer. `/reward/gradient` answers 501 (service/pooled.py says why).

    serve run t2i_reward.service.ray_serve:app_builder profile=tiny     # Ray's own CLI, or a RayService (KubeRay)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
import yaml
from ray import serve
from ray.exceptions import RayError, RayTaskError
from t2i_reward.rewarders.config import RewardConfig
from t2i_reward.rewarders.errors import RewardError
from t2i_reward.rewarders.pools import PoolConfig, plan_pools, pool_config

from .app import create_app
from .errors import Unavailable
from .pooled import RETRY_AFTER_S, CallMerger, Pool, PooledMixture
from .settings import Settings

log = logging.getLogger(__name__)

PROBE_S = 5.0  # how long the watcher waits for a down pool's `info` at a time (it retries every second)


class PoolDeployment:
    """A pool replica: the `Pool`'s methods, its scoring on its model thread."""

    def __init__(self, name: str, config: RewardConfig, experts: list[str]):
        pc = pool_config(name, config.ray)
        if pc.threads is not None:  # before the models load: Ray set OMP_NUM_THREADS from the reserved CPUs
            torch.set_num_threads(pc.threads)
        self.pool = Pool(name, config, experts)
        # a merge takes at most every call the ingress replicas can have out at once
        ingress = config.ray.ingress
        self.merger = CallMerger(self._run, ingress.max_inflight_batches * ingress.replicas) if pc.merge_calls else None

    async def info(self) -> dict:
        return self.pool.info()

    async def where(self) -> dict:
        """This replica's process, node and torch threads (operators, and the tests that kill one)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "threads": torch.get_num_threads()}

    async def check(self, prompts, metadata, limits) -> None:
        await asyncio.to_thread(self.pool.check, prompts, metadata, limits)

    async def check_groups(self, prompts, group_ids) -> None:
        self.pool.check_groups(prompts, group_ids)  # no model: a pairwise judge's group rules

    async def score(self, pixels, prompts, groups, metadata, group_ids=None):
        call = (pixels, prompts, groups, metadata, group_ids)
        return await (self.merger(call) if self.merger is not None else self._run(call))

    async def _run(self, call):
        return await asyncio.get_running_loop().run_in_executor(self.pool.executor, self.pool.score, *call)

    async def stats(self) -> dict:
        """`merge_calls`'s counts on this replica (`CallMerger.stats`), or {} when it is off."""
        return dict(self.merger.stats) if self.merger is not None else {}


class Ingress:
    """The ingress replica: the service's FastAPI app (`__serve_build_asgi_app__`, built in the replica) over a
    `PooledMixture` whose calls go to the pools' deployments. `needs`: each pool's `ray_actor_options` (which
    nodes can hold it)."""

    def __init__(self, settings: Settings, config: RewardConfig, pools: dict[str, Any], needs: dict[str, dict] | None = None):
        self.settings = _here(settings, config)
        self.config = config
        self.pools = pools  # pool name -> its DeploymentHandle
        self.needs = needs or {}

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, loader=self._load, max_inflight_batches=self.config.ray.ingress.max_inflight_batches)

    def _load(self, settings: Settings) -> PooledMixture:
        """The pooled mixture, once every pool that some alive node can hold answered what its experts are
        (`pool_start_timeout_s` at most; /readyz is 503 meanwhile). The others start down; a watcher thread
        marks each pool up when it answers, and watches those that fail later."""
        infos: dict[str, dict] = {}
        end = time.monotonic() + self.config.ray.pool_start_timeout_s
        while True:
            waiting = [p for p in self.pools if p not in infos and self._placeable(p)]
            for name in waiting:
                try:
                    infos[name] = self._once(name, "info", timeout_s=PROBE_S)
                except Unavailable as e:
                    log.warning("waiting for pool %s: %s", name, e)
            if all(p in infos for p in waiting) or time.monotonic() > end:
                break
            time.sleep(0.5)
        unplaced = [p for p in self.pools if p not in infos]
        if unplaced:
            log.warning("ready without pool(s) %s (no replica answered): their experts fail until they do", ", ".join(unplaced))
        fan = ThreadPoolExecutor(max_workers=len(self.pools) * self.config.ray.ingress.max_inflight_batches,
                                 thread_name_prefix="t2i-pools")
        mixture = PooledMixture(self.config, infos, self.call, fan, retry_after=RETRY_AFTER_S)
        threading.Thread(target=self._watch, args=(mixture,), name="t2i-pool-watch", daemon=True).start()
        return mixture

    def _placeable(self, pool: str) -> bool:
        """Whether some alive node has (in total) the resources one replica of `pool` asks for."""
        options = self.needs.get(pool, {})
        need = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
        need = {k: v for k, v in need.items() if v}
        return any(all(node["Resources"].get(k, 0) >= v for k, v in need.items()) for node in ray.nodes() if node["Alive"])

    def _watch(self, mixture: PooledMixture) -> None:
        """Forever, every second: ask each pool that is down for its `info`; one that answers is up again."""
        while True:
            for pool in list(mixture.down):
                try:
                    mixture.pool_up(pool, self._once(pool, "info", timeout_s=PROBE_S))
                except Unavailable:
                    pass
                except Exception:  # the watcher must outlive any one pool's odd answer
                    log.exception("watching pool %s", pool)
            time.sleep(1.0)

    def _once(self, pool: str, method: str, *args, timeout_s: float):
        """`Pool.method(*args)` on one of the pool's replicas, once: no answer in `timeout_s`, or a replica
        that failed: Unavailable."""
        response = getattr(self.pools[pool], method).remote(*args)
        try:
            return response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()
            raise Unavailable(f"pool {pool!r} did not answer in {timeout_s:g} s", retry_after=RETRY_AFTER_S) from None
        except Exception as e:
            cause = e.cause if isinstance(e, RayTaskError) else None
            if cause is not None and not isinstance(cause, RayError):
                raise cause from None  # what the pool raised: a RewardError is the caller's 4xx
            if isinstance(e, RewardError) and not isinstance(e, RayError):
                raise
            raise Unavailable(f"pool {pool!r} is unavailable ({type(e).__name__}); Serve restarts its replicas",
                              retry_after=RETRY_AFTER_S) from e

    def call(self, pool: str, method: str, *args):
        """`Pool.method(*args)` on one of the pool's replicas. The pool's own errors come back as themselves (a
        bad request: its 4xx); a replica that died or could not be reached gets the call again (Serve restarts
        it, or routes to another), `pool_retries` times, then Unavailable; no answer in `pool_timeout_s`:
        Unavailable (the pooled mixture marks the pool down)."""
        ray_cfg = self.config.ray
        for attempt in range(ray_cfg.pool_retries + 1):
            try:
                return self._once(pool, method, *args, timeout_s=ray_cfg.pool_timeout_s)
            except Unavailable as e:
                if e.__cause__ is None or attempt == ray_cfg.pool_retries:  # a timeout is not retried: it took long enough
                    raise
                log.warning("pool %s: %s failed (attempt %d): %s", pool, method, attempt + 1, e.__cause__)
                time.sleep(min(2.0, 0.25 * 2 ** attempt))


def _here(settings: Settings, config: RewardConfig) -> Settings:
    """The settings with the reward config the driver resolved written on this node (the jobs routes read it
    again through `settings.rewarder_config()`; the driver's YAML file may live on another machine)."""
    fd, path = tempfile.mkstemp(prefix="t2i-reward-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config.model_dump(mode="json"), f)
    return settings.model_copy(update={"reward_config": path, "profile": config.profile})


def _actor_options(num_cpus: float, num_gpus: float, resources: dict) -> dict:
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        options["resources"] = dict(resources)
    return options


def pool_options(pc: PoolConfig, default_gpus: float) -> dict:
    """A pool deployment's Serve options from its `PoolConfig`."""
    options: dict[str, Any] = {
        "ray_actor_options": _actor_options(pc.num_cpus, pc.num_gpus if pc.num_gpus is not None else default_gpus, pc.resources),
        "max_ongoing_requests": pc.max_ongoing_requests,
    }
    if pc.max_replicas is None:
        options["num_replicas"] = pc.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": pc.replicas, "initial_replicas": pc.replicas, "max_replicas": pc.max_replicas,
            "target_ongoing_requests": pc.target_ongoing_requests, "upscale_delay_s": pc.upscale_delay_s,
            "downscale_delay_s": pc.downscale_delay_s, "look_back_period_s": pc.look_back_period_s,
        }
    return options


def build_app(settings: Settings):
    """The Serve application of these settings: a deployment per pool and the ingress, bound to them."""
    config = settings.rewarder_config(**settings.rewarder_overrides())
    plan = plan_pools(list(config.experts), config.ray)
    # pools without a GPU setting share one GPU equally when the cluster has any
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    share = int(10_000 / len(plan)) / 10_000 if gpus else 0.0
    handles, needs = {}, {}
    for name, experts in plan.items():
        deployment = serve.deployment(PoolDeployment, name=f"pool-{name}")
        options = pool_options(pool_config(name, config.ray), share)
        needs[name] = options["ray_actor_options"]
        handles[name] = deployment.options(**options).bind(name, config, experts)
    ing = config.ray.ingress
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress")
    return ingress.options(num_replicas=ing.replicas, max_ongoing_requests=ing.max_ongoing_requests,
                           ray_actor_options=_actor_options(ing.num_cpus, 0, ing.resources)).bind(settings, config, handles, needs)


def app_builder(args: dict):
    """For Ray's own tools (`serve run module:app_builder key=value ...`, a KubeRay RayService's
    `import_path`): `args` are service settings (`profile`, `reward_config`, ...), over the T2I_SERVICE_* environment."""
    return build_app(Settings(**args))


def run(settings: Settings) -> None:
    """`t2i-reward serve --ray`: the application on the cluster of `RAY_ADDRESS` (a local one when unset), its
    HTTP proxy on `settings.host:settings.port`, until SIGINT/SIGTERM; then the application is deleted."""
    config = settings.rewarder_config()
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, logging_level=logging.WARNING)
    # the proxy's keep-alive is `idle_timeout_s`, as in `serve` (Serve's own default keeps an idle connection 90 s);
    # its other connection limits (header size and time, open connections) Serve does not expose: docs/ray.md
    serve.start(proxy_location=config.ray.proxy_location,
                http_options={"host": settings.host, "port": settings.port,
                              "keep_alive_timeout_s": max(1, round(settings.idle_timeout_s))})
    name = config.ray.app_name
    # not `serve.run`: it waits until every deployment runs, forever when a pool's node is missing, while the
    # ingress serves the pools it has (its /readyz says when)
    serve.run_many([serve.RunTarget(build_app(settings), name=name, route_prefix="/")], wait_for_applications_running=False)
    print(f"t2i-reward on Ray Serve: http://{settings.host}:{settings.port} (application {name!r} on "
          f"{'the cluster at ' + address if address else 'a local cluster'}; ready when /readyz says so)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    failed = None
    while failed is None and not stop.wait(5):
        app = serve.status().applications.get(name)
        if app is not None and app.status == "DEPLOY_FAILED":
            failed = app.message
    if failed is not None:
        log.error("application %s failed to deploy: %s", name, failed)
    if address is not None:  # a cluster of its own stays up, without this application
        serve.delete(name)
    ray.shutdown()  # a local cluster goes with us (Ctrl-C may have stopped its processes already)
    if failed is not None:
        raise SystemExit(1)

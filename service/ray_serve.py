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

Faults: a pool replica that dies is restarted by Serve; a call that was on it is sent again (`pool_retries`),
then answered 503 with Retry-After, as is a pool that does not answer within `pool_timeout_s` (none of its
replicas placed). `/reward/gradient` answers 501 (service/pooled.py says why).

    serve run t2i_reward.service.ray_serve:app_builder profile=tiny     # Ray's own CLI, or a RayService (KubeRay)
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import yaml
from ray import serve
from ray.exceptions import RayError, RayTaskError
from t2i_reward.rewarders.config import RewardConfig
from t2i_reward.rewarders.errors import RewardError
from t2i_reward.rewarders.pools import PoolConfig, plan_pools, pool_config

from .app import create_app
from .errors import Unavailable
from .pooled import Pool, PooledMixture
from .settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # a dead replica's restart (the tiny models) takes seconds; a model of several GB longer


class PoolDeployment:
    """A pool replica: the `Pool`'s methods, its scoring on its model thread."""

    def __init__(self, name: str, config: RewardConfig, experts: list[str]):
        self.pool = Pool(name, config, experts)

    async def info(self) -> dict:
        return self.pool.info()

    async def where(self) -> dict:
        """This replica's process and node (operators, and the tests that kill one)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    async def check(self, prompts, metadata, limits) -> None:
        import asyncio

        await asyncio.to_thread(self.pool.check, prompts, metadata, limits)

    async def score(self, pixels, prompts, groups, metadata, group_ids=None):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self.pool.executor, self.pool.score, pixels, prompts,
                                                                groups, metadata, group_ids)


class Ingress:
    """The ingress replica: the service's FastAPI app (`__serve_build_asgi_app__`, built in the replica) over a
    `PooledMixture` whose calls go to the pools' deployments."""

    def __init__(self, settings: Settings, config: RewardConfig, pools: dict[str, Any]):
        self.settings = _here(settings, config)
        self.config = config
        self.pools = pools  # pool name -> its DeploymentHandle

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, loader=self._load, max_inflight_batches=self.config.ray.ingress.max_inflight_batches)

    def _load(self, settings: Settings) -> PooledMixture:
        """The pooled mixture, once every pool answered what its experts are (start-up waits for the pools)."""
        infos = {}
        for name in self.pools:
            while name not in infos:
                try:
                    infos[name] = self.call(name, "info")
                except Unavailable as e:  # not placed yet: /readyz stays 503 meanwhile
                    log.warning("waiting for pool %s: %s", name, e)
        fan = ThreadPoolExecutor(max_workers=len(infos) * self.config.ray.ingress.max_inflight_batches,
                                 thread_name_prefix="t2i-pools")
        return PooledMixture(self.config, infos, self.call, fan)

    def call(self, pool: str, method: str, *args):
        """`Pool.method(*args)` on one of the pool's replicas. The pool's own errors come back as themselves (a
        bad request: its 4xx); a replica that died or could not be reached gets the call again (Serve restarts
        it, or routes to another), `pool_retries` times, then 503; no answer in `pool_timeout_s`: 503."""
        ray_cfg = self.config.ray
        for attempt in range(ray_cfg.pool_retries + 1):
            response = getattr(self.pools[pool], method).remote(*args)
            try:
                return response.result(timeout_s=ray_cfg.pool_timeout_s)
            except TimeoutError:
                response.cancel()
                raise Unavailable(f"pool {pool!r} did not answer in {ray_cfg.pool_timeout_s:g} s", retry_after=RETRY_AFTER_S) from None
            except Exception as e:
                cause = e.cause if isinstance(e, RayTaskError) else None
                if cause is not None and not isinstance(cause, RayError):
                    raise cause from None  # what the pool raised: a RewardError is the caller's 4xx
                if isinstance(e, RewardError) and not isinstance(e, RayError):
                    raise
                log.warning("pool %s: %s failed (attempt %d): %s: %s", pool, method, attempt + 1, type(e).__name__, e)
                error = e
                time.sleep(min(2.0, 0.25 * 2 ** attempt))
        raise Unavailable(f"pool {pool!r} is unavailable ({type(error).__name__}); Serve restarts its replicas",
                          retry_after=RETRY_AFTER_S)


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
    handles = {}
    for name, experts in plan.items():
        deployment = serve.deployment(PoolDeployment, name=f"pool-{name}")
        handles[name] = deployment.options(**pool_options(pool_config(name, config.ray), share)).bind(name, config, experts)
    ing = config.ray.ingress
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress")
    return ingress.options(num_replicas=ing.replicas, max_ongoing_requests=ing.max_ongoing_requests,
                           ray_actor_options=_actor_options(ing.num_cpus, 0, ing.resources)).bind(settings, config, handles)


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
    serve.start(proxy_location=config.ray.proxy_location, http_options={"host": settings.host, "port": settings.port})
    name = config.ray.app_name
    serve.run(build_app(settings), name=name, route_prefix="/")
    print(f"t2i-reward on Ray Serve: http://{settings.host}:{settings.port} (application {name!r} on "
          f"{'the cluster at ' + address if address else 'a local cluster'})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    if address is not None:  # a cluster of its own stays up, without this application
        serve.delete(name)
    ray.shutdown()  # a local cluster goes with us (Ctrl-C may have stopped its processes already)

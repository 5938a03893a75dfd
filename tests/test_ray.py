"""`t2i-reward serve --ray` on a real two-node Ray cluster started here (`ray start --head`, then a second
`ray start --address`, each with its own custom resource and ports, on this machine): the pools placed on
both nodes, and two more pinned to a third node that is not there at start (`node_c`): the service is ready
without them, their optional expert's pairs fail (200, null, `errors`), a request that weights their
required expert is a 503 with Retry-After; once the third node joins they are picked up. Then the tiny
profile's answers equal the single-process mixture's, a pool replica killed under load (every answer 2xx or
503 with Retry-After), a pool autoscaled from 1 to 2 replicas under load and back.

Needs `pip install .[ray]` (CI installs it); skipped without Ray. The cluster and the service run in their own
process sessions and are killed by session at the end, so other Ray clusters on the machine are left alone."""

import base64
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from .conftest import free_port, smooth_image
from .test_pooled import assert_close

ray = pytest.importorskip("ray")

BIN = Path(sys.executable).parent
APP = "t2i-reward-test"


def ray_start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own: killing the session stops the node and its workers."""
    ports = ["--node-manager-port", free_port(), "--object-manager-port", free_port(), "--dashboard-agent-listen-port",
             free_port(), "--dashboard-agent-grpc-port", free_port(), "--metrics-export-port", free_port(),
             "--runtime-env-agent-port", free_port()]
    cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args, *map(str, ports)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kill_session(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(1)  # the session's other processes (raylet's workers) get their SIGTERM handled


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, cache_dir):
    """A head node (custom resource `node_a`) and a second node (`node_b`), then the service on them from the
    CLI, with RAY_ADDRESS: yields (service URL, config path, GCS address, a function that starts the third
    node, `node_c`)."""
    tmp = tmp_path_factory.mktemp("ray")
    temp_dir = Path("/tmp") / f"t2i-ray-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    gcs = f"{_node_ip()}:{free_port()}"
    # a cluster on loopback for this test alone: no token authentication (`ray start` turns it on by default)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process's own driver (state queries)
    procs = [ray_start(["--head", "--port", gcs.split(":")[1], "--num-cpus", "2",
                        "--resources", json.dumps({"node_a": 4}), "--include-dashboard", "false", "--temp-dir", str(temp_dir),
                        "--ray-client-server-port", str(free_port())], tmp / "head.log", env)]
    try:
        wait_for(lambda: _nodes(gcs, env) >= 1, 120, "the head node")
        procs.append(ray_start(["--address", gcs, "--num-cpus", "2",
                                "--resources", json.dumps({"node_b": 4})], tmp / "node.log", env))
        wait_for(lambda: _nodes(gcs, env) >= 2, 120, "the second node")
        config = tmp / "reward.yaml"
        pool = dict(num_cpus=0.1)
        # diversity (a batch-level expert) in the CLIP pool; mlp (optional) and aesthetic (required) each in a
        # pool on node_c, which joins only when `third_node()` is called
        config.write_text(yaml.safe_dump({"profile": "tiny", "cache_dir": str(cache_dir), "experts": {
            "imagereward": {}, "aesthetic": {}, "mlp": {"required": False}, "diversity": {"clip": "tiny"}}, "ray": {
            "app_name": APP, "proxy_location": "HeadOnly", "pool_timeout_s": 30, "pool_retries": 3,
            "ingress": {"num_cpus": 0.1, "resources": {"node_a": 1}},
            "pools": {
                # autoscaled with short delays, so the test sees 1 -> 2 -> 1 in seconds (a second replica halves the load
                # per replica below the target: it stays 10 s, long enough to be seen running)
                "imagereward": {**pool, "resources": {"node_a": 1}, "replicas": 1, "max_replicas": 2,
                                "target_ongoing_requests": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 10,
                                "look_back_period_s": 1},
                # merging the calls that queue: the parity and fault tests below run through it
                "clip": {**pool, "resources": {"node_b": 1}, "threads": 2, "merge_calls": True},
                "spare": {**pool, "experts": ["mlp"], "resources": {"node_c": 1}},
                "late": {**pool, "experts": ["aesthetic"], "resources": {"node_c": 1}},
            }}}))
        port = free_port()
        serve_env = {**env, "RAY_ADDRESS": gcs, "T2I_SERVICE_REDIS_URL": os.environ.get("T2I_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")}
        procs.append(subprocess.Popen([str(BIN / "t2i-reward"), "serve", "--ray", "--config", str(config), "--port", str(port)],
                                      stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT, env=serve_env,
                                      start_new_session=True))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), 240, f"the service ({tmp / 'serve.log'})")
        ray.init(address=gcs, logging_level="WARNING")

        def third_node() -> None:
            if len(procs) == 3:
                procs.insert(2, ray_start(["--address", gcs, "--num-cpus", "1", "--resources", json.dumps({"node_c": 4})],
                                          tmp / "node_c.log", env))
                wait_for(lambda: _nodes(gcs, env) >= 3, 120, "the third node")

        yield url, config, gcs, third_node
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        for p in reversed(procs):
            kill_session(p)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_ip() -> str:
    """The address Ray picks for this machine's nodes (and its GCS's)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def wait_for(check, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout} s for {what}")


def _nodes(gcs: str, env: dict) -> int:
    # why the marker: the driver's stdout also carries the cluster's log lines (the autoscaler's, for one)
    code = (f"import ray; ray.init(address='{gcs}', logging_level='ERROR', log_to_driver=False); "
            "print('alive-nodes', sum(n['Alive'] for n in ray.nodes()))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    counts = [line.split()[-1] for line in run.stdout.splitlines() if line.startswith("alive-nodes ")]
    return int(counts[-1]) if run.returncode == 0 and counts else 0


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def replica(deployment: str) -> dict:
    """The pid and node of (one of) a pool's replicas, as it says itself."""
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=APP).where.remote().result(timeout_s=60)


def running(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def png(seed: int, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    smooth_image(seed, h, w).save(buf, format="PNG")
    return buf.getvalue()


def test_pools_on_a_missing_node_fail_their_experts_then_join(cluster):
    """Runs first: node_c is not there yet. The service is ready; mlp (optional, its pool on node_c) fails its
    pairs with the pool named in `errors`, the total taken over the others; aesthetic (required, node_c) makes
    a request that weights it a 503 with Retry-After, one that weights it 0 a 200. Then node_c joins and both
    pools are picked up."""
    from t2i_reward.rewarders import create_rewarder
    from t2i_reward.rewarders.config import load_config
    from t2i_reward.rewarders.images import open_image

    url, config, _, third_node = cluster
    assert not any("node_c" in n["Resources"] for n in ray.nodes() if n["Alive"])
    assert _ready(url)
    body = {"prompt": "a red apple", "images": [base64.b64encode(png(i, 64, 64)).decode() for i in range(2)]}
    start = time.time()
    refused = httpx.post(f"{url}/reward", json=body, timeout=60)
    assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
    assert "aesthetic" in refused.json()["detail"] and time.time() - start < 20  # at once, not after pool_timeout_s (30 s)
    got = httpx.post(f"{url}/reward", json={**body, "weights": {"aesthetic": 0}}, timeout=60)
    assert got.status_code == 200, got.text
    single = create_rewarder(load_config(config))
    raw = single.raw_scores([open_image(png(i, 64, 64), 1 << 30, 100) for i in range(2)], ["a red apple"] * 2)
    weights = {**single.weights, "aesthetic": 0.0}
    for i, image in enumerate(got.json()["images"]):
        assert image["components"]["mlp"] is None and image["components"]["aesthetic"] is None
        assert set(image["errors"]) == {"mlp", "aesthetic"} and "pool 'spare' is unavailable" in image["errors"]["mlp"]
        # the total over imagereward and diversity, their weights scaled up to the same sum of |weight|
        answered = ("imagereward", "diversity")
        terms = sum(weights[n] * (float(raw[n][i]) - single.norm[n][0]) / single.norm[n][1] for n in answered)
        want = terms * sum(abs(w) for w in weights.values()) / sum(abs(weights[n]) for n in answered)
        assert math.isclose(image["total"], want, abs_tol=1e-5), (image, want)
        assert math.isclose(image["components"]["imagereward"], float(raw["imagereward"][i]), abs_tol=1e-5)
    third_node()

    def both_pools_answer() -> bool:  # each of node_c's two pools is picked up when it answers: not both at once
        r = httpx.post(f"{url}/reward", json=body, timeout=60)
        return r.status_code == 200 and all(im["components"]["mlp"] is not None and not im.get("errors") for im in r.json()["images"])

    wait_for(both_pools_answer, 240, "the pools on node_c")
    answer = httpx.post(f"{url}/reward", json=body, timeout=60).json()
    assert all(im["components"]["aesthetic"] is not None and im["total"] is not None for im in answer["images"])


def test_pools_on_both_nodes_answer_as_one_process(cluster):
    from t2i_reward.rewarders import create_rewarder
    from t2i_reward.rewarders.config import load_config

    url, config, _, third_node = cluster
    third_node()
    wait_for(lambda: "available" not in httpx.get(f"{url}/models", timeout=60).json()["experts"]["aesthetic"], 240,
             "the pools on node_c")
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    for deployment, resource, threads in (("pool-imagereward", "node_a", 1), ("pool-clip", "node_b", 2)):
        where = replica(deployment)
        assert resource in nodes[where["node_id"]], deployment
        assert where["threads"] == threads, deployment  # Ray's default for 0.1 CPU, or the pool's `threads`
    single = create_rewarder(load_config(config))
    images = [png(i, 64 + 16 * i, 96) for i in range(4)]
    body = {"prompts": ["a red apple", "a red apple", "a blue car", "a blue car"],
            "images": [base64.b64encode(b).decode() for b in images], "group_ids": [0, 0, 1, 1], "explain": True,
            "weights": {"mlp": 0.25}}
    got = httpx.post(f"{url}/reward", json=body, timeout=60)
    assert got.status_code == 200, got.text
    want = single.score_checked([single.check_request(body["prompts"], images, body["weights"], group_ids=[0, 0, 1, 1], explain=True)])[0]
    assert want.advantages is not None and want.images[0].percentiles is not None
    assert_close(json.loads(json.dumps(want.to_dict())), got.json())
    # the raw-tensor path (safetensors in and out)
    from safetensors.torch import load, save

    tensor = torch.randint(0, 256, (3, 48, 64, 3), dtype=torch.uint8)
    meta = {"prompts": json.dumps(["a cat"] * 3)}
    got = httpx.post(f"{url}/reward", content=save({"images": tensor}, metadata=meta), timeout=60,
                     headers={"content-type": "application/octet-stream", "accept": "application/octet-stream"})
    assert got.status_code == 200, got.text
    want = single.score_checked([single.check_tensor_request(["a cat"] * 3, tensor)])[0]
    assert torch.allclose(load(got.content)["rewards"], torch.tensor([im.total for im in want.images]), atol=1e-5, rtol=0)
    # many at once: the ingress micro-batches them and the clip pool merges the calls that queue (`merge_calls`);
    # each answer is still its request's own
    from ray import serve

    before = serve.get_deployment_handle("pool-clip", app_name=APP).stats.remote().result(timeout_s=60)
    bodies = [{"prompts": [f"a red apple {k}"] * 2, "images": [base64.b64encode(png(10 + 2 * k + j, 64, 64)).decode()
                                                               for j in range(2)]} for k in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{url}/reward", json=b, timeout=120), bodies))
    for b, a in zip(bodies, answers):
        assert a.status_code == 200, a.text
        want = single.score_checked([single.check_request(b["prompts"], [base64.b64decode(x) for x in b["images"]])])[0]
        assert_close(json.loads(json.dumps(want.to_dict())), a.json())
    after = serve.get_deployment_handle("pool-clip", app_name=APP).stats.remote().result(timeout_s=60)
    assert after["calls"] > before["calls"] and after["runs"] > before["runs"]  # through the replica's CallMerger
    # a bad request is the same 4xx; the gradient a clear 501
    assert httpx.post(f"{url}/reward", json={**body, "prompts": ["x"]}, timeout=60).status_code == 422
    g = httpx.post(f"{url}/reward/gradient", content=b"x", headers={"content-type": "application/octet-stream"}, timeout=60)
    assert g.status_code == 501 and "not served on Ray" in g.json()["detail"]
    assert httpx.get(f"{url}/models", timeout=60).json()["experts"] == single.describe()


class Load:
    """`clients` threads posting small /reward requests until stopped; every answer's status and Retry-After."""

    def __init__(self, url: str, clients: int):
        self.url, self.stop, self.answers = url, threading.Event(), []
        self.body = {"prompt": "a red apple", "images": [base64.b64encode(png(i, 64, 64)).decode() for i in range(2)]}
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/reward", json=self.body)
                    self.answers.append((time.time(), r.status_code, r.headers.get("retry-after")))
                except httpx.HTTPError as e:  # a hang or a dropped connection is a failure too
                    self.answers.append((time.time(), type(e).__name__, None))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)


def test_a_killed_pool_replica_answers_only_2xx_or_503(cluster):
    url = cluster[0]
    victim = replica("pool-clip")
    with Load(url, clients=4) as load:
        wait_for(lambda: sum(s == 200 for _, s, _ in load.answers) >= 4, 60, "answers before the kill")
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: any(s == 200 and t > killed_at + 1 for t, s, _ in load.answers) and
                 replica("pool-clip")["pid"] != victim["pid"], 120, "answers from the restarted replica")
    statuses = [s for _, s, _ in load.answers]
    assert set(statuses) <= {200, 503}, statuses
    assert all(retry for _, s, retry in load.answers if s == 503)  # every 503 says when to retry


def test_a_pool_autoscales_from_one_to_two_replicas_and_back(cluster):
    url = cluster[0]
    wait_for(lambda: running("pool-imagereward") == 1, 60, "one replica at rest")
    with Load(url, clients=6) as load:
        wait_for(lambda: running("pool-imagereward") == 2, 120, "a second replica under load")
    assert {s for _, s, _ in load.answers} <= {200, 503}
    wait_for(lambda: running("pool-imagereward") == 1, 120, "back to one replica when idle")


def test_the_proxy_closes_a_connection_idle_between_requests(cluster):
    """Serve's proxy keeps a connection open between requests for `idle_timeout_s` (5 s by default), as `serve`
    does, not Serve's own 90 s."""
    host, port = cluster[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        answer, last = b"", time.monotonic()
        while chunk := s.recv(65536):  # until the server closes it
            answer, last = answer + chunk, time.monotonic()
        assert answer.startswith(b"HTTP/1.1 200")
        assert 4 <= time.monotonic() - last <= 15

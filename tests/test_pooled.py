"""The mixture across pools without Ray (service/pooled.py): each pool's `Pool` in this process, the ingress's
`PooledMixture` over them. Its answers equal one mixture's; the pools follow the config's `ray:` section;
the service on a pooled mixture refuses `/reward/gradient` with 501. (tests/test_ray.py runs the same on a
real two-node Ray cluster.)"""

import io
import math

import pytest
import torch
import yaml
from t2i_reward.rewarders import create_rewarder
from t2i_reward.rewarders.config import load_config
from t2i_reward.rewarders.errors import InvalidRequestError
from t2i_reward.rewarders.pools import plan_pools

from .conftest import LIMITS, client_maker, smooth_image


def tiny_config(cache_dir, **over):
    # the tiny profile and diversity, a batch-level expert on the shared tiny CLIP: two pools
    return load_config(profile="tiny", cache_dir=cache_dir, experts={"diversity": {"clip": "tiny"}}, **over)


@pytest.fixture(scope="module")
def pair(cache_dir):
    from t2i_reward.service.pooled import local_pools, pooled_over_local

    config = tiny_config(cache_dir)
    return create_rewarder(config), pooled_over_local(config, local_pools(config))


def assert_close(a, b, path="result"):
    """Two answers equal: the same keys, lists and None, numbers within 1e-5."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: {a} != {b}"
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=0, abs_tol=1e-5), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_the_default_pools_keep_the_clip_family_together(cache_dir):
    config = tiny_config(cache_dir)
    assert plan_pools(list(config.experts), config.ray) == {"imagereward": ["imagereward"], "clip": ["aesthetic", "mlp", "diversity"]}
    default = load_config(profile="default")
    assert plan_pools(list(default.experts), default.ray) == {
        "imagereward": ["imagereward"], "pickscore": ["pickscore"], "hpsv2": ["hpsv2"], "clip": ["clip_score", "aesthetic"]}


def test_the_ray_section_regroups_and_sizes_pools(cache_dir, tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump({"profile": "tiny", "ray": {
        "pools": {"heads": {"experts": ["aesthetic", "imagereward"], "num_gpus": 0.25, "replicas": 1, "max_replicas": 3},
                  "clip": {"num_cpus": 0.1, "resources": {"small": 1}}},
        "default_pool": {"num_cpus": 0.2}}}))
    config = load_config(path, cache_dir=cache_dir)
    assert plan_pools(list(config.experts), config.ray) == {"heads": ["imagereward", "aesthetic"], "clip": ["mlp"]}
    assert config.ray.pools["heads"].num_gpus == 0.25 and config.ray.pools["clip"].resources == {"small": 1}
    with pytest.raises(InvalidRequestError, match="two pools"):
        plan_pools(["aesthetic", "mlp"], load_config(profile="tiny", ray={"pools": {
            "a": {"experts": ["aesthetic"]}, "b": {"experts": ["aesthetic"]}}}).ray)
    with pytest.raises(InvalidRequestError, match="does not enable"):
        plan_pools(["mlp"], load_config(profile="tiny", ray={"pools": {"a": {"experts": ["pickscore"]}}}).ray)
    with pytest.raises(InvalidRequestError, match="max_replicas"):
        load_config(profile="tiny", ray={"default_pool": {"replicas": 3, "max_replicas": 2}})


def test_pooled_answers_equal_one_mixture(pair):
    single, pooled = pair
    assert list(pooled.experts) == list(single.experts)
    imgs = [smooth_image(i, 64 + 8 * i, 80) for i in range(5)]
    requests = [("a red apple", imgs[:3], {"mlp": 0.5}), (["a blue car", "a cat"], imgs[3:], None)]
    for s, p in zip(single.score_many(requests), pooled.score_many(requests)):
        assert_close(s.to_dict(), p.to_dict())
    # groups' advantages and percentiles (the tiny profile's calibration), computed in the ingress
    kw = dict(group_ids=[0, 0, 1, 1, 1], explain=True)
    s = single.score_checked([single.check_request("a dog", imgs, **kw)])[0]
    p = pooled.score_checked([pooled.check_request("a dog", imgs, **kw)])[0]
    assert s.advantages is not None and s.images[0].percentiles is not None
    assert_close(s.to_dict(), p.to_dict())
    assert pooled.describe() == single.describe()
    # a batch-level expert's limit is checked in the ingress, before any pool runs
    with pytest.raises(InvalidRequestError, match="at least 2 images"):
        pooled.check_request("a dog", imgs[:1])


def test_the_service_on_pools_answers_as_one_process_and_refuses_gradients(pair):
    single, pooled = pair
    buf = io.BytesIO()
    smooth_image(3, 96, 120).save(buf, format="PNG")
    files = [("images", ("a.png", buf.getvalue(), "image/png"))] * 2
    answers = []
    for rewarder in (single, pooled):
        make = client_maker(rewarder, LIMITS)
        client = next(make)(max_wait_ms=0)
        r = client.post("/reward", data={"prompt": "a red apple"}, files=files)
        assert r.status_code == 200, r.text
        answers.append(r.json())
        g = client.post("/reward/gradient", content=b"x", headers={"content-type": "application/octet-stream"})
        assert g.status_code == (501 if rewarder is pooled else 400), g.text
        if rewarder is pooled:
            assert "not served on Ray" in g.json()["detail"]
        assert client.get("/models").json()["experts"] == single.describe()
        next(make, None)
    assert_close(answers[0], answers[1])


def test_the_single_process_service_does_not_import_ray():
    import subprocess
    import sys

    # what `t2i-reward serve` imports and builds (without --ray), in a fresh interpreter
    code = ("import sys, t2i_reward.cli\n"
            "from t2i_reward.service.app import create_app\n"
            "from t2i_reward.service.server import serve\n"
            "from t2i_reward.service.settings import Settings\n"
            "create_app(Settings(profile='tiny'))\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n"
            "assert 't2i_reward.service.ray_serve' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_kuberay_manifest_names_the_builder_and_a_valid_config(tmp_path):
    import importlib
    from pathlib import Path

    from t2i_reward.service.settings import Settings

    root = Path(__file__).resolve().parent.parent
    configmap, service = yaml.safe_load_all((root / "deploy" / "kuberay-rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema(**serve_config)  # what KubeRay hands to Serve: a valid Serve config
    assert serve_config["http_options"]["keep_alive_timeout_s"] == Settings().idle_timeout_s
    app = serve_config["applications"][0]
    module, _, name = app["import_path"].partition(":")
    assert module == "t2i_reward.service.ray_serve" and name == "app_builder"
    assert importlib.util.find_spec(module) is not None  # (importing it needs Ray)
    Settings(**{k: v for k, v in app["args"].items() if k != "reward_config"})  # every arg is a service setting
    path = tmp_path / "reward.yaml"
    path.write_text(configmap["data"]["reward.yaml"])
    config = load_config(path)
    assert plan_pools(list(config.experts), config.ray) == {
        "imagereward": ["imagereward"], "pickscore": ["pickscore"], "hpsv2": ["hpsv2"], "clip": ["clip_score", "aesthetic"]}
    assert sum(config.ray.pools[p].num_gpus for p in config.ray.pools) == 1.0  # the four pools share each GPU


def without_errors(answer: dict) -> dict:
    return {**answer, "images": [{**im, "errors": None} for im in answer["images"]]}


def test_a_pool_that_is_down_fails_its_experts_as_one_process_or_the_request(cache_dir, monkeypatch):
    """A pool that has not answered (its node missing) or fails a call: an optional expert's pairs fail as
    they do in one process when the expert raises; a request that weights a required one is refused with
    Unavailable (503) before any pool works on it, unless it weights that expert 0; the pool comes back with
    `pool_up`."""
    from t2i_reward.service.errors import Unavailable
    from t2i_reward.service.pooled import PooledMixture, local_pools

    experts = {"diversity": {"clip": "tiny"}, "imagereward": {"required": False}}
    config = load_config(profile="tiny", cache_dir=cache_dir, experts=experts)
    pools = local_pools(config)
    calls, failing = [], set()

    def call(pool, method, *args):
        calls.append((pool, method))
        if pool in failing:
            raise Unavailable(f"pool {pool!r} did not answer in 1 s", retry_after=5)
        p = pools[pool]
        return p.executor.submit(p.score, *args).result() if method == "score" else getattr(p, method)(*args)

    # imagereward's pool has not answered at start: known from the config, down
    pooled = PooledMixture(config, {"clip": pools["clip"].info()}, call)
    assert list(pooled.experts) == list(config.experts) and list(pooled.down) == ["imagereward"]
    assert pooled.describe()["imagereward"]["available"] is False
    imgs = [smooth_image(i, 64, 80) for i in range(3)]
    got = pooled.score_checked([pooled.check_request("a dog", imgs, group_ids=[0, 0, 1])])[0].to_dict()
    assert ("imagereward", "score") not in calls
    # one process whose imagereward raises answers the same, the errors aside
    single = create_rewarder(config)
    monkeypatch.setattr(single.experts["imagereward"], "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("down")))
    want = single.score_checked([single.check_request("a dog", imgs, group_ids=[0, 0, 1])])[0].to_dict()
    assert want["images"][0]["components"]["imagereward"] is None and want["images"][0]["total"] is not None
    assert_close(without_errors({**want, "experts": None}), without_errors({**got, "experts": None}))
    assert all("pool 'imagereward' is unavailable" in im["errors"]["imagereward"] for im in got["images"])

    # the pool answers: scored again, as one process
    pooled.pool_up("imagereward", pools["imagereward"].info())
    assert not pooled.down and pooled.describe() == create_rewarder(config).describe()
    assert_close(create_rewarder(config).score("a dog", imgs).to_dict(), pooled.score("a dog", imgs).to_dict())

    # a call that fails marks the pool down: later runs do not call it
    failing.add("imagereward")
    assert pooled.score("a dog", imgs).images[0].components["imagereward"] is None
    assert "imagereward" in pooled.down
    calls.clear()
    assert pooled.score("a dog", imgs).images[0].errors["imagereward"].startswith("pool 'imagereward' is unavailable")
    assert ("imagereward", "score") not in calls

    # a required expert's pool down: the request is refused, unless it weights that expert 0
    required = load_config(profile="tiny", cache_dir=cache_dir, experts={"diversity": {"clip": "tiny"}})
    strict = PooledMixture(required, {"clip": pools["clip"].info()}, call)
    with pytest.raises(Unavailable, match="required expert.*imagereward") as e:
        strict.score("a dog", imgs)
    assert e.value.retry_after == 5
    r = strict.score("a dog", imgs, weights={"imagereward": 0})
    assert r.images[0].components["imagereward"] is None and r.images[0].total is not None
    full = create_rewarder(required).score("a dog", imgs, weights={"imagereward": 0})
    assert math.isclose(r.images[0].total, full.images[0].total, abs_tol=1e-5)  # weight 0: the same total


def test_a_group_a_pool_cannot_judge_is_refused_in_the_ingress_before_any_scoring(cache_dir):
    """A pairwise judge's group rules (one prompt, at least 2 images, its comparison bound) run in the pool that
    holds it, asked by the ingress while it checks the request: the same 4xx as one process, and no pool scores."""
    from t2i_reward.rewarders.tiny_vlm import ensure_scripted_vlm
    from t2i_reward.service.pooled import PooledMixture, local_pools

    folder = str(ensure_scripted_vlm(cache_dir, "Image 1 is better."))
    config = load_config(profile="tiny", cache_dir=cache_dir, normalize=False,
                         experts={"imagereward": None, "pairwise_judge": {"model": folder, "image_size": 56, "max_comparisons": 3, "template": "unifiedreward", "max_tokens": 16}})
    pools = local_pools(config)
    assert sorted(pools) == ["clip", "pairwise_judge"]
    calls = []

    def call(pool, method, *args):
        calls.append((pool, method))
        p = pools[pool]
        return p.executor.submit(p.score, *args).result() if method == "score" else getattr(p, method)(*args)

    pooled, single = PooledMixture(config, {n: p.info() for n, p in pools.items()}, call), create_rewarder(config)
    images = [smooth_image(i, 64, 64) for i in range(3)]
    for prompts, groups, why in [(["a red square"] * 3, [0, 0, 1], "a group has 1 image"),
                                 (["a red square", "a red square", "a blue car"], None, "one prompt: a group has 2 prompts"),
                                 (["a red square"] * 3, None, "a group of 3 images needs at least 4 comparisons; max_comparisons is 3")]:
        for mixture in (single, pooled):
            with pytest.raises(InvalidRequestError, match=why):
                mixture.check_request(prompts, images, group_ids=groups)
    assert ("pairwise_judge", "check_groups") in calls and ("clip", "check_groups") not in calls
    # a group it can judge passes the same check and is scored as in one process
    ok = dict(group_ids=[0, 0, 1, 1])
    four = [smooth_image(i, 64, 64) for i in range(4)]
    got = pooled.score_checked([pooled.check_request("a red square", four, **ok)])[0].to_dict()
    want = single.score_checked([single.check_request("a red square", four, **ok)])[0].to_dict()
    assert [im["components"]["pairwise_judge"] for im in got["images"]] == [0.5] * 4  # both orders: the first-place bias cancels
    assert_close(want, got)


def test_calls_merged_at_a_pool_answer_each_call_as_if_alone(cache_dir):
    """A pool replica with `merge_calls` scores the micro-batches that queued as one run (service/ray_serve.py):
    `merge_calls` joins their pairs and requests, `split_answer` hands each call its scores, extras, errors
    (renumbered) and its requests' summaries: what each call alone gets."""
    from t2i_reward.rewarders.inputs import prepare_pil
    from t2i_reward.rewarders.invariance import GENEVAL_RECORDS
    from t2i_reward.service.pooled import local_pools, merge_calls, split_answer, to_wire

    config = tiny_config(cache_dir)
    pool = local_pools(config)["clip"]  # aesthetic, mlp and diversity (a batch-level expert)
    specs = pool.info()["input_specs"]

    def call(seeds, groups, metadata=None, group_ids=None):
        images = [smooth_image(i, 64, 80) for i in seeds]
        return ({s: to_wire(t) for s, t in prepare_pil(images, specs).items()}, [f"a dog {i}" for i in seeds], groups,
                metadata, group_ids)

    calls = [call([0, 1, 2, 3], [2, 2]), call([4, 5], [2], [{"tag": "x"}, {}], [[0, 1]]), call([6, 7, 8], [3])]
    merged = merge_calls(calls)
    assert merged[1] == [p for c in calls for p in c[1]] and merged[2] == [2, 2, 2, 3]
    assert merged[3] == [{}, {}, {}, {}, {"tag": "x"}, {}, {}, {}, {}] and merged[4] == [None, None, [0, 1], None]
    together = split_answer(pool.score(*merged), calls)
    for (scores, timings), c, i in zip(together, calls, range(3)):
        alone, alone_timings = pool.score(*c)
        assert list(scores.scores) == list(alone.scores) and scores.summaries == alone.summaries
        for name in alone.scores:
            torch.testing.assert_close(scores.scores[name], alone.scores[name], rtol=1e-5, atol=1e-5)
        assert scores.errors == alone.errors
        assert bool(timings) == (i == 0)  # the run's pass timings, counted once
    # geneval's pool: each request's summary (its per-tag means) goes back to its call
    config = load_config(profile="tiny", cache_dir=cache_dir, experts={"geneval": {"detector": "tiny", "clip": "tiny", "image_size": 64}})
    pool = local_pools(config)["geneval"]
    specs = pool.info()["input_specs"]
    records = lambda seeds: [GENEVAL_RECORDS[i % 3] for i in seeds]  # noqa: E731
    calls = [call([0, 1, 2], [1, 2], records([0, 1, 2])), call([3, 4, 5, 6], [4], records([3, 4, 5, 6]))]
    together = split_answer(pool.score(*merge_calls(calls)), calls)
    for (scores, _), c in zip(together, calls):
        alone, _ = pool.score(*c)
        assert len(scores.summaries) == len(c[2]) and all(s["geneval"] for s in scores.summaries)
        assert scores.summaries == alone.summaries and scores.errors == alone.errors
        torch.testing.assert_close(scores.scores["geneval"], alone.scores["geneval"], rtol=1e-5, atol=1e-5)


def test_split_answer_renumbers_each_calls_errors_and_extras():
    from t2i_reward.rewarders.mixture import Scores
    from t2i_reward.service.pooled import split_answer

    calls = [({}, ["a"] * 3, [3], None, None), ({}, ["b"] * 4, [1, 3], None, None)]
    merged = Scores({"x": torch.arange(7.0)}, {"x.calls": torch.arange(7.0) * 10},
                    {"x": {1: "first call's 2nd pair", 5: "second call's 3rd pair"}}, [{"x": {"r": 0}}, {"x": {"r": 1}}, {"x": {"r": 2}}])
    (a, ta), (b, tb) = split_answer((merged, [("x", 0.5)]), calls)
    assert a.scores["x"].tolist() == [0, 1, 2] and b.scores["x"].tolist() == [3, 4, 5, 6]
    assert b.extras["x.calls"].tolist() == [30, 40, 50, 60]
    assert a.errors == {"x": {1: "first call's 2nd pair"}} and b.errors == {"x": {2: "second call's 3rd pair"}}
    assert a.summaries == [{"x": {"r": 0}}] and b.summaries == [{"x": {"r": 1}}, {"x": {"r": 2}}]
    assert ta == [("x", 0.5)] and tb == []


def test_a_pool_replica_merges_the_calls_that_queue_while_it_scores(cache_dir):
    """`merge_calls` (CallMerger, run as a Ray pool replica runs it: on its event loop, each run on the model
    thread): calls that arrive while a run is on go together into the next; each caller gets its own answer;
    a merged run that fails (a call the pool refuses) is run call by call, so only that call's caller gets the error."""
    import asyncio

    from t2i_reward.rewarders.inputs import prepare_pil
    from t2i_reward.service.pooled import CallMerger, local_pools, to_wire

    pool = local_pools(tiny_config(cache_dir))["clip"]  # diversity refuses a request of one image
    specs = pool.info()["input_specs"]

    def call(seeds, groups):
        images = [smooth_image(i, 64, 80) for i in seeds]
        return ({s: to_wire(t) for s, t in prepare_pil(images, specs).items()}, [f"a dog {i}" for i in seeds], groups, None, None)

    async def main():
        gate, runs = asyncio.Event(), []

        async def run(c):
            runs.append(len(c[2]))  # requests in the run
            if len(runs) == 1:
                await gate.wait()  # the first run holds the model thread until the others have queued
            return await asyncio.get_running_loop().run_in_executor(pool.executor, pool.score, *c)

        merger = CallMerger(run, cap=8)
        calls = [call([0, 1], [2]), call([2, 3, 4], [3]), call([5, 6], [2]), call([7], [1]), call([8, 9], [2])]
        tasks = [asyncio.create_task(merger(calls[0]))]
        await asyncio.sleep(0.05)  # the first run has started and holds the model thread
        tasks += [asyncio.create_task(merger(c)) for c in calls[1:4]]
        await asyncio.sleep(0.05)
        gate.set()
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        first_runs = list(runs)
        last = await merger(calls[4])  # nothing queued: a run of its own
        return answers + [last], first_runs, runs, merger.stats, calls

    answers, first_runs, runs, stats, calls = asyncio.run(main())
    # run 1: the first call; run 2: the three that queued, merged (3 requests), which fails on the one-image
    # request; then those three alone; last, the fifth call alone
    assert first_runs == [1, 3, 1, 1, 1] and runs[-1] == 1
    assert stats == {"runs": 3, "calls": 5, "largest": 3, "fallbacks": 1}
    assert isinstance(answers[3], InvalidRequestError) and "at least 2 images" in str(answers[3])
    for i in (0, 1, 2, 4):
        (scores, _), (alone, _) = answers[i], pool.score(*calls[i])
        assert list(scores.scores) == list(alone.scores)
        for name in alone.scores:
            torch.testing.assert_close(scores.scores[name], alone.scores[name], rtol=1e-5, atol=1e-5)

"""GRPO at the field's speed: the training chain apart from the evaluation chain, the SDE window and its
schedules, the deterministic steps before the window shared by a group, rewards streamed while sampling, and
the denoiser's forward passes counted exactly (`metrics.forward_passes`)."""

import random
import threading
from contextlib import nullcontext

import pytest
import torch
from pydantic import ValidationError
from t2i_reward.finetune import grpo
from t2i_reward.finetune.pipeline import setup_models
from t2i_reward.finetune.rewards import LocalReward, RemoteReward
from t2i_reward.finetune.sampler import MIN_STD, Sampler
from t2i_reward.finetune.spec import JobSpec

from .conftest import running_server
from .test_grpo import FAST, LEARN, PROMPTS, redness, run  # noqa: F401 (redness: the module's fixture)

LAYOUTS = ["tiny", "tiny-sdxl", "tiny-sd3"]


def spec(**kw) -> JobSpec:
    return JobSpec(**{**FAST, "method": "grpo", "prompts": PROMPTS, **kw})


def sampler(cache_dir, base_model: str, steps: int, guidance: float = 2.0) -> Sampler:
    s = spec(base_model=base_model, num_inference_steps=steps)
    return Sampler(setup_models(s, base_model, cache_dir, torch.device("cpu"), torch.float32), guidance,
                   torch.device("cpu"), nullcontext)


# ---- the spec


def test_the_spec_rules_of_the_chain_and_the_window():
    s = spec(num_inference_steps=40)
    assert (s.train_steps, s.window, s.window_range, s.sde_window_schedule) == (40, (0, 40), (0, 40), "fixed")
    s = spec(num_inference_steps=40, train_inference_steps=10, sde_window=[2, 5])
    assert (s.train_steps, s.window) == (10, (2, 5))
    with pytest.raises(ValidationError, match=r"sde_window must satisfy 0 <= first < last <= train_inference_steps \(10\)"):
        spec(num_inference_steps=40, train_inference_steps=10, sde_window=[2, 11])
    with pytest.raises(ValidationError, match="sde_window must satisfy"):
        spec(sde_window=[3, 3])
    with pytest.raises(ValidationError, match="sde_window_range must satisfy"):
        spec(train_inference_steps=10, sde_window_range=[0, 12])
    with pytest.raises(ValidationError, match="longer than sde_window_range"):
        spec(train_inference_steps=10, sde_window=[0, 4], sde_window_range=[0, 3], sde_window_schedule="random")
    with pytest.raises(ValidationError, match="starts inside sde_window_range"):
        spec(train_inference_steps=10, sde_window=[6, 8], sde_window_range=[0, 5], sde_window_schedule="sliding")
    with pytest.raises(ValidationError, match="apply to GRPO and DDPO only"):
        JobSpec(method="refl", prompts=["x"], sde_window=[0, 2], refl_step_range=[0, 2], num_inference_steps=4)
    with pytest.raises(ValidationError, match="apply to GRPO and DDPO only"):
        JobSpec(method="reward_weighted", prompts=["x"], stream_rewards=True)
    # ReFL's step index counts in the training chain
    with pytest.raises(ValidationError, match=r"train_inference_steps \(10\)"):
        JobSpec(method="refl", prompts=["x"], num_inference_steps=40, train_inference_steps=10, refl_step_range=[5, 20])
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        spec(train_inference_steps=1)


def test_the_window_schedules():
    fixed = spec(train_inference_steps=10, sde_window=[2, 4])
    assert {grpo.sde_window_at(fixed, step, random.Random(step)) for step in range(20)} == {(2, 4)}
    # sliding (MixGRPO): 2 transitions every 3 steps, back to the range's start when the window would leave (0, 8)
    sliding = spec(train_inference_steps=10, sde_window=[1, 4], sde_window_range=[0, 8], sde_window_schedule="sliding",
                   sde_window_stride=2, sde_window_shift_every=3)
    starts = [grpo.sde_window_at(sliding, step, random.Random(0))[0] for step in range(18)]
    assert starts == [1, 1, 1, 3, 3, 3, 5, 5, 5, 1, 1, 1, 3, 3, 3, 5, 5, 5]  # starts 0..5 fit: (1 + 2j) mod 6
    # random (Flow-GRPO-Fast): drawn from the step's rng, within the range, every position reached, size kept
    fast = spec(train_inference_steps=10, sde_window=[0, 3], sde_window_range=[0, 5], sde_window_schedule="random")
    drawn = [grpo.sde_window_at(fast, step, random.Random(step)) for step in range(200)]
    assert {a for a, _ in drawn} == {0, 1, 2} and all(b - a == 3 for a, b in drawn)
    assert drawn == [grpo.sde_window_at(fast, step, random.Random(step)) for step in range(200)]  # a resumed job draws the same


# ---- the sampler


def draws(seed: int, shape, k: int) -> torch.Tensor:
    """The k-th step's noise of an image seeded `seed` (its generator draws one tensor a step)."""
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(k):
        torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("base_model", LAYOUTS)
def test_window_steps_are_the_gaussian_transitions_and_the_others_deterministic(base_model, cache_dir):
    """Inside the window every step is x_prev = mean + std z with z the image's k-th noise draw, and its stored
    log-probability is torch's Normal density of x_prev (averaged per element); outside, x_prev is the eta = 0
    step exactly, and no log-probability is kept."""
    s = sampler(cache_dir, base_model, 6)
    seeds, eta = [11, 12], 0.7
    cond, uncond = s.conditions(["a red ball", "a red car"])
    traj = grpo.sample_with_logprobs(s, seeds, eta, cond, uncond, window=(2, 4))
    assert traj.stochastic == [2, 3]
    x = traj.latents
    for k in range(6):
        with torch.no_grad():
            mean, std = s.transition(s.predict(x[:, k], k, cond, uncond), x[:, k], k, eta if k in (2, 3) else 0.0)
        if k in (2, 3):
            assert float(std) > MIN_STD
            z = torch.stack([draws(seed, x.shape[2:], k) for seed in seeds])
            torch.testing.assert_close(x[:, k + 1], mean + std * z, rtol=1e-5, atol=1e-5)
            direct = torch.distributions.Normal(mean, std).log_prob(x[:, k + 1]).mean(dim=(1, 2, 3))
            torch.testing.assert_close(traj.log_probs[:, k], direct, rtol=1e-4, atol=1e-4)
        else:
            assert float(std) == 0.0
            torch.testing.assert_close(x[:, k + 1], mean, rtol=1e-5, atol=1e-5)
            assert traj.log_probs[:, k].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("base_model", LAYOUTS)
def test_a_window_over_the_whole_chain_is_the_whole_chain_sampler(base_model, cache_dir):
    """The window's default, and an explicit window over the whole chain, sample what the trainer sampled before
    windows existed (every step stochastic), to the bit: that loop is written out here."""
    s = sampler(cache_dir, base_model, 4)
    seeds, eta = [5, 6, 7], 1.0
    cond, uncond = s.conditions(["a", "b", "c"])
    with torch.no_grad():  # the former sampler
        latents = s.initial_latents(seeds)
        gens = [torch.Generator().manual_seed(seed + 1) for seed in seeds]
        chain, log_probs = [latents], []
        for k in range(s.num_steps):
            mean, std = s.transition(s.predict(latents, k, cond, uncond), latents, k, eta)
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
            latents = mean + std * noise
            log_probs.append(grpo.gaussian_log_prob(latents, mean, std))
            chain.append(latents)
    for window in (None, (0, 4)):
        traj = grpo.sample_with_logprobs(s, seeds, eta, cond, uncond, window=window)
        assert torch.equal(traj.latents, torch.stack(chain, dim=1))
        k = traj.stochastic
        assert torch.equal(traj.log_probs[:, k], torch.stack(log_probs, dim=1)[:, k])


def test_a_group_with_one_starting_noise_runs_the_steps_before_the_window_once(cache_dir):
    """group_initial_noise: a group's images share x_T and the deterministic steps before the window (run once
    for the group: counted), then branch in the window with their own noise."""
    s = sampler(cache_dir, "tiny", 6, guidance=2.0)
    seeds = [1, 2, 3, 4]
    cond, uncond = s.conditions(["a red ball"] * 2 + ["a red car"] * 2)
    before = s.forward_passes
    traj = grpo.sample_with_logprobs(s, seeds, 1.0, cond, uncond, window=(3, 5), groups=[0, 0, 1, 1])
    # 3 steps before the window for 2 groups, 3 steps (window and after) for 4 images, each step twice (guidance)
    assert s.forward_passes - before == 2 * (3 * 2 + 3 * 4)
    x = traj.latents
    assert torch.equal(x[0, :4], x[1, :4]) and torch.equal(x[2, :4], x[3, :4])  # x_T and the ODE prefix, shared
    assert not torch.allclose(x[0, 4], x[1, 4])  # branched at the window's first step
    # the shared prefix is what each group's first image runs alone, from its own seed
    alone = grpo.sample_with_logprobs(s, [1, 3], 1.0, cond[[0, 2]], uncond[[0, 2]], window=(3, 5))
    torch.testing.assert_close(alone.latents[:, :4], x[[0, 2], :4])
    # micro-batches that split the groups ([0], [1, 2], [3]) take their rows of a prefix run once per group beforehand
    before = s.forward_passes
    per_group, rows = grpo.shared_prefix(s, seeds, cond, uncond, 3, [0, 0, 1, 1])
    assert per_group[0].shape[0] == 2 and rows.tolist() == [0, 0, 1, 1]
    parts = [grpo.sample_with_logprobs(s, [seeds[i] for i in idx], 1.0, cond[idx], uncond[idx], window=(3, 5),
                                       groups=[[0, 0, 1, 1][i] for i in idx], prefix=[p[rows[idx]] for p in per_group])
             for idx in ([0], [1, 2], [3])]
    assert s.forward_passes - before == 2 * (3 * 2 + 3 * 4)  # the same passes as one batch
    split = grpo.Trajectory.cat(parts)
    torch.testing.assert_close(split.latents, x)
    torch.testing.assert_close(split.log_probs, traj.log_probs)
    # groups in any order, run a group at a time: the same rows
    groups = ["b", "a", "a", "b"]
    chunked, where = grpo.shared_prefix(s, seeds, cond, uncond, 3, groups, chunk=1)
    whole, where_whole = grpo.shared_prefix(s, seeds, cond, uncond, 3, groups)
    assert where.tolist() == where_whole.tolist() == [0, 1, 1, 0]
    for x, y in zip(chunked, whole):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(chunked[0][[0, 1]], s.initial_latents([1, 2]))  # each group from its first image's noise


# ---- a job's counted work


def test_the_forward_passes_of_a_step_are_counted_exactly(tmp_path, cache_dir, redness):
    """metrics.forward_passes: sampling (each image, each step of the training chain, guidance's two branches),
    the PPO passes (each chosen window step, each image, each inner epoch) and the frozen base's for the KL; the
    evaluation's 6-step chain is not part of a step."""
    common = dict(steps=1, batch_size=1, group_size=2, guidance_scale=2.0, num_inference_steps=6, train_inference_steps=4,
                  sde_window=[1, 3], num_inner_epochs=2, kl_weight=0.1)
    out = run(tmp_path / "a", cache_dir, LocalReward(redness), **common)
    sampling, training = 2 * 4 * 2, 2 * 2 * 2 * 2 * 2  # images x steps x guidance; epochs x window x images x guidance x (policy, base)
    assert out["metrics"]["forward_passes"] == [sampling + training]
    assert out["metrics"]["sde_window"] == [[1, 3]]
    shared = run(tmp_path / "b", cache_dir, LocalReward(redness), **common, group_initial_noise=True)
    assert shared["metrics"]["forward_passes"] == [sampling + training - 2]  # step 0 once for the group of two
    split = run(tmp_path / "b2", cache_dir, LocalReward(redness), **common, group_initial_noise=True, sampling_micro_batches=2)
    assert split["metrics"]["forward_passes"] == [sampling + training - 2]  # still once, the group split in two parts
    full = run(tmp_path / "c", cache_dir, LocalReward(redness), **{**common, "train_inference_steps": None, "sde_window": None})
    assert full["metrics"]["forward_passes"] == [2 * 6 * 2 + 2 * 6 * 2 * 2 * 2]
    refl = JobSpec(**{**FAST, "method": "refl", "prompts": PROMPTS, "steps": 1, "num_inference_steps": 6,
                      "train_inference_steps": 4, "refl_step_range": [1, 3], "kl_weight": 0.1, "seed": 1})
    from t2i_reward.finetune.train import JobContext, run_job

    ctx = JobContext(out_dir=tmp_path / "d", reward=LocalReward(redness), prompts=PROMPTS, base_model="tiny",
                     cache_dir=cache_dir, device="cpu")
    passes = run_job(refl, ctx)["metrics"]["forward_passes"][0]
    assert passes in (1 + 1 + 1, 2 + 1 + 1)  # the steps before the drawn index (1 or 2), the one with gradients, the base's


# ---- rewards streamed while sampling


class Recording:
    """A reward that notes when it is asked, around the one it wraps."""

    def __init__(self, reward, events: list):
        self.reward, self.events, self.started = reward, events, threading.Event()

    def __call__(self, *a, **kw):
        return self.reward(*a, **kw)

    def scores(self, images, prompts, metadata=None):
        self.events.append(("score", len(images)))
        self.started.set()
        return self.reward.scores(images, prompts, metadata)

    def expert_weights(self):
        return self.reward.expert_weights()


def test_streamed_rewards_overlap_sampling_and_change_nothing(tmp_path, cache_dir, redness, monkeypatch):
    """With stream_rewards, the first micro-batch is being scored while the second is sampled (the sampler of the
    second waits until the scoring has started: without streaming it would wait forever), and the job's rewards,
    advantages and LoRA are bit for bit the sequential job's."""
    from safetensors.torch import load_file
    from t2i_reward.finetune import step as step_module

    real_sample, real_step = grpo.sample_with_logprobs, grpo.grpo_step
    common = dict(steps=2, batch_size=2, group_size=2, sampling_micro_batches=2, seed=4, learning_rate=0.1, clip_range=0.2)
    outs, adv, order = {}, {}, {}
    for streamed in (False, True):
        events: list = []
        reward = Recording(LocalReward(redness), events)
        calls, results = [], []

        def sample(*a, **kw):
            calls.append(1)
            if len(calls) % 2:  # a step's first micro-batch: what was scored before (the evaluation) does not count
                reward.started.clear()
            elif streamed:
                assert reward.started.wait(30), "the first micro-batch was not scored while the second was sampled"
            events.append(("sample", len(a[1])))
            return real_sample(*a, **kw)

        monkeypatch.setattr(grpo, "sample_with_logprobs", sample)
        monkeypatch.setitem(step_module.STEPS, "grpo", lambda state, batch: results.append(real_step(state, batch)) or results[-1])
        out = run(tmp_path / str(streamed), cache_dir, reward, **common, stream_rewards=streamed)
        outs[streamed] = (out, load_file(tmp_path / str(streamed) / "pytorch_lora_weights.safetensors"))
        adv[streamed] = [r.advantages for r in results]
        first = events.index(("sample", 2))
        order[streamed] = events[first:first + 3]
    assert order[True] == [("sample", 2), ("score", 2), ("sample", 2)]
    assert order[False] == [("sample", 2), ("sample", 2), ("score", 4)]  # the whole batch, once sampled
    (seq, seq_lora), (streamed, streamed_lora) = outs[False], outs[True]
    assert streamed["metrics"]["reward"] == seq["metrics"]["reward"]
    assert len(adv[True]) == 2 and all(torch.equal(a, b) for a, b in zip(adv[True], adv[False]))
    assert seq_lora.keys() == streamed_lora.keys() and all(torch.equal(seq_lora[k], streamed_lora[k]) for k in seq_lora)


def test_streamed_rewards_from_the_service_equal_the_in_process_ones(tmp_path, cache_dir, redness):
    """Streaming to the reward service's raw-tensor /reward: the same rewards as the in-process mixture."""
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    common = dict(steps=1, batch_size=2, group_size=2, sampling_micro_batches=2, stream_rewards=True, seed=2)
    local = run(tmp_path / "local", cache_dir, LocalReward(redness), **common)
    with running_server(create_app(Settings(), rewarder=redness)) as url:
        remote = run(tmp_path / "remote", cache_dir, RemoteReward(url), **common)
    assert remote["metrics"]["reward"] == pytest.approx(local["metrics"]["reward"], abs=1e-5)


# ---- learning with the window and the shorter training chain

WINDOWED = dict(LEARN, num_inference_steps=6, train_inference_steps=4, sde_window=[0, 2])


@pytest.mark.parametrize("base_model", LAYOUTS)
def test_grpo_learns_with_a_window_on_a_shorter_training_chain(base_model, tmp_path, cache_dir, redness):
    """Training on a 4-step chain with only its first two transitions stochastic, evaluating on the 6-step chain:
    the reward rises, and the tuned model beats the base on the evaluation's seeds; with the policy loss
    zeroed, the evaluation stays at the base's exactly."""
    out = run(tmp_path / "learn", cache_dir, LocalReward(redness), base_model=base_model, **WINDOWED)
    m = out["metrics"]
    r, third = m["reward"], len(m["reward"]) // 3
    assert sum(r[-third:]) / third > sum(r[:third]) / third, r
    assert m["eval"]["tuned"]["redness"]["mean"] > m["eval"]["base"]["redness"]["mean"] + 0.005, m["eval"]
    assert set(map(tuple, m["sde_window"])) == {(0, 2)}


@pytest.mark.parametrize("base_model", LAYOUTS)
def test_without_the_policy_loss_the_windowed_job_learns_nothing(base_model, tmp_path, cache_dir, redness, monkeypatch):
    monkeypatch.setattr(grpo, "policy_loss", lambda ratio, adv, clip_range: (ratio * 0).sum())
    out = run(tmp_path, cache_dir, LocalReward(redness), base_model=base_model, **{**WINDOWED, "steps": 3})
    ev = out["metrics"]["eval"]
    assert ev["tuned"]["redness"]["mean"] == pytest.approx(ev["base"]["redness"]["mean"], abs=1e-7)

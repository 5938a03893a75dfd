"""Active-learning jobs in-process on the tiny pipeline: learning that shows on held-out prompts (and vanishes
without the policy loss), selection by the experts' disagreement, a cancelled job resuming at its last round.
(The job through REST, Redis and a worker: tests/test_finetune.py; with the VLM judge: tests/test_mllm.py.)"""

import pytest
import torch
from t2i_reward.finetune import grpo
from t2i_reward.finetune.active import informativeness
from t2i_reward.finetune.rewards import LocalReward
from t2i_reward.finetune.spec import JobSpec
from t2i_reward.finetune.train import JobCancelled, JobContext, run_job

from .test_grpo import redness  # noqa: F401  (the fixture, and the test-only `redness` expert it registers)

PROMPTS = ["a red ball", "a red car", "a red house", "a red bird", "a red boat"]
BASE = dict(method="active_learning", base_model="tiny", prompts=PROMPTS, eval_prompts=["a red boat"], resolution=32,
            num_inference_steps=4, guidance_scale=1.0, eval_images_per_prompt=2, kl_weight=0.0, seed=0)
# GRPO on the two most informative of three drawn prompts, 8 steps a round (the GRPO learning test's settings)
LEARN = dict(rounds=2, steps=8, round_prompts=3, select_prompts=2, n_images=2, batch_size=2, group_size=4,
             learning_rate=0.1, clip_range=0.2)


def run(tmp_path, cache_dir, reward, **spec):
    s = JobSpec(**{**BASE, **spec})
    return run_job(s, JobContext(out_dir=tmp_path, reward=reward, prompts=s.prompts, base_model="tiny", cache_dir=cache_dir, device="cpu"))


def test_active_learning_raises_the_held_out_reward_round_by_round(tmp_path, cache_dir, redness):  # noqa: F811
    out = run(tmp_path, cache_dir, LocalReward(redness), **LEARN)
    curve = out["metrics"]["eval"]["by_round"]["redness"]
    assert len(curve) == 3 and curve[2] > curve[0] + 0.005, curve  # the held-out prompt, never trained on
    assert all("a red boat" not in rnd["drawn"] for rnd in out["metrics"]["rounds"])
    assert out["metrics"]["eval"]["tuned"]["redness"]["mean"] == curve[2]


def test_without_the_policy_loss_the_rounds_learn_nothing(tmp_path, cache_dir, redness, monkeypatch):  # noqa: F811
    """The learning test's criterion fails when learning is removed: every round's evaluation equals the base's."""
    monkeypatch.setattr(grpo, "policy_loss", lambda ratio, adv, clip_range: (ratio * 0).sum())
    out = run(tmp_path, cache_dir, LocalReward(redness), **{**LEARN, "steps": 2})
    curve = out["metrics"]["eval"]["by_round"]["redness"]
    assert curve == [curve[0]] * 3


def test_informativeness():
    total = torch.tensor([0.0, 1.0, 0.5, 0.5])  # prompt 0: spread 0.5; prompt 1: none
    agree = {"a": torch.tensor([0.0, 1.0, 3.0, 4.0]), "b": torch.tensor([0.0, 2.0, 1.0, 0.0])}
    assert informativeness("spread", total, agree, 2) == pytest.approx([0.5, 0.0])
    # prompt 0: both experts order its candidates alike (no disagreement); prompt 1: opposite orders
    dis = informativeness("disagreement", total, agree, 2)
    assert dis[0] == pytest.approx(0.0, abs=1e-6) and dis[1] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="at least two experts"):
        informativeness("disagreement", total, {"a": agree["a"]}, 2)


def test_a_cancelled_job_resumes_inside_its_round(tmp_path, cache_dir, tiny):
    """Cancelled in the middle of round 2, run again in the same directory: it goes on from the checkpoint the
    cancel wrote, without generating round 2's candidates again, and ends with the uninterrupted job's
    rounds, rewards and evaluations."""
    spec = dict(rounds=2, steps=2, round_prompts=2, select_prompts=1, n_images=2, group_size=2, learning_rate=0.05, clip_range=0.2,
                select="disagreement")  # GRPO: its sampling noise is seeded, so the two runs can be compared
    whole = run(tmp_path / "whole", cache_dir, LocalReward(tiny), **spec)
    s = JobSpec(**{**BASE, **spec})
    calls = []

    def stop_in_round_two():  # asked before every step: steps 0 and 1 are round 1's, 2 and 3 round 2's
        calls.append(1)
        return len(calls) > 3

    ctx = dict(reward=LocalReward(tiny), prompts=s.prompts, base_model="tiny", cache_dir=cache_dir, device="cpu")
    with pytest.raises(JobCancelled, match="round 2"):
        run_job(s, JobContext(out_dir=tmp_path / "cut", should_stop=stop_in_round_two, **ctx))
    feedback = tmp_path / "cut" / "rounds" / "02" / "feedback.json"
    written = feedback.stat().st_mtime_ns
    again = run_job(s, JobContext(out_dir=tmp_path / "cut", **ctx))
    assert again["metrics"]["resumed_at"] == [3] and feedback.stat().st_mtime_ns == written  # not generated again
    assert again["metrics"]["reward"] == pytest.approx(whole["metrics"]["reward"], rel=1e-4, abs=1e-6)
    assert [r["selected"] for r in again["metrics"]["rounds"]] == [r["selected"] for r in whole["metrics"]["rounds"]]
    for name, curve in whole["metrics"]["eval"]["by_round"].items():
        assert again["metrics"]["eval"]["by_round"][name] == pytest.approx(curve, rel=1e-4, abs=1e-6)


def test_held_out_prompts_are_spread_over_the_list():
    """Every 4th prompt (at least 1, at most 16), so that with topics (stored topic by topic) each topic is
    evaluated; given eval_prompts leave the pool; nothing left to train on is an error."""
    from t2i_reward.finetune.prepare import training_and_held_out

    prompts = [f"p{i}" for i in range(40)]
    pool, held = training_and_held_out(prompts, None)
    assert held == [f"p{i}" for i in range(3, 40, 4)] and set(pool) == set(prompts) - set(held)
    assert len(training_and_held_out([f"p{i}" for i in range(400)], None)[1]) == 16
    assert training_and_held_out(["a", "b", "a"], None) == (["a"], ["b"])
    assert training_and_held_out(["a", "b", "c"], ["b"]) == (["a", "c"], ["b"])
    with pytest.raises(ValueError, match="training prompts besides the held-out"):
        training_and_held_out(["a"], None)

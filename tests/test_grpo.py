"""GRPO / DDPO jobs on the tiny pipeline: the sampler's log-probabilities, group advantages, learning that
can be seen (and vanishes without the policy loss), remote rewards equal to in-process ones, the preset."""


import pytest
import torch
from pydantic import ValidationError
from t2i_reward.finetune import grpo
from t2i_reward.finetune.advantages import PromptStats, advantages
from t2i_reward.finetune.rewards import LocalReward, RemoteReward
from t2i_reward.finetune.spec import JobSpec
from t2i_reward.finetune.train import JobContext, run_job
from t2i_reward.rewarders import create_rewarder
from t2i_reward.rewarders.registry import register_expert
from t2i_reward.rewarders.testing import Redness

from .conftest import running_server

FAST = dict(base_model="tiny", resolution=32, num_inference_steps=4, guidance_scale=1.0, eval_images_per_prompt=1,
            learning_rate=3e-2, checkpoint_every=100, eval_prompts=["a red ball"], kl_weight=0.0)
PROMPTS = ["a red ball", "a red car"]


@pytest.fixture(scope="module")
def redness(cache_dir):
    return create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", normalize=False,
                           experts={"imagereward": None, "aesthetic": None, "mlp": None, "redness": {}})


def run(tmp_path, cache_dir, reward, **spec):
    s = JobSpec(**{**FAST, "method": "grpo", "prompts": PROMPTS, **spec})
    ctx = JobContext(out_dir=tmp_path, reward=reward, prompts=PROMPTS, base_model=s.base_model, cache_dir=cache_dir, device="cpu")
    return run_job(s, ctx)


# a short job that learns redness on every tiny pipeline (seeded; about 15 s each on one CPU core)
LEARN = dict(steps=15, batch_size=2, group_size=4, learning_rate=0.1, clip_range=0.2, seed=0)


@pytest.mark.parametrize("base_model", ["tiny", "tiny-sdxl", "tiny-sd3"])
def test_grpo_learns_a_reward_on_each_tiny_pipeline(base_model, tmp_path, cache_dir, redness):
    """DDIM with eta = 1 (SD, SDXL) and the flow-matching SDE (SD3): the reward of the last third of the steps is
    above the first third's, and the tuned model beats the base on the evaluation's seeds."""
    out = run(tmp_path, cache_dir, LocalReward(redness), base_model=base_model, **LEARN)
    r, third = out["metrics"]["reward"], len(out["metrics"]["reward"]) // 3
    assert sum(r[-third:]) / third > sum(r[:third]) / third, r
    ev = out["metrics"]["eval"]
    assert ev["tuned"]["redness"]["mean"] > ev["base"]["redness"]["mean"] + 0.005, ev
    assert out["metrics"]["components"]["redness"] == pytest.approx(r)  # the expert's own curve is stored


def test_without_the_policy_loss_nothing_is_learned(tmp_path, cache_dir, redness, monkeypatch):
    """The learning test's criterion fails when the policy loss is replaced by zero: with no KL either, the LoRA
    stays at its initial zero, and the tuned model's evaluation equals the base's exactly."""
    monkeypatch.setattr(grpo, "policy_loss", lambda ratio, adv, clip_range: (ratio * 0).sum())
    out = run(tmp_path, cache_dir, LocalReward(redness), **{**LEARN, "steps": 3})
    ev = out["metrics"]["eval"]
    assert ev["tuned"]["redness"]["mean"] == pytest.approx(ev["base"]["redness"]["mean"], abs=1e-7)


def test_logprob_of_the_sampled_step_matches_the_gaussian():
    x = torch.zeros(2, 4)
    mean, std = torch.zeros(2, 4), torch.full((1,), 2.0)
    expected = -0.5 * torch.log(torch.tensor(2 * torch.pi * 4.0))
    assert grpo.gaussian_log_prob(x, mean, std).tolist() == pytest.approx([float(expected)] * 2, abs=1e-6)


def test_ppo_clip():
    ratio = torch.tensor([0.5, 1.0, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0])
    # positive advantages: the ratio counts up to 1 + eps only
    assert float(grpo.policy_loss(ratio, adv, 0.2)) == pytest.approx(-(0.5 + 1.0 + 1.2) / 3)
    assert float(grpo.policy_loss(ratio, -adv, 0.2)) == pytest.approx((0.8 + 1.0 + 1.5) / 3)


def test_per_prompt_stats_and_resume_state():
    stats = PromptStats(buffer_size=4, min_count=2)
    first = stats.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    assert first[:2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-3)  # "a" has 2 rewards: its own stats
    assert abs(float(first[2]) - (5 - 3) / (torch.tensor([1.0, 3.0, 5.0]).std(unbiased=False) + 1e-4)) < 1e-4  # "b": the batch's
    again = PromptStats.from_dict(stats.to_dict())
    assert again.buffers == {"a": [1.0, 3.0], "b": [5.0]}
    assert again.update(["a"], torch.tensor([2.0])).tolist() == pytest.approx([0.0], abs=1e-4)


def test_grpo_spec_rules():
    with pytest.raises(ValidationError, match="group_size >= 2"):
        JobSpec(method="grpo", prompts=["x"], group_size=1)
    ddpo = JobSpec(method="ddpo", prompts=["x"])
    assert (ddpo.group_size, ddpo.per_prompt_stats, ddpo.kl_weight, ddpo.is_policy_gradient) == (1, True, 0.0, True)
    assert JobSpec(method="ddpo", prompts=["x"], group_size=3).group_size == 3  # a preset, not a lock
    with pytest.raises(ValidationError, match="images per step"):
        JobSpec(method="grpo", prompts=["x"], batch_size=64, group_size=8)
    with pytest.raises(ValidationError, match="greater than 0"):
        JobSpec(method="grpo", prompts=["x"], eta=0.0)


def test_a_grpo_job_runs_end_to_end_and_moves_the_lora(tmp_path, cache_dir, redness):
    """The whole job: sampling with log-probs, group advantages, PPO updates, checkpoints, evaluation, the
    LoRA artifact."""
    out = run(tmp_path, cache_dir, LocalReward(redness), steps=2, batch_size=1, group_size=3, seed=3, checkpoint_every=1)
    m = out["metrics"]
    assert out["status"] == "succeeded" and len(m["reward"]) == 2 and len(m["clip_fraction"]) == 2
    assert all(0 <= c <= 1 for c in m["clip_fraction"]) and m["clip_fraction"][0] == 0  # one inner epoch: ratio 1
    assert "pytorch_lora_weights.safetensors" in out["artifacts"]
    from safetensors.torch import load_file

    lora = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)  # B starts at 0


def test_ddpo_preset_keeps_its_per_prompt_statistics_across_a_resume(tmp_path, cache_dir, redness):

    first = run(tmp_path, cache_dir, LocalReward(redness), method="ddpo", steps=1, batch_size=2, seed=1)
    assert first["status"] == "succeeded"
    # a job cut off after a checkpoint: the next run restores the statistics before its next step
    spec = JobSpec(**{**FAST, "method": "ddpo", "prompts": PROMPTS, "steps": 3, "batch_size": 2, "checkpoint_every": 1,
                      "stat_min_count": 2})
    seen = []
    real = PromptStats.update

    def spy(self, prompts, rewards):
        seen.append({k: len(v) for k, v in self.buffers.items()})
        return real(self, prompts, rewards)

    PromptStats.update = spy
    try:
        calls = {"n": 0}

        def stop_after_two():
            calls["n"] += 1
            return calls["n"] > 2

        ctx = JobContext(out_dir=tmp_path / "cut", reward=LocalReward(redness), prompts=PROMPTS, base_model="tiny",
                         cache_dir=cache_dir, device="cpu", should_stop=stop_after_two)
        from t2i_reward.finetune.train import JobCancelled

        with pytest.raises(JobCancelled):
            run_job(spec, ctx)
        ctx.should_stop = None
        run_job(spec, ctx)
    finally:
        PromptStats.update = real
    # steps 0, 1 before the cut, then step 2 after the resume starts from the buffers the checkpoint kept
    assert seen[0] == {} and seen[1] == {p: 1 for p in PROMPTS} and seen[2] == {p: 2 for p in PROMPTS}


def test_remote_rewards_give_the_same_first_step_advantages(tmp_path, cache_dir, redness):
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    spec = JobSpec(**{**FAST, "method": "grpo", "prompts": PROMPTS, "group_size": 3, "batch_size": 2})
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = [p for p in PROMPTS for _ in range(3)]
    local = LocalReward(redness)
    with running_server(create_app(Settings(), rewarder=redness)) as url:
        remote = RemoteReward(url)
        (lt, lc), (rt, rc) = local.scores(images, prompts), remote.scores(images, prompts)
        assert remote.expert_weights() == local.expert_weights() == {"redness": 1.0}
    a = advantages(spec, prompts, lt, lc, local.expert_weights(), None)
    b = advantages(spec, prompts, rt, rc, local.expert_weights(), None)
    assert a.tolist() == pytest.approx(b.tolist(), abs=1e-4)
    assert a[:3].sum().item() == pytest.approx(0, abs=1e-4)  # z-scores within each prompt's group


def test_remote_rewards_use_as_few_balanced_requests_as_the_service_allows(redness):
    """RemoteReward.scores sizes its /reward requests from the service's limits (GET /models): one request
    when the batch fits, else balanced ones (17 images at most 8 per request: 6, 6 and 5, never a lone
    image); the scores equal the in-process ones."""
    import httpx
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    def reward_requests(url):
        text = httpx.get(url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("t2i_requests_total") and 'endpoint="/reward"' in line)

    images = torch.rand(17, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(17)]
    local_total, _ = LocalReward(redness).scores(images, prompts)
    for max_images, sent in ((64, 1), (8, 3)):
        with running_server(create_app(Settings(max_images=max_images), rewarder=redness)) as url:
            remote = RemoteReward(url)
            assert remote.client.models()["limits"]["max_images"] == max_images
            assert remote.request_size(images) == (17 if max_images == 64 else 6)
            total, _ = remote.scores(images, prompts)
            assert reward_requests(url) == sent
        assert total.tolist() == pytest.approx(local_total.tolist(), abs=1e-5)


def test_per_expert_advantages_weight_the_z_scores():
    spec = JobSpec(method="grpo", prompts=["x"], advantage_normalization="per_expert")
    comps = {"a": torch.tensor([1.0, 2.0, 10.0, 20.0]), "b": torch.tensor([5.0, 1.0, 0.0, 0.0])}
    adv = advantages(spec, ["p", "p", "q", "q"], torch.zeros(4), comps, {"a": 2.0, "b": 1.0}, None)
    # within each pair, a z-score is +-1 (up to eps); b is constant in q
    assert adv.tolist() == pytest.approx([-2 + 1, 2 - 1, -2, 2], abs=1e-3)


@register_expert
class Blueness(Redness):
    """Test-only: the opposite of `redness`, so optimising one makes the other fall (a held-out expert)."""

    name = "blueness"

    def forward(self, pixels, prompts, image_embeds=None, text_embeds=None):
        return -super().forward(pixels, prompts)


def test_the_sentinel_stops_a_job_whose_held_out_expert_falls(tmp_path, cache_dir):
    """ReFL on redness (weight 1) with blueness held out (weight 0): as redness rises blueness falls, and the
    sentinel stops the job with the reason, keeping the best LoRA before the hacking."""
    mixture = create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu", normalize=False,
                              experts={"imagereward": None, "aesthetic": None, "mlp": None, "redness": {},
                                       "blueness": {"weight": 0.0}})
    spec = JobSpec(**{**FAST, "method": "refl", "prompts": PROMPTS, "steps": 12, "refl_step_range": [2, 4],
                      "learning_rate": 5e-2, "eval_every": 2, "stop_on_hacking": True, "hacking_threshold_se": 3.0,
                      "eval_prompts": PROMPTS, "eval_images_per_prompt": 2})
    ctx = JobContext(out_dir=tmp_path, reward=LocalReward(mixture), prompts=PROMPTS, base_model="tiny",
                     cache_dir=cache_dir, device="cpu")
    out = run_job(spec, ctx)
    history = out["metrics"]["sentinel"]
    assert history[0]["step"] == 0 and {"redness", "blueness", "image.saturation", "image.high_freq"} <= set(history[0]["metrics"])
    assert out["status"] == "failed" and "stopped for reward hacking: held-out expert 'blueness'" in out["error"], out.get("error")
    assert len(out["metrics"]["reward"]) < 12  # it stopped early
    assert "report.png" in out["artifacts"] and "metrics.json" in out["artifacts"]

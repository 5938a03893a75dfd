"""The tiny pipelines of each layout (SD 1.x, SDXL, SD3), layout detection, and LoRA artifacts that each
layout's own `load_lora_weights` reads back. Offline: everything is built from packaged files."""

import json

import pytest
import torch
from t2i_reward.finetune import tiny as tiny_module
from t2i_reward.finetune.pipeline import (
    LORA_FILE,
    TINY_LAYOUTS,
    base_model_layout,
    load_pipeline,
    model_layout,
    pipeline_layout,
    save_lora,
)
from t2i_reward.finetune.tiny import TINY_PIPELINES

LAYOUTS = {"tiny": ("StableDiffusionPipeline", "sd"), "tiny-sdxl": ("StableDiffusionXLPipeline", "sdxl"),
           "tiny-sd3": ("StableDiffusion3Pipeline", "sd3")}
BUILDERS = {"tiny": "_build", "tiny-sdxl": "_build_sdxl", "tiny-sd3": "_build_sd3"}


@pytest.fixture(autouse=True, scope="module")
def offline_and_one_thread():
    """Offline; one intra-op thread (tiny models gain nothing from more, and on a busy machine the
    spinning threads make each forward several times slower)."""
    mp, threads = pytest.MonkeyPatch(), torch.get_num_threads()
    mp.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def pipes(cache_dir):
    """One pipeline per layout, loaded with `load_pipeline` and never adapted before the LoRA test loads into it."""
    return {name: load_pipeline(name, cache_dir) for name in LAYOUTS}


def denoiser(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def denoise(pipe, seed: int = 0) -> torch.Tensor:
    """One denoiser forward on fixed random latents and text conditioning, as the pipeline calls it."""
    model = denoiser(pipe)
    g = torch.Generator().manual_seed(seed)
    c = model.config
    latents = torch.randn(2, c.in_channels, 16, 16, generator=g)
    with torch.no_grad():
        if hasattr(pipe, "transformer"):  # SD3: context = CLIP + T5 tokens at T5's width; pooled CLIP projections
            return model(latents, encoder_hidden_states=torch.randn(2, 77 + 16, c.joint_attention_dim, generator=g),
                         pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                         timestep=torch.tensor([500.0, 500.0]), return_dict=False)[0]
        context = torch.randn(2, 77, c.cross_attention_dim, generator=g)
        added = None
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embeds + (size, crop, target size)
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            added = {"text_embeds": torch.randn(2, pooled, generator=g),
                     "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
        return model(latents, torch.tensor([500, 500]), context, added_cond_kwargs=added, return_dict=False)[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tiny_pipeline_builds_once_loads_and_samples(name, cache_dir, pipes, monkeypatch):
    path = TINY_PIPELINES[name](cache_dir)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == LAYOUTS[name][0] and pipeline_layout(path) == LAYOUTS[name][1]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}-")]  # no temp dir left behind

    def no_rebuild(out):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(tiny_module, BUILDERS[name], no_rebuild)
    assert TINY_PIPELINES[name](cache_dir) == path
    assert base_model_layout(name) == base_model_layout(str(path)) == LAYOUTS[name][1]
    pipe = pipes[name]
    assert type(pipe).__name__ == LAYOUTS[name][0] and pipeline_layout(pipe) == LAYOUTS[name][1]
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 16} if name == "tiny-sd3" else {}
    image = pipe("a red apple", height=32, width=32, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0), **extra).images
    assert image.shape == (1, 32, 32, 3) and 0 <= image.min() <= image.max() <= 1 and image.std() > 0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_artifact_loads_with_the_layouts_own_loader(name, cache_dir, pipes, tmp_path):
    from peft import LoraConfig

    pipe = load_pipeline(TINY_PIPELINES[name](cache_dir).as_posix(), cache_dir)  # an absolute directory loads too
    model = denoiser(pipe)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",  # alpha != r: the scale must survive
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    adapted = denoise(pipe)
    layout = LAYOUTS[name][1]
    assert model_layout(model) == layout
    file = save_lora(model, tmp_path, layout) if layout != "sd" else save_lora(model, tmp_path)  # the trainer's call
    assert file == tmp_path / LORA_FILE and file.is_file()

    fresh = pipes[name]  # loaded apart from `pipe`, without adapters
    base = denoise(fresh)
    fresh.load_lora_weights(tmp_path, weight_name=LORA_FILE)
    loaded = denoise(fresh)
    assert not torch.allclose(base, loaded, atol=1e-3), "the LoRA changes nothing"
    torch.testing.assert_close(loaded, adapted, atol=1e-5, rtol=1e-4)
    fresh.unload_lora_weights()
    torch.testing.assert_close(denoise(fresh), base)


def test_unknown_layouts_are_refused_with_a_clear_message(tmp_path):
    from t2i_reward.finetune.prepare import prepare_job  # noqa: F401  (the API's 422 comes from a ValueError in preparation)

    for class_name, words in (("KandinskyPipeline", "unsupported pipeline layout 'KandinskyPipeline'"),
                              ("FluxPipeline", "known, but jobs cannot fine-tune it")):
        d = tmp_path / class_name
        d.mkdir()
        (d / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        with pytest.raises(ValueError, match=words) as e:
            pipeline_layout(d)
        assert "supported: StableDiffusionPipeline" in str(e.value) and str(tmp_path) not in str(e.value)
        with pytest.raises(ValueError, match=f"base_model '{class_name}': unsupported"):
            load_pipeline(str(d), tmp_path)  # refused before anything is loaded
        with pytest.raises(ValueError, match=f"base_model 'org/x': unsupported pipeline layout '{class_name}'"):
            base_model_layout(str(d), "org/x")  # what job preparation calls, without loading anything
    assert base_model_layout("org/not-in-the-hub-cache") is None  # known only after the download
    assert set(TINY_LAYOUTS) == set(TINY_PIPELINES)
    with pytest.raises(ValueError, match="no readable model_index.json"):
        pipeline_layout(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unsupported pipeline layout None"):
        pipeline_layout({})
    with pytest.raises(ValueError, match="no LoRA layout"):
        model_layout(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("method", ["refl", "reward_weighted"])
def test_noise_prediction_methods_are_refused_on_flow_matching(method):
    """Job preparation reads the layout (nothing is built or loaded) and refuses it with a message: a 422."""
    from t2i_reward.finetune.prepare import check_layout
    from t2i_reward.finetune.spec import JobSpec

    with pytest.raises(ValueError, match=f"method '{method}' cannot run on a sd3 pipeline .*use method 'grpo'"):
        check_layout(JobSpec(method=method, prompts=["x"], base_model="tiny-sd3"), "tiny-sd3")
    for base_model in ("tiny", "tiny-sdxl"):
        check_layout(JobSpec(method=method, prompts=["x"], base_model=base_model), base_model)
    for base_model in ("tiny", "tiny-sdxl", "tiny-sd3"):
        check_layout(JobSpec(method="grpo", prompts=["x"], base_model=base_model), base_model)


@pytest.mark.parametrize("method", ["refl", "reward_weighted"])
def test_refl_and_reward_weighted_jobs_run_on_sdxl(method, cache_dir, tmp_path):
    """SDXL's added conditioning (pooled text embeds, size ids) reaches the UNet in both losses; the LoRA moves
    and loads into the SDXL pipeline with its own loader."""
    from t2i_reward.finetune.rewards import LocalReward
    from t2i_reward.finetune.spec import JobSpec
    from t2i_reward.finetune.train import JobContext, run_job
    from t2i_reward.rewarders import create_rewarder

    reward = LocalReward(create_rewarder(profile="tiny", cache_dir=cache_dir, device="cpu"))
    spec = JobSpec(method=method, base_model="tiny-sdxl", prompts=["a red ball"], steps=2, resolution=32,
                   num_inference_steps=4, refl_step_range=(2, 4), guidance_scale=2.0, eval_images_per_prompt=1,
                   learning_rate=1e-2)
    out = run_job(spec, JobContext(out_dir=tmp_path, reward=reward, prompts=spec.prompts, base_model="tiny-sdxl",
                                   cache_dir=cache_dir, device="cpu"))
    assert out["status"] == "succeeded" and len(out["metrics"]["loss"]) == 2
    pipe = load_pipeline("tiny-sdxl", cache_dir)
    base = denoise(pipe)
    pipe.load_lora_weights(tmp_path, weight_name=LORA_FILE)
    assert not torch.allclose(base, denoise(pipe), atol=1e-6)  # the trained LoRA changes the SDXL UNet


def test_refl_kl_at_sdxls_noise_free_last_step_is_the_prediction_distance(cache_dir):
    """SDXL's DDIM schedule ends at alpha = 1, so its last step has no noise and no Gaussian to compare: ReFL's
    KL there is the squared distance of the LoRA's and the base's predictions (before, it divided by a zero
    std and reached 1e4); at a noisy step it is the Gaussian KL."""
    import contextlib

    from t2i_reward.finetune.losses import step_kl
    from t2i_reward.finetune.pipeline import adapters_disabled, setup_models
    from t2i_reward.finetune.sampler import MIN_STD, Sampler, transition_kl
    from t2i_reward.finetune.spec import JobSpec

    spec = JobSpec(method="refl", base_model="tiny-sdxl", prompts=["a red ball"], resolution=32, num_inference_steps=4,
                   refl_step_range=(2, 4), guidance_scale=1.0)
    models = setup_models(spec, "tiny-sdxl", cache_dir, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    for p in models.params:
        p.data.normal_(0, 0.05)  # a LoRA away from the base
    s = Sampler(models, 1.0, torch.device("cpu"), contextlib.nullcontext)
    cond, uncond = s.conditions(["a red ball"])
    latents = s.initial_latents([0])
    with torch.no_grad():
        for k, noisy in ((s.num_steps - 1, False), (1, True)):
            e = s.predict(latents, k, cond, uncond)
            with adapters_disabled(models.denoiser, True):
                e_base = s.predict(latents, k, cond, uncond)
            mean, std = s.transition(e, latents, k, 1.0)
            assert (float(std) > MIN_STD) == noisy
            expected = transition_kl(mean, s.transition(e_base, latents, k, 1.0)[0], std) if noisy else ((e - e_base) ** 2).mean()
            kl = step_kl(s, latents, k, cond, uncond, e)
            assert 0 < float(kl) < 1.0 and float(kl) == pytest.approx(float(expected), rel=1e-5)

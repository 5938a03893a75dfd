"""One fine-tuning job, top to bottom: accelerator -> models -> (resume) -> base evaluation -> loop -> save.

`run_job` looks the spec's method up in `METHODS`: the training methods run `run_training` below,
`generate` (best-of-n, no training) runs `generate.py` and `active_learning` `active.py`. The pieces live
beside it: `context.py` (the JobContext, the TrainState a step works with), `step.py` (setup and one
optimiser step of any method), `pipeline.py` (models, LoRA), `sampler.py` (each layout's conditioning,
predictions and transitions), `losses.py` (the ReFL and reward-weighted likelihood steps), `grpo.py`
(GRPO / DDPO: sampling with log-probabilities, PPO updates; their advantages in `advantages.py`),
`rewards.py` (the `Reward` a job scores with), `sentinel.py` (reward hacking), `artifacts.py`
(checkpoints, evaluation, artifacts). Under `accelerate launch` / `torchrun` every process takes its own
device and its own share of each step's prompts; gradients are averaged in `TrainState.average_gradients`,
and the main process evaluates and writes.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .active import run_active_learning
from .artifacts import (
    artifact_names,
    eval_batch,
    load_samples,
    save_checkpoint,
    save_images,
    summarise,
    write_final,
)
from .context import JobCancelled, JobContext, TrainState, score
from .context import guard as _guard
from .generate import run_generate
from .pipeline import LORA_FILE, save_lora
from .prompts import PromptMetadata
from .rewards import Reward
from .sentinel import Sentinel
from .spec import JobSpec
from .step import setup_training, train_step

log = logging.getLogger(__name__)

__all__ = ["JobCancelled", "JobContext", "LORA_FILE", "artifact_names", "run_job"]


def run_job(spec: JobSpec, ctx: JobContext) -> dict:
    """Run (or resume) the job; returns {"status", "metrics", "artifacts", "main_process"}. Raises JobCancelled.
    A context without a metadata table takes the spec's (`prompt_metadata`, `eval_prompt_metadata`)."""
    if ctx.metadata is None:
        ctx.metadata = PromptMetadata.of_spec(spec)
    return METHODS[spec.method](spec, ctx)


def run_training(spec: JobSpec, ctx: JobContext) -> dict:
    """A job of a training method (refl, reward_weighted, grpo, ddpo); returns the job's result like `run_job`."""
    from tqdm.auto import tqdm

    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- accelerator (the device, mixed precision on a GPU) and models, resumed from the last checkpoint if any
    state, start, base_eval, extra = setup_training(spec, ctx)
    accelerator, models, sampler = state.accelerator, state.models, state.sampler
    main = accelerator.is_main_process
    sentinel = None
    if spec.eval_every:  # every configured expert, the optimised (non-zero weight) and the held-out ones
        sentinel = Sentinel.from_dict(extra["sentinel"]) if extra.get("sentinel") else \
            Sentinel({n for n, w in state.weights.items() if w != 0}, spec.hacking_threshold_se, spec.stop_on_hacking)

    def checkpoint_state() -> dict:  # the method's own state, saved with each checkpoint
        out = {"prompt_stats": state.stats.to_dict()} if state.stats is not None else {}
        return {**out, "sentinel": sentinel.to_dict()} if sentinel is not None else out

    ctx.metrics["processes"] = accelerator.num_processes
    eval_prompts = spec.eval_prompts or ctx.prompts[:4]
    eval_p, eval_seeds = eval_batch(eval_prompts, spec.eval_images_per_prompt)
    if base_eval is None and main:
        base_images = sampler.sample(eval_p, eval_seeds, base=True)
        total, components = score(ctx.reward, base_images, eval_p, ctx.metadata_for(eval_p))
        base_eval = summarise(total, components)
        if sentinel is not None:
            sentinel.observe(0, total, components, base_images)  # the baseline the drifts are measured from
        _guard(ctx)
        save_images(base_images, out / "samples", "base")

    # ---- loop
    t0, first = time.perf_counter(), start
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps, desc=f"{spec.method} job", mininterval=1.0,
               disable=not main)
    for step in bar:
        _guard(ctx)
        if ctx.should_stop is not None and ctx.should_stop():
            if main:
                save_checkpoint(out, step, models.denoiser, models.optimizer, ctx.metrics, base_eval, checkpoint_state(), root=ctx.checkpoint_dir)
            raise JobCancelled(f"cancelled at step {step}")
        rng = random.Random(spec.seed * 1_000_003 + step + 7_919 * accelerator.process_index)
        first_prompt = (step * accelerator.num_processes + accelerator.process_index) * spec.batch_size
        prompts = [ctx.prompts[(first_prompt + k) % len(ctx.prompts)] for k in range(spec.batch_size)]
        train_step(state, prompts, step, rng)
        done = step + 1
        eta = (time.perf_counter() - t0) / (done - first) * (spec.steps - done)
        bar.set_postfix(reward=f"{ctx.metrics['reward'][-1]:.3f}", loss=f"{ctx.metrics['loss'][-1]:.3f}")
        if sentinel is not None and done % spec.eval_every == 0 and done < spec.steps and main:
            stopped = watch(state, ctx, sentinel, out, done, eval_p, eval_seeds)
            if stopped is not None and accelerator.num_processes > 1:  # the other processes would wait for it forever
                log.warning("step %d: %s; stop_on_hacking stops single-process jobs only: going on", done, stopped)
                stopped = None
            if stopped is not None:
                return finish(state, ctx, out, eval_prompts, eval_p, eval_seeds, base_eval, sentinel, stopped)
        if done % spec.checkpoint_every == 0 and done < spec.steps and main:
            _guard(ctx)
            save_checkpoint(out, done, models.denoiser, models.optimizer, ctx.metrics, base_eval, checkpoint_state(), root=ctx.checkpoint_dir)
        if ctx.on_progress is not None and main:
            ctx.on_progress({"step": done, "total": spec.steps, "eta_s": round(eta, 1)})

    # ---- save (main process): LoRA in the diffusers format, metrics, samples, report
    accelerator.wait_for_everyone()
    if not main:
        return {"status": "succeeded", "metrics": ctx.metrics, "artifacts": [], "main_process": False}
    return finish(state, ctx, out, eval_prompts, eval_p, eval_seeds, base_eval, sentinel)


def watch(state: TrainState, ctx: JobContext, sentinel: Sentinel, out: Path, step: int, eval_p: list[str],
          eval_seeds: list[int]) -> Optional[str]:
    """The sentinel's evaluation at `step`: every expert and the image statistics on the evaluation prompts,
    their drift from the base model; the LoRA of the best step so far is kept in `best/`. Returns why the
    job must stop (reward hacking, with `stop_on_hacking`), else None."""
    images = state.sampler.sample(eval_p, eval_seeds)
    total, components = score(state.reward, images, eval_p, state.metadata_for(eval_p))
    record = sentinel.observe(step, total, components, images)
    ctx.metrics["sentinel"] = sentinel.to_dict()["history"]
    _guard(ctx)
    if sentinel.best_step == step:
        save_lora(state.models.denoiser, out / "best")
    return sentinel.should_stop(record)


def finish(state: TrainState, ctx: JobContext, out: Path, eval_prompts: list[str], eval_p: list[str], eval_seeds: list[int],
           base_eval: dict, sentinel: Optional[Sentinel], stopped: Optional[str] = None) -> dict:
    """Evaluate the tuned model on the base's seeds and write the artifacts. A job the sentinel stopped
    keeps the LoRA of its best step before the hacking (or none, if no step was better) and fails with
    the reason."""
    import shutil

    state.models.denoiser.eval()
    tuned_images = state.sampler.sample(eval_p, eval_seeds)
    tuned_eval = evaluate(state.reward, tuned_images, eval_p, state.metadata_for(eval_p))
    _guard(ctx)
    save_images(tuned_images, out / "samples", "tuned")
    best = out / "best" / LORA_FILE
    kept_best = stopped is not None and best.is_file()
    if stopped is None:
        save_lora(state.models.denoiser, out)
    elif kept_best:
        shutil.copy(best, out / LORA_FILE)
    shutil.rmtree(out / "best", ignore_errors=True)
    base_images = load_samples(out, "base", state.spec.resolution)
    metrics = write_final(out, ctx.metrics, eval_prompts, base_eval, tuned_eval, base_images, tuned_images,
                          sentinel.to_dict() if sentinel is not None else None)
    result = {"status": "succeeded", "metrics": metrics, "artifacts": artifact_names(out), "main_process": True}
    if stopped is not None:
        kept = f"kept the LoRA of step {sentinel.best_step}" if kept_best else "kept no LoRA: no evaluated step was free of hacking"
        result.update(status="failed", error=f"stopped for reward hacking: {stopped}; {kept}")
    return result


def evaluate(reward: Reward, images: torch.Tensor, prompts: list[str],
             metadata: Optional[list[dict]] = None) -> dict[str, dict[str, float]]:
    """Every scorer's mean and standard error on the evaluation images, from one reward call."""
    return summarise(*score(reward, images, prompts, metadata))


# method (`JobSpec.method`, which admits these names only) -> the function that runs its job
# (tests/test_finetune.py checks the two lists are the same)
METHODS: dict[str, Callable[[JobSpec, JobContext], dict]] = {
    "refl": run_training,
    "reward_weighted": run_training,
    "grpo": run_training,
    "ddpo": run_training,
    "generate": run_generate,  # best-of-n: no training
    "active_learning": run_active_learning,  # rounds of generate, select, train, evaluate
}

"""One fine-tuning job, top to bottom: accelerator -> models -> (resume) -> base evaluation -> loop -> save.

The pieces live beside it: `context.py` (the JobContext), `pipeline.py` (models, LoRA), `sampler.py`
(each layout's conditioning, predictions and transitions), `losses.py` (ReFL and reward-weighted likelihood:
one loss each), `grpo.py` (GRPO / DDPO: sampling with log-probabilities, group advantages, PPO updates),
`sentinel.py` (reward hacking), `artifacts.py` (checkpoints, evaluation, artifacts), `step.py` (one
optimiser step of any method); `generate.py` runs `method: generate` (best-of-n, no training) and
`active.py` `method: active_learning` through the same door. Under
`accelerate launch` / `torchrun` every process takes its own device and its own share of each step's
prompts; gradients are averaged in `step.average_gradients`, and the main process evaluates and writes.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Optional

import torch

from .artifacts import (
    artifact_names,
    eval_batch,
    load_samples,
    resume,
    save_checkpoint,
    save_images,
    summarise,
    write_final,
)
from .context import JobCancelled, JobContext, score
from .context import guard as _guard
from .grpo import PromptStats
from .losses import RewardFn
from .pipeline import LORA_FILE, save_lora
from .sentinel import Sentinel
from .spec import JobSpec
from .step import setup_training, train_step

log = logging.getLogger(__name__)

__all__ = ["JobCancelled", "JobContext", "LORA_FILE", "artifact_names", "run_job"]


def run_job(spec: JobSpec, ctx: JobContext) -> dict:
    """Run (or resume) the job; returns {"status", "metrics", "artifacts", "main_process"}. Raises JobCancelled."""
    if spec.method == "generate":  # best-of-n: no training (generate.py)
        from .generate import run_generate

        return run_generate(spec, ctx)
    if spec.method == "active_learning":  # rounds of generate, select, train, evaluate (active.py)
        from .active import run_active_learning

        return run_active_learning(spec, ctx)
    from tqdm.auto import tqdm

    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- accelerator (the device, mixed precision on a GPU) and models
    accelerator, models, sampler, pairs = setup_training(spec, ctx)
    main = accelerator.is_main_process

    # ---- resume, and the base model's evaluation once, before any update
    start, base_eval, extra = resume(out, models.denoiser, models.optimizer, ctx.metrics, root=ctx.checkpoint_dir)
    stats = PromptStats.for_spec(spec, extra.get("prompt_stats"))  # DDPO's statistics, as the checkpoint left them
    weights = ctx.reward.expert_weights() if (spec.is_policy_gradient or spec.eval_every) and hasattr(ctx.reward, "expert_weights") else {}
    sentinel = None
    if spec.eval_every:  # every configured expert, the optimised (non-zero weight) and the held-out ones
        sentinel = Sentinel.from_dict(extra["sentinel"]) if extra.get("sentinel") else \
            Sentinel({n for n, w in weights.items() if w != 0}, spec.hacking_threshold_se, spec.stop_on_hacking)

    def state() -> dict:  # the method's own state, saved with each checkpoint
        out = {"prompt_stats": stats.to_dict()} if stats is not None else {}
        return {**out, "sentinel": sentinel.to_dict()} if sentinel is not None else out

    ctx.metrics["processes"] = accelerator.num_processes
    eval_prompts = spec.eval_prompts or ctx.prompts[:4]
    eval_p, eval_seeds = eval_batch(eval_prompts, spec.eval_images_per_prompt)
    if base_eval is None and main:
        base_images = sampler.sample(eval_p, eval_seeds, base=True)
        total, components = score(ctx.reward, base_images, eval_p)
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
                save_checkpoint(out, step, models.denoiser, models.optimizer, ctx.metrics, base_eval, state(), root=ctx.checkpoint_dir)
            raise JobCancelled(f"cancelled at step {step}")
        rng = random.Random(spec.seed * 1_000_003 + step + 7_919 * accelerator.process_index)
        first_prompt = (step * accelerator.num_processes + accelerator.process_index) * spec.batch_size
        prompts = [ctx.prompts[(first_prompt + k) % len(ctx.prompts)] for k in range(spec.batch_size)]
        train_step(spec, sampler, models, ctx.reward, prompts, step, rng, accelerator, stats, weights, pairs, ctx.metrics)
        done = step + 1
        eta = (time.perf_counter() - t0) / (done - first) * (spec.steps - done)
        bar.set_postfix(reward=f"{ctx.metrics['reward'][-1]:.3f}", loss=f"{ctx.metrics['loss'][-1]:.3f}")
        if sentinel is not None and done % spec.eval_every == 0 and done < spec.steps and main:
            stopped = watch(sentinel, sampler, ctx, models, out, done, eval_p, eval_seeds)
            if stopped is not None and accelerator.num_processes > 1:  # the other processes would wait for it forever
                log.warning("step %d: %s; stop_on_hacking stops single-process jobs only: going on", done, stopped)
                stopped = None
            if stopped is not None:
                return finish(spec, ctx, sampler, models, out, eval_prompts, eval_p, eval_seeds, base_eval, sentinel, stopped)
        if done % spec.checkpoint_every == 0 and done < spec.steps and main:
            _guard(ctx)
            save_checkpoint(out, done, models.denoiser, models.optimizer, ctx.metrics, base_eval, state(), root=ctx.checkpoint_dir)
        if ctx.on_progress is not None and main:
            ctx.on_progress({"step": done, "total": spec.steps, "eta_s": round(eta, 1)})

    # ---- save (main process): LoRA in the diffusers format, metrics, samples, report
    accelerator.wait_for_everyone()
    if not main:
        return {"status": "succeeded", "metrics": ctx.metrics, "artifacts": [], "main_process": False}
    return finish(spec, ctx, sampler, models, out, eval_prompts, eval_p, eval_seeds, base_eval, sentinel)


def watch(sentinel: Sentinel, sampler, ctx: JobContext, models, out: Path, step: int, eval_p, eval_seeds) -> Optional[str]:
    """The sentinel's evaluation at `step`: every expert and the image statistics on the evaluation prompts,
    their drift from the base model; the LoRA of the best step so far is kept in `best/`. Returns why the
    job must stop (reward hacking, with `stop_on_hacking`), else None."""
    images = sampler.sample(eval_p, eval_seeds)
    total, components = score(ctx.reward, images, eval_p)
    record = sentinel.observe(step, total, components, images)
    ctx.metrics["sentinel"] = sentinel.to_dict()["history"]
    _guard(ctx)
    if sentinel.best_step == step:
        save_lora(models.denoiser, out / "best")
    return sentinel.should_stop(record)


def finish(spec: JobSpec, ctx: JobContext, sampler, models, out: Path, eval_prompts, eval_p, eval_seeds, base_eval: dict,
           sentinel: Optional[Sentinel], stopped: Optional[str] = None) -> dict:
    """Evaluate the tuned model on the base's seeds and write the artifacts. A job the sentinel stopped
    keeps the LoRA of its best step before the hacking (or none, if no step was better) and fails with
    the reason."""
    import shutil

    models.denoiser.eval()
    tuned_images = sampler.sample(eval_p, eval_seeds)
    tuned_eval = evaluate(ctx.reward, tuned_images, eval_p)
    _guard(ctx)
    save_images(tuned_images, out / "samples", "tuned")
    best = out / "best" / LORA_FILE
    kept_best = stopped is not None and best.is_file()
    if stopped is None:
        save_lora(models.denoiser, out)
    elif kept_best:
        shutil.copy(best, out / LORA_FILE)
    shutil.rmtree(out / "best", ignore_errors=True)
    base_images = load_samples(out, "base", spec.resolution)
    metrics = write_final(out, ctx.metrics, eval_prompts, base_eval, tuned_eval, base_images, tuned_images,
                          sentinel.to_dict() if sentinel is not None else None)
    result = {"status": "succeeded", "metrics": metrics, "artifacts": artifact_names(out), "main_process": True}
    if stopped is not None:
        kept = f"kept the LoRA of step {sentinel.best_step}" if kept_best else "kept no LoRA: no evaluated step was free of hacking"
        result.update(status="failed", error=f"stopped for reward hacking: {stopped}; {kept}")
    return result


def evaluate(reward: RewardFn, images: torch.Tensor, prompts: list[str]) -> dict[str, dict[str, float]]:
    """Every scorer's mean and standard error on the evaluation images, from one reward call."""
    return summarise(*score(reward, images, prompts))

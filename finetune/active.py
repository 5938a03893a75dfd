"""Active learning (the MLLM-feedback seed's stage 2): the model generates, the rewards simulate a user's
feedback, the most informative prompts are kept, the model is fine-tuned on them, and the loop repeats.

One job, `rounds` rounds, one LoRA carried through them. Each round r:
1. **draw** `round_prompts` prompts from the training pool (the job's prompts, or the prompter's for its
   topics, minus the held-out evaluation prompts: `prepare.training_and_held_out`), seeded by the round;
2. **generate** `n_images` candidates per prompt with the current LoRA (the deterministic chain, one seed
   per candidate);
3. **score** them with the job's rewards: the simulated feedback (the mixture, with the `vlm_judge` expert
   when the worker's config has it);
4. **select** the `select_prompts` most informative prompts: `spread` (the std of a prompt's candidates'
   totals: where the model is unsure, feedback tells it most) or `disagreement` (how much the experts
   disagree on the order of a prompt's candidates: the variance across experts of each candidate's
   in-group z-score, averaged over the candidates);
5. **fine-tune** `steps` optimiser steps of the `learner` method (GRPO, reward-weighted likelihood or
   ReFL: `step.train_step`, the same steps a plain job runs) on the selected prompts;
6. **evaluate** on the held-out prompts with the base model's seeds: every expert's mean and standard error.

Artifacts: `rounds/<r>/candidate-*.png` with `rounds/<r>/feedback.json` (every candidate's prompt, scores,
and whether its prompt was selected), `samples/base-*` and `samples/tuned-*`, the LoRA, `metrics.json`
(`rounds`: per round what was drawn, selected, the feedback, the training reward and the evaluation;
`eval.by_round`: each scorer's mean from the base model (round 0) through every round) and `report.png`
(reward by round for every expert, the training curve, base vs final images). A checkpoint is written at
the end of every round and every `checkpoint_every` steps within one, with the round's selection: a job
resumed by the reaper (or cancelled and run again by `t2i-reward finetune`) goes on from there without
generating that round's candidates again.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from t2i_reward.rewarders.advantages import group_advantages

from .artifacts import artifact_names, eval_batch, load_samples, number, save_checkpoint, save_images, summarise
from .context import JobCancelled, JobContext, score
from .context import guard as _guard
from .pipeline import save_lora
from .prepare import training_and_held_out
from .prompts import PromptMetadata, metadata_for
from .rewards import Reward
from .sampler import Sampler
from .spec import JobSpec
from .step import setup_training, train_step


def need_two_experts(experts: list[str]) -> None:
    """`disagreement` compares experts: ValueError with fewer than two."""
    if len(experts) < 2:
        raise ValueError(f"select 'disagreement' needs at least two experts in the rewards; this worker has {sorted(experts)}")


def informativeness(select: str, total: torch.Tensor, components: dict[str, torch.Tensor], k: int) -> list[float]:
    """Per prompt (its `k` candidates consecutive in `total` / `components`): how much feedback on it should
    teach the model. `spread`: the population std of the candidates' totals. `disagreement`: each expert's
    scores z-scored within the prompt's candidates (`t2i_reward.rewarders.advantages`), then per candidate the variance
    of those z-scores across experts (0 when every expert orders the candidates alike), averaged."""
    if select == "spread":  # over the candidates that got a total (NaN: fewer than two did)
        rows = total.detach().double().cpu().view(-1, k)
        return [float(r[~torch.isnan(r)].std(unbiased=False)) if int((~torch.isnan(r)).sum()) > 1 else math.nan for r in rows]
    need_two_experts(list(components))
    z = group_advantages(total, components, [i // k for i in range(len(total))])
    per_candidate = torch.stack([z[n] for n in components]).double().var(dim=0, unbiased=False)
    return per_candidate.view(-1, k).mean(dim=1).tolist()


def run_active_learning(spec: JobSpec, ctx: JobContext) -> dict:
    """Run (or resume) an active-learning job; returns the job's result like `run_job`. Raises JobCancelled."""
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- accelerator and models, as a training job's, resumed (at the round, and the step within it, of the
    # last checkpoint) if there is one
    state, start, base_eval, extra = setup_training(spec, ctx)
    models, sampler = state.models, state.sampler
    if state.accelerator.num_processes > 1:  # rounds select on the whole round's feedback: one process decides
        raise ValueError("active_learning runs in one process; start it without accelerate launch / torchrun")
    pool, held_out = training_and_held_out(ctx.prompts, spec.eval_prompts)
    eval_p, eval_seeds = eval_batch(held_out, spec.eval_images_per_prompt)

    # ---- where the rounds start, and the base model's evaluation (round 0) unless resumed
    first_round, in_round = int(extra.get("round", 0)), extra.get("in_round")
    metrics = ctx.metrics
    metrics.setdefault("rounds", [])
    metrics["processes"] = 1
    chunk = max(spec.n_images, spec.batch_size * (spec.group_size if spec.is_policy_gradient else 1))  # images per chain
    if base_eval is None:
        base_images, total, components = sample_and_score(sampler, ctx.reward, eval_p, eval_seeds, chunk, base=True, metadata=ctx.metadata)
        base_eval = summarise(total, components)
        _guard(ctx)
        save_images(base_images, out / "samples", "base")
    if spec.select == "disagreement":  # before any round's work: the experts are known now
        need_two_experts([n for n in base_eval if n != "total"])

    def checkpoint_state(r: int, current: dict | None) -> dict:  # saved with each checkpoint: finished rounds, the round under way
        return {"round": r, **({"in_round": current} if current else {}),
                **({"prompt_stats": state.stats.to_dict()} if state.stats is not None else {})}

    # ---- rounds
    total_steps, t0, eval_images = spec.total_steps, time.perf_counter(), None
    for r in range(first_round, spec.rounds):
        _guard(ctx)
        if in_round is not None:  # resumed inside this round: its candidates were generated, scored and kept
            current, in_round = in_round, None
        else:
            # why disjoint from the steps' seeds: seed * 1_000_003 + step, and step < MAX_STEPS < 104_729
            rng = random.Random(spec.seed * 1_000_003 + 104_729 * (r + 1))
            drawn = rng.sample(pool, min(spec.round_prompts, len(pool)))
            candidates = [p for p in drawn for _ in range(spec.n_images)]
            seeds = [rng.randrange(2**31) for _ in candidates]
            models.denoiser.eval()
            # whole prompts per chain: at most a training step's images, or one prompt's K
            images, total, components = sample_and_score(sampler, ctx.reward, candidates, seeds, chunk // spec.n_images * spec.n_images,
                                                          metadata=ctx.metadata)
            info = informativeness(spec.select, total, components, spec.n_images)
            order = sorted(range(len(drawn)), key=lambda i: -info[i] if math.isfinite(info[i]) else math.inf)  # NaN: least informative
            chosen = order[: spec.select_prompts]
            _guard(ctx)
            write_feedback(out / "rounds" / f"{r + 1:02d}", r + 1, spec, drawn, info, set(chosen), images, total, components, out)
            current = {"drawn": drawn, "informativeness": info, "selected": [drawn[i] for i in chosen],  # most informative first
                       "feedback": summarise(total, components)}
        selected = current["selected"]

        for j in range(max(0, start - r * spec.steps), spec.steps):
            step = r * spec.steps + j
            _guard(ctx)
            if ctx.should_stop is not None and ctx.should_stop():
                save_checkpoint(out, step, models.denoiser, models.optimizer, metrics, base_eval, checkpoint_state(r, current), root=ctx.checkpoint_dir)
                raise JobCancelled(f"cancelled in round {r + 1}, at step {step}")
            batch = [selected[(j * spec.batch_size + k) % len(selected)] for k in range(spec.batch_size)]
            train_step(state, batch, step, random.Random(spec.seed * 1_000_003 + step))
            done = step + 1
            if done % spec.checkpoint_every == 0 and j + 1 < spec.steps:  # a resume point inside a long round
                _guard(ctx)
                save_checkpoint(out, done, models.denoiser, models.optimizer, metrics, base_eval, checkpoint_state(r, current), root=ctx.checkpoint_dir)
            if ctx.on_progress is not None:
                eta = (time.perf_counter() - t0) / (done - start) * (total_steps - done)
                ctx.on_progress({"step": done, "total": total_steps, "eta_s": round(eta, 1), "round": r + 1})

        models.denoiser.eval()
        eval_images, total, components = sample_and_score(sampler, ctx.reward, eval_p, eval_seeds, chunk, metadata=ctx.metadata)
        round_rewards = metrics["reward"][r * spec.steps:(r + 1) * spec.steps]
        metrics["rounds"].append({"round": r + 1, **current, "train_reward": sum(round_rewards) / max(1, len(round_rewards)),
                                  "eval": summarise(total, components)})
        _guard(ctx)
        save_checkpoint(out, (r + 1) * spec.steps, models.denoiser, models.optimizer, metrics, base_eval, checkpoint_state(r + 1, None), root=ctx.checkpoint_dir)

    # ---- save: the LoRA, the final evaluation images, metrics and report
    models.denoiser.eval()
    if eval_images is None:  # resumed after the last round: the same seeds give the same images
        eval_images = sample_and_score(sampler, None, eval_p, eval_seeds, chunk)[0]
    _guard(ctx)
    save_lora(models.denoiser, out)
    save_images(eval_images, out / "samples", "tuned")
    by_round = {name: [base_eval[name]["mean"]] + [rd["eval"][name]["mean"] for rd in metrics["rounds"]] for name in base_eval}
    final = {**metrics, "eval": {"prompts": held_out, "base": base_eval, "tuned": metrics["rounds"][-1]["eval"], "by_round": by_round}}
    (out / "metrics.json").write_text(json.dumps(final, indent=2))
    from .report import write_rounds_report

    write_rounds_report(out / "report.png", final, load_samples(out, "base", spec.resolution), eval_images.float().cpu())
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"status": "succeeded", "metrics": final, "artifacts": artifact_names(out), "main_process": True,
            "progress": {"step": total_steps, "total": total_steps, "eta_s": 0, "round": spec.rounds}}


def sample_and_score(sampler: Sampler, reward: Optional[Reward], prompts: list[str], seeds: list[int], chunk: int, base: bool = False,
                     metadata: Optional[PromptMetadata] = None):
    """(images on the CPU, total, {expert: scores}) of `prompts`, `chunk` images per chain and reward call:
    a round's round_prompts x n_images (up to 4096) candidates never go through at once; each image scored
    with its prompt's `metadata`. `reward` None: the images only."""
    images, totals, parts = [], [], []
    for i in range(0, len(prompts), chunk):
        batch = sampler.sample(prompts[i:i + chunk], seeds[i:i + chunk], base=base)
        images.append(batch.cpu())
        if reward is not None:
            total, components = score(reward, batch, prompts[i:i + chunk], metadata_for(metadata, prompts[i:i + chunk]))
            totals.append(total)
            parts.append(components)
    if reward is None:
        return torch.cat(images), None, None
    return torch.cat(images), torch.cat(totals), {n: torch.cat([c[n] for c in parts]) for n in parts[0]}


def write_feedback(folder: Path, round_no: int, spec: JobSpec, drawn: list[str], info: list[float], chosen: set[int],
                   images: torch.Tensor, total: torch.Tensor, components: dict[str, torch.Tensor], out: Path) -> None:
    """The round's candidates (`candidate-<n>.png`, prompt by prompt) and `feedback.json`: each prompt's
    informativeness and whether it was selected, each candidate's file, total and expert scores."""
    save_images(images, folder, "candidate")
    k = spec.n_images
    prompts = [{"prompt": p, "informativeness": info[i], "selected": i in chosen,
                "images": [{"file": str((folder / f"candidate-{i * k + c:03d}.png").relative_to(out)), "total": number(total[i * k + c]),
                            "components": {n: number(v[i * k + c]) for n, v in components.items()}} for c in range(k)]}
               for i, p in enumerate(drawn)]
    (folder / "feedback.json").write_text(json.dumps({"round": round_no, "select": spec.select, "prompts": prompts}, indent=2))

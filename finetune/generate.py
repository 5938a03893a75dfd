"""Best-of-n generation (the seed's stage 1), a job without training: for each prompt, optionally rewrite it
with the MLLM peer, generate `n_images` with the base pipeline (plus the LoRA of an earlier job), score them
with the rewards, and keep them ranked.

Artifacts: `ranked/<prompt>-<rank>.png` (rank 0 is the best), and `results.json`: per prompt, the prompt
as given and as used, and each image's file, rank, total and expert scores (and, with an MLLM peer, the
judge's one-line reason). Images come from the pipeline's own sampler, seeded with `seed + prompt index`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from t2i_reward.rewarders.mllm import MATCH_QUESTION, question_for

from .artifacts import artifact_names, number, save_images
from .context import JobCancelled, score
from .context import guard as _guard
from .spec import JobSpec


def run_generate(spec: JobSpec, ctx) -> dict:
    """Run a generate job (`ctx` is the trainer's `JobContext`); returns the job's result like `run_job`."""
    from .pipeline import LORA_FILE, load_pipeline

    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = ctx.device != "cpu" and torch.cuda.is_available()  # as run_job: "auto" takes the GPU, a named device is used as named
    device = torch.device(ctx.device if on_gpu and ctx.device != "auto" else "cuda" if on_gpu else "cpu")
    pipe = load_pipeline(ctx.base_model, ctx.cache_dir)
    if ctx.lora_path is not None:
        pipe.load_lora_weights(Path(ctx.lora_path).parent, weight_name=LORA_FILE)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    results, best = [], []
    for i, prompt in enumerate(ctx.prompts):
        _guard(ctx)
        if ctx.should_stop is not None and ctx.should_stop():
            raise JobCancelled(f"cancelled at prompt {i}")
        used = prompt
        if spec.enhance:
            from t2i_reward.prompter.enhance import enhance_prompt

            used = enhance_prompt(ctx.peer, prompt, 1, seed=spec.seed + i)[0]
        with torch.no_grad():
            images = pipe(used, num_images_per_prompt=spec.n_images, height=spec.resolution, width=spec.resolution,
                          num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                          generator=torch.Generator().manual_seed(spec.seed + i), output_type="pt").images
        # the metadata of the prompt as given (an enhanced rewrite asks for the same objects and text)
        meta = ctx.metadata_for([prompt])
        total, components = score(ctx.reward, images.float().clamp(0, 1), [used] * len(images), meta * len(images) if meta else None)
        order = torch.argsort(torch.nan_to_num(total, nan=-math.inf), descending=True, stable=True).tolist()  # no reward: last
        _guard(ctx)
        save_images(images[order], out / "ranked", f"{i:03d}")
        ranked = []
        for rank, k in enumerate(order):
            entry = {"file": f"ranked/{i:03d}-{rank:03d}.png", "rank": rank, "total": number(total[k]),
                     "components": {n: number(c[k]) for n, c in components.items()}}
            if ctx.peer is not None:
                from torchvision.transforms.functional import to_pil_image

                entry["reason"] = ctx.peer.reason(to_pil_image(images[k].float().clamp(0, 1).cpu()),
                                                  question_for(MATCH_QUESTION, used))
            ranked.append(entry)
        results.append({"prompt": prompt, "used": used, "images": ranked})
        best.append(ranked[0]["total"])
        if ctx.on_progress is not None:
            ctx.on_progress({"step": i + 1, "total": len(ctx.prompts), "eta_s": None})
    _guard(ctx)
    (out / "results.json").write_text(json.dumps({"prompts": results}, indent=2))
    metrics = {"best": best, "processes": 1, "eval": {"prompts": [r["used"] for r in results], "best": best}}
    return {"status": "succeeded", "metrics": metrics, "artifacts": artifact_names(out), "main_process": True,
            "progress": {"step": len(ctx.prompts), "total": len(ctx.prompts), "eta_s": 0}}

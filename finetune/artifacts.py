"""What a job leaves behind: resumable checkpoints, the evaluation of the base and fine-tuned models on
the same seeds, and the artifacts (LoRA, metrics.json, samples/, report.png)."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Optional

import torch

from .sentinel import mean_se

log = logging.getLogger(__name__)


def artifact_names(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts)


def save_checkpoint(out: Path, step: int, denoiser, optimizer, metrics: dict, base_eval: dict, extra: Optional[dict] = None,
                    root: Optional[Path] = None) -> None:
    """LoRA + optimiser + metrics (+ `extra`: the method's own state, e.g. GRPO's per-prompt statistics) at
    `step`, written whole or not at all into `root` (default `out/checkpoints`; a worker's attempt writes into
    its own, see `adopt_checkpoints`); older checkpoints removed. Each file is serialised in memory first, so
    a full disk is a plain OSError (ENOSPC), and a failed write leaves no temporary files behind."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    from .faults import hook

    hook(f"checkpoint-{step}")
    root = root if root is not None else out / "checkpoints"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "lora.safetensors").write_bytes(save({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}))
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        (tmp / "optimizer.pt").write_bytes(buffer.getbuffer())
        (tmp / "state.json").write_text(json.dumps({"step": step, "metrics": metrics, "base_eval": base_eval, "extra": extra or {}}))
        final = root / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def adopt_checkpoints(out: Path, attempt: int) -> Path:
    """The checkpoint folder of `attempt` of a worker's job, `out/checkpoints/attempt-<attempt>`, holding the
    newest checkpoint of the job so far.

    Why (fencing): a runner that lost its job can still be frozen between its last ownership check and a
    checkpoint write. Each attempt therefore writes only into its own folder, and a new attempt takes over
    the folder of the newest earlier attempt by renaming it (atomic). A late write of a superseded runner
    goes by path into its own folder name, which no longer exists (it is made anew, holding only that write),
    and no later attempt reads it: an attempt adopts the highest-numbered folder below its own, and every
    attempt that got this far has made its own. Checkpoints directly under `checkpoints/` (an older release,
    or `t2i-reward finetune`) are adopted as attempt 0."""
    root = out / "checkpoints"
    own = root / f"attempt-{attempt}"
    if own.is_dir():
        return own
    earlier = sorted((int(p.name.split("-")[1]), p) for p in root.glob("attempt-*") if p.name.split("-")[1].isdigit())
    earlier = [(n, p) for n, p in earlier if n < attempt]
    root.mkdir(parents=True, exist_ok=True)
    if earlier:
        try:
            earlier[-1][1].rename(own)
        except FileNotFoundError:  # a newer attempt took it meanwhile: this one is stale, its guard stops it
            own.mkdir(exist_ok=True)
    else:
        own.mkdir()
        for flat in root.glob("step-*"):  # attempt 0: the flat layout
            flat.rename(own / flat.name)
    for _, stale in earlier[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
    for tmp in own.glob(".step-*.tmp"):  # a write that never finished
        shutil.rmtree(tmp, ignore_errors=True)
    return own


def resume(out: Path, denoiser, optimizer, metrics: dict, root: Optional[Path] = None) -> tuple[int, Optional[dict], dict]:
    """Load the last checkpoint in `root` (default `out/checkpoints`), if any: (the step to start at, the base
    model's evaluation, the extra state)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    root = root if root is not None else out / "checkpoints"
    ckpts = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        return 0, None, {}
    last = ckpts[-1]
    set_peft_model_state_dict(denoiser, load_file(last / "lora.safetensors"))
    optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
    state = json.loads((last / "state.json").read_text())
    metrics.clear()
    metrics.update(state["metrics"])
    metrics.setdefault("resumed_at", []).append(int(state["step"]))  # shows the job did not restart from zero
    log.warning("resuming from %s", last)
    return int(state["step"]), state["base_eval"], state.get("extra") or {}


def summarise(total: torch.Tensor, components: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per scorer (the total and each expert): mean and standard error over the evaluation images that it
    scored (NaN: no score), with `unscored` the count of the others when there are any."""
    out = {}
    for name, values in {"total": total, **components}.items():
        mean, se = mean_se(values)
        out[name] = {"mean": number(mean), "se": number(se)}  # None: no image was scored
        missing = int(torch.isnan(values.detach().float()).sum())
        if missing:
            out[name]["unscored"] = missing
    return out


def number(x) -> float | None:
    """A score for a JSON file: a float, or None for NaN (a pair without a score)."""
    x = float(x)
    return None if math.isnan(x) else x


def eval_batch(prompts: list[str], per_prompt: int) -> tuple[list[str], list[int]]:
    """The evaluation's prompts (each `per_prompt` times) and seeds: the same seeds for the base model, every
    later evaluation and the fine-tuned model, so their images differ only by the LoRA."""
    eval_p = [p for p in prompts for _ in range(per_prompt)]
    return eval_p, [10_000 + k for k in range(len(eval_p))]


def load_samples(out: Path, prefix: str, resolution: int) -> torch.Tensor:
    """The images `save_images` wrote under `out/samples` with `prefix` (the base model's, read back after a
    resume), as (N, 3, resolution, resolution) in [0, 1]."""
    from .losses import image_tensor

    return torch.stack([image_tensor(p, resolution) for p in sorted((out / "samples").glob(f"{prefix}-*.png"))])


def save_images(images: torch.Tensor, folder: Path, prefix: str) -> None:
    from torchvision.transforms.functional import to_pil_image

    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images.detach().float().cpu()):
        to_pil_image(img).save(folder / f"{prefix}-{k:03d}.png")


def write_final(out: Path, metrics: dict, eval_prompts: list[str], base_eval: dict, tuned_eval: dict,
                base_images: torch.Tensor, tuned_images: torch.Tensor, sentinel: Optional[dict] = None) -> dict:
    """metrics.json and report.png; the checkpoints go (the LoRA is saved). Returns the final metrics."""
    from .report import write_report

    final = {**metrics, "eval": {"prompts": eval_prompts, "base": base_eval, "tuned": tuned_eval}}
    (out / "metrics.json").write_text(json.dumps(final, indent=2))
    write_report(out / "report.png", metrics, base_images, tuned_images.cpu(), base_eval, tuned_eval, sentinel=sentinel)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return final

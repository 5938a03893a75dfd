"""report.png: the reward curve, a before/after grid on the evaluation prompts, and each scorer's mean
(± standard error) for the base and the fine-tuned model (the optimised reward and the experts it did
not optimise side by side, so reward hacking shows), and, given the sentinel's state, each scorer's and
image statistic's drift from the base model per evaluation (`t2i_reward.finetune.sentinel`)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_report(path: Path, metrics: dict, base_images: torch.Tensor, tuned_images: torch.Tensor,
                 base_eval: dict, tuned_eval: dict, max_images: int = 4, sentinel: dict | None = None) -> None:
    """`sentinel`: `Sentinel.to_dict()`; when it holds evaluations, a last row shows their drift curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_images, len(base_images), len(tuned_images))
    drift = bool(sentinel and sentinel.get("history"))
    fig = plt.figure(figsize=(max(10, 2.2 * n + 4), 12.5 if drift else 9))
    grid = fig.add_gridspec(4 if drift else 3, max(n, 2), height_ratios=[1.2, 1, 1, 1.3] if drift else [1.2, 1, 1])
    ax = fig.add_subplot(grid[0, : max(n, 2) // 2])
    ax.plot(range(1, len(metrics["reward"]) + 1), metrics["reward"], label="reward")
    ax.set_xlabel("step")
    ax.set_ylabel("reward (batch mean)")
    ax.set_title("reward during training")
    table_ax = fig.add_subplot(grid[0, max(n, 2) // 2 :])
    table_ax.axis("off")
    def cell(e: dict) -> str:  # mean None: no evaluation image got this score
        return "-" if e.get("mean") is None else f"{e['mean']:.4f} ± {e['se']:.4f}"

    rows = [[name, cell(base_eval[name]), cell(tuned_eval.get(name, {}))] for name in base_eval]
    table = table_ax.table(cellText=rows, colLabels=["scorer", "base", "fine-tuned"], loc="center")
    table.scale(1, 1.4)
    table_ax.set_title("evaluation prompts: mean ± standard error")
    image_rows(fig, grid, 1, n, (base_images, "base"), (tuned_images, "fine-tuned"))
    if drift:
        from .sentinel import draw_sentinel

        half = max(n, 2) // 2
        draw_sentinel([fig.add_subplot(grid[3, :half]), fig.add_subplot(grid[3, half:])], sentinel["history"],
                      sentinel.get("optimised", ()), sentinel.get("threshold_se", 3.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def image_rows(fig, grid, first_row: int, n: int, *rows: tuple[torch.Tensor, str]) -> None:
    """The first `n` images of each (images, label) pair, one row each from grid row `first_row`."""
    for row, (images, label) in enumerate(rows, start=first_row):
        for k in range(n):
            a = fig.add_subplot(grid[row, k])
            a.imshow(images[k].permute(1, 2, 0).clamp(0, 1).numpy())
            a.set_xticks([])
            a.set_yticks([])
            if k == 0:
                a.set_ylabel(label)


def write_rounds_report(path: Path, metrics: dict, base_images: torch.Tensor, tuned_images: torch.Tensor, max_images: int = 4) -> None:
    """An active-learning job's report (`t2i_reward.finetune.active`): on the held-out prompts, every scorer's mean
    (± standard error) by round, round 0 being the base model, one panel per scorer (their scales differ);
    the training reward by step with the rounds' boundaries; the base model's and the final model's images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev, rounds = metrics["eval"], metrics["rounds"]
    scorers = list(ev["base"])
    n = min(max_images, len(base_images), len(tuned_images))
    cols = max(len(scorers), n, 2)
    fig = plt.figure(figsize=(max(10, 2.6 * cols), 11))
    grid = fig.add_gridspec(4, cols, height_ratios=[1.2, 1.1, 1, 1])
    x = list(range(len(rounds) + 1))
    for c, name in enumerate(scorers):
        ax = fig.add_subplot(grid[1, c])
        points = [ev["base"][name]] + [rd["eval"][name] for rd in rounds]
        nan = float("nan")  # a mean of None: no held-out image got this score that round
        ax.errorbar(x, [nan if p["mean"] is None else p["mean"] for p in points], yerr=[p["se"] or 0.0 for p in points], marker="o", capsize=3)
        if ev["base"][name]["mean"] is not None:
            ax.axhline(ev["base"][name]["mean"], color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, ["base"] + [str(i) for i in x[1:]])
        ax.set_xlabel("round")
        ax.set_title(name)
    ax = fig.add_subplot(grid[0, :])
    ax.plot(range(1, len(metrics["reward"]) + 1), metrics["reward"], label="training reward (batch mean)")
    per_round = len(metrics["reward"]) // max(1, len(rounds))
    for i in range(1, len(rounds)):
        ax.axvline(i * per_round + 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("step (dotted: a new round)")
    ax.set_ylabel("reward")
    ax.set_title("active learning: training reward; below, held-out reward by round (mean ± se) for every scorer")
    image_rows(fig, grid, 2, n, (base_images, "base"), (tuned_images, f"round {len(rounds)}"))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

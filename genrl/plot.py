"""Learning curves from ``progress.csv`` files."""

from __future__ import annotations

import math
from pathlib import Path

from genrl.errors import GenrlError
from genrl.logger import read_csv


def plot_runs(run_dirs: list[str | Path], out: str | Path, *, labels: list[str] | None = None) -> Path:
    """Plot training return (and evaluation return where logged) against env steps.

    Several runs go on the same axes; returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, run in enumerate(run_dirs):
        csv_path = Path(run) / "progress.csv"
        if not csv_path.is_file():
            raise GenrlError(f"no progress.csv in {run}")
        cols = read_csv(csv_path)
        label = labels[i] if labels else Path(run).name
        steps = cols.get("step", [])
        image_run = "rollout/ep_return" not in cols and "reward/total" in cols
        train = cols.get("reward/total" if image_run else "rollout/ep_return")
        line = None
        if train:
            pts = [(s, r) for s, r in zip(steps, train) if not math.isnan(r)]
            if pts:
                (line,) = ax.plot(*zip(*pts), label=f"{label} (train)", lw=1.4)
        ev = cols.get("eval/reward_total" if image_run else "eval/return_mean")
        if ev:
            pts = [(s, r) for s, r in zip(steps, ev) if not math.isnan(r)]
            if pts:
                kw = {"color": line.get_color()} if line is not None else {}
                ax.plot(*zip(*pts), "o--", ms=4, label=f"{label} (eval)", **kw)
    images = all("rollout/ep_return" not in read_csv(Path(r) / "progress.csv") for r in run_dirs)
    ax.set_xlabel("images sampled" if images else "environment steps")
    ax.set_ylabel("reward" if images else "episode return")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

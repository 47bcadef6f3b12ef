"""Learning curves from ``progress.csv`` files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from genrl.errors import GenrlError
from genrl.logger import read_csv


def plot_runs(run_dirs: list[str | Path], out: str | Path, *, labels: list[str] | None = None) -> Path:
    """Plot training return (and evaluation return where logged) against env steps.

    Several runs go on the same axes; returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [_read_log(run) for run in run_dirs]
    _read_logs_kind(run_dirs)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, run in enumerate(run_dirs):
        cols = logs[i]
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
    images = all("rollout/ep_return" not in c for c in logs)
    return _finish(fig, ax, out, images, "reward" if images else "episode return")


def group_name(run: str | Path) -> str:
    """A run's name without its seed and time: ``Hopper-v5__gaussian__3__20261201-101500`` ->
    ``Hopper-v5__gaussian``; ``hopper-s2`` / ``hopper_seed2`` -> ``hopper``."""
    import re

    name = Path(run).name
    parts = name.split("__")
    if len(parts) >= 4 and parts[-2].isdigit():
        return "__".join(parts[:-2])
    return re.sub(r"[-_]?(s|seed)\d+$", "", name) or name


def plot_groups(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One curve per group of runs (``group_name``): the mean training return over the group's
    runs at each logged step and a 95% band (mean +- 1.96 standard errors; the runs' own steps
    must match, as they do for one config over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[str, list[Path]] = {}
    for run in run_dirs:
        _read_log(run)
        groups.setdefault(group_name(run), []).append(Path(run))
    _read_logs_kind(run_dirs)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    image = False
    for name, runs in groups.items():
        cols = [read_csv(r / "progress.csv") for r in runs]
        image = "rollout/ep_return" not in cols[0] and "reward/total" in cols[0]
        key = "reward/total" if image else "rollout/ep_return"
        n = min(len(c["step"]) for c in cols)
        x = np.array(cols[0]["step"][:n])
        y = np.array([c.get(key, [math.nan] * n)[:n] for c in cols], dtype=float)
        mean = np.nanmean(y, 0)
        half = 1.96 * np.nanstd(y, 0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
        (line,) = ax.plot(x, mean, label=f"{name} (n={len(runs)})", lw=1.4)
        ax.fill_between(x, mean - half, mean + half, alpha=0.2, color=line.get_color())
    return _finish(fig, ax, out, image, "reward" if image else "training episode return")


def _read_log(run: str | Path) -> dict[str, list[float]]:
    csv_path = Path(run) / "progress.csv"
    if not csv_path.is_file():
        raise GenrlError(f"no progress.csv in {run}")
    cols = read_csv(csv_path)
    if not cols.get("step"):
        raise GenrlError(f"{csv_path} has no logged rows yet")
    return cols


def _read_logs_kind(run_dirs: list[str | Path]) -> None:
    kinds = {"reward/total" in _read_log(r) for r in run_dirs}  # text-to-image logs have reward/total
    if len(kinds) > 1:
        raise GenrlError("cannot plot control runs (episode return vs env steps) and text-to-image runs (reward vs images) on one axes")


def _png(out: str | Path) -> Path:
    """matplotlib adds .png to a name without a suffix: say the name it writes."""
    out = Path(out)
    return out if out.suffix else out.with_suffix(".png")


def _finish(fig: Any, ax: Any, out: str | Path, images: bool, ylabel: str) -> Path:
    """Label, lay out and write the figure; returns the PNG path written."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("images sampled" if images else "environment steps")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _png(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

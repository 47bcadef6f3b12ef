"""Run logging: CSV (``progress.csv``), TensorBoard (``tb/``) and a progress bar.

Metric keys are fixed across algorithms so that plots compare: ``rollout/ep_return``,
``train/approx_kl``, ``time/sps``, ``eval/return_mean`` ...
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm


class Logger:
    """Writes one CSV row and one TensorBoard point per ``log`` call.

    On resume pass ``resume_step``: CSV rows and TensorBoard events after it are dropped, so
    the resumed run's logs read as one uninterrupted run.
    """

    def __init__(
        self, run_dir: str | Path, total_steps: int, *, resume_step: int | None = None, progress: bool = True,
        wandb: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """``progress``: a tqdm bar when stderr is a terminal, else (or when False) one text line
        per ``log``; ``wandb``: {"project", "config"} to also log to Weights & Biases."""
        import sys

        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "progress.csv"
        self.rows: list[dict[str, Any]] = []
        self.keys: list[str] = ["step"]
        if resume_step is not None and self.csv_path.is_file():
            try:
                with self.csv_path.open() as f:
                    for row in csv.DictReader(f):
                        if int(float(row["step"])) <= resume_step:
                            self.rows.append(row)
                            self.keys += [k for k in row if k not in self.keys]
            except (UnicodeDecodeError, csv.Error, KeyError, ValueError, TypeError):
                from genrl.errors import CheckpointError

                raise CheckpointError(f"corrupt {self.csv_path}: move it away to resume without the earlier log rows") from None
            self._rewrite()
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        start = resume_step or 0
        self.total = total_steps
        self.lines = not (progress and sys.stderr.isatty())  # batch jobs: text lines, not a redrawn bar
        self.bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True, disable=self.lines, leave=True)
        self.wandb = _wandb_run(self.run_dir, wandb) if wandb is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value
            if math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        new = [k for k in row if k not in self.keys]
        self.rows.append(row)
        if new:
            self.keys += new
            self._rewrite()
        else:
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, self.keys).writerow(row)
        self.bar.update(step - self.bar.n)
        post = {}
        if "rollout/ep_return" in row:
            post["return"] = f"{row['rollout/ep_return']:.1f}"
        if "eval/return_mean" in row:
            post["eval"] = f"{row['eval/return_mean']:.1f}"
        if "reward/total" in row:
            post["reward"] = f"{row['reward/total']:.3f}"
        if "time/sps" in row:
            post["sps"] = f"{row['time/sps']:.0f}"
        if post:
            self.bar.set_postfix(post, refresh=False)
        if self.lines:
            print(f"step {step}/{self.total}" + "".join(f" | {k} {v}" for k, v in post.items()), flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def hparams(self, config: dict[str, Any]) -> None:
        """A markdown table of the resolved config in TensorBoard's text tab (CleanRL's habit)."""
        lines = ["|key|value|", "|-|-|"] + [f"|{k}|{v}|" for k, v in _flatten(config).items()]
        self.tb.add_text("config", "\n".join(lines), 0)

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.keys)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_csv(path: str | Path) -> dict[str, list[float]]:
    """Columns of a ``progress.csv`` as float lists (missing cells are NaN); GenrlError if it is
    not a progress log."""
    from genrl.errors import GenrlError

    cols: dict[str, list[float]] = {}
    try:
        with Path(path).open() as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError):
        raise GenrlError(f"corrupt {path}: not a genrl progress log") from None
    return cols


def _wandb_run(run_dir: Path, opts: dict[str, Any]) -> Any:
    """A W&B run for this folder; its id is kept in ``wandb_id`` so a resumed run continues it."""
    try:
        import wandb
    except ImportError:
        from genrl.errors import ConfigError

        raise ConfigError("run.wandb needs Weights & Biases: pip install 'genrl[wandb]' (or wandb)") from None
    id_file = run_dir / "wandb_id"
    import secrets

    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=opts.get("project", "genrl"), name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                      config=opts.get("config"))  # fmt: skip

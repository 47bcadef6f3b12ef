"""Run folders that cannot be lost or clobbered, shared by every training loop.

* ``open_run``: a fresh run gets a unique default name (``runs/<env>__<policy|algo>__<seed>__<time>``,
  as CleanRL names its runs) and may only go into a folder that is absent, empty, or a genrl run
  that has not started; anything else (a user's own files, a file, an unwritable place) is refused
  with one line. A resumed run takes the newest *readable* checkpoint (``resume_candidates``).
* ``CheckpointSchedule``: checkpoints every ``run.save_every`` env steps (default: a tenth of the
  run) and every ``run.save_minutes`` of wall-clock time, the newest ``run.keep_checkpoints`` kept.
* ``StopSignals``: SIGINT / SIGTERM finish the current iteration, write a checkpoint and stop
  (a second signal stops at once); preemption loses at most one iteration.
* ``write_meta``: ``meta.json`` records genrl's version, the git commit, the library versions and
  every command line that ran in the folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrl.checkpoint import checkpoint_steps
from genrl.errors import CheckpointError, ConfigError, NonFiniteLossError

RUN_FILES = ("config.json", "progress.csv", "meta.json", "checkpoints", "tb", "curves.png", "final", "images", "videos", "prompts.json", "wandb", "wandb_id")


RESUME_RUN_FIELDS = ("save_every", "save_minutes", "keep_checkpoints", "eval_every", "eval_episodes", "progress", "wandb")
"""``run`` fields a resumed run may change (they do not change its trajectory)."""


class Interrupted(Exception):
    """A run stopped by SIGINT / SIGTERM after writing a checkpoint."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_out(cfg: Any) -> str:
    """``runs/<env>__<policy or algo>__<seed>__<YYYYmmdd-HHMMSS>`` (unique per second)."""
    env = getattr(cfg.env, "env_id", None) or str(cfg.env)
    what = getattr(cfg, "policy", None) or cfg.algo
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{env.replace('/', '-')}__{what}__{cfg.run.seed}__{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return str(out)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a genrl run (a config.json genrl wrote)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "run" in data and "env" in data


def check_fresh_out(run_dir: Path) -> None:
    """Refuse (one line) a ``--out`` that training must not write into."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder")
    for parent in run_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {run_dir}: {parent} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {run_dir}: no permission to write in {parent}")
            break
    if not run_dir.is_dir():
        return
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {run_dir}: no permission to write there")
    if checkpoint_steps(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    if is_run_dir(run_dir):  # a genrl run that stopped before its first checkpoint: nothing to keep
        for name in RUN_FILES:
            if name != "meta.json":
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        print(f"{run_dir} held a run that stopped before its first checkpoint: starting it again")
        return
    entries = [p.name for p in run_dir.iterdir()]
    if entries and not is_run_dir(run_dir):
        shown = ", ".join(sorted(entries)[:3]) + (" ..." if len(entries) > 3 else "")
        raise ConfigError(f"--out {run_dir} is not empty and not a genrl run ({shown}); pick a new or empty folder")


def load_run_config(run_dir: str | Path) -> Any:
    from genrl.config import config_from_dict, upgrade_config

    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir} is not a genrl run (the folder does not exist)")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a genrl run (no config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt {path}: {exc}") from None
    return config_from_dict(upgrade_config(data))


def open_run(cfg: Any, resume: str | Path | None) -> tuple[Any, Path, list[Path]]:
    """``(config, run folder, checkpoints to try newest first)``: a resumed run's own config and
    its checkpoints, or a fresh run (empty list) whose folder passed ``check_fresh_out``."""
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_run_config(run_dir)
        steps = checkpoint_steps(run_dir)
        if not steps:
            raise CheckpointError(
                f"no checkpoint in {run_dir / 'checkpoints'}: the run stopped before its first checkpoint; start it again with --out {run_dir} (it holds no progress)"
            )
        return cfg, run_dir, [run_dir / "checkpoints" / str(s) for s in reversed(steps)]
    if cfg is None:
        raise ConfigError("train() needs a config or resume=")
    if cfg.run.out is None:
        cfg = replace(cfg, run=replace(cfg.run, out=default_out(cfg)))
    run_dir = Path(cfg.run.out)
    check_fresh_out(run_dir)
    return cfg, run_dir, []


def restore_first_readable(candidates: list[Path], restore: Callable[[Path], Any], message: Callable[[str], None]) -> Any:
    """``restore(c)`` for the newest candidate that reads; says which were skipped and why, and
    passes on a note ``restore`` returns (text: what the resume could not restore)."""
    errors = []
    for ckpt in candidates:
        try:
            out = restore(ckpt)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        for err in errors:
            message(f"skipped an unreadable checkpoint: {err}")
        if errors:
            message(f"resuming from the newest good checkpoint, step {ckpt.name}")
        if isinstance(out, str):
            message(out)
        return out
    raise CheckpointError(f"no readable checkpoint; newest error: {errors[0]}")


def guarded_iterate(algo: Any, run_dir: Path) -> dict[str, float]:
    """``algo.iterate()``; a non-finite loss stops the run naming the last good checkpoint."""
    try:
        return algo.iterate()
    except NonFiniteLossError as exc:
        last = checkpoint_steps(run_dir)
        kept = f"; last good checkpoint: step {last[-1]} (resume with --resume {run_dir})" if last else "; no checkpoint was written yet"
        raise NonFiniteLossError(f"{exc}{kept}") from None


def crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and now // every > prev // every


class CheckpointSchedule:
    """When to write a checkpoint, and pruning to the newest ``keep``."""

    def __init__(self, run_cfg: Any, total: int, steps_per_iter: int) -> None:
        every = run_cfg.save_every
        self.every = max(steps_per_iter, -(-total // 10)) if every is None else every
        self.seconds = run_cfg.save_minutes * 60.0
        self.keep = run_cfg.keep_checkpoints
        self.last = time.monotonic()

    def due(self, prev: int, step: int, final: bool) -> bool:
        return final or crossed(prev, step, self.every) or (self.seconds > 0 and time.monotonic() - self.last >= self.seconds)

    def saved(self, run_dir: Path | None) -> None:
        """A checkpoint was written; prune ``run_dir``'s older ones (None: another process writes)."""
        self.last = time.monotonic()
        if self.keep > 0 and run_dir is not None:
            for step in checkpoint_steps(run_dir)[: -self.keep]:
                shutil.rmtree(run_dir / "checkpoints" / str(step), ignore_errors=True)


class StopSignals:
    """Context: SIGINT / SIGTERM set ``requested``; the loop checkpoints and stops after the
    current iteration. A second signal raises KeyboardInterrupt at once."""

    def __init__(self, message: Callable[[str], None]) -> None:
        self.requested: str | None = None
        self.message = message
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.message(f"{self.requested}: finishing this iteration, then writing a checkpoint (send it again to stop now)")

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def write_meta(run_dir: Path, *, resumed: bool) -> None:
    """Append this invocation (command line, versions, git commit, host) to ``meta.json``."""
    import genrl

    path = run_dir / "meta.json"
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    versions = {"genrl": genrl.__version__, "python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("gymnasium", "mujoco", "dm_control", "diffusers", "transformers", "peft", "numpy"):
        versions[name] = _version(name)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed": resumed, "argv": sys.argv, "cwd": os.getcwd(),
        "host": socket.gethostname(), "git_commit": _git_commit(), "versions": versions,
    }  # fmt: skip
    meta.setdefault("invocations", []).append(entry)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the genrl source tree, with "-dirty" for uncommitted changes; None outside git."""
    src = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def check_same_config(saved: dict[str, Any] | None, now: dict[str, Any], ckpt: Path) -> None:
    """ConfigError if the run's settings changed since ``ckpt`` was written (the ``run`` fields
    that may change on resume excepted): a resumed run must be the run that was started."""
    if saved is None:  # checkpoints written before configs were recorded
        return
    from genrl.config import upgrade_config
    from genrl.presets import flatten

    saved = upgrade_config(saved)
    try:  # fields added since the checkpoint was written take their defaults on both sides
        from genrl.config import config_from_dict

        saved = config_from_dict(saved).to_dict()
    except Exception:  # noqa: BLE001  an unparsable saved config is compared as written
        pass
    free = {f"run.{k}" for k in (*RESUME_RUN_FIELDS, "total_steps", "out", "device", "torch_threads", "distributed", "distributed_timeout_s")}
    a, b = flatten(saved), flatten(now)
    changed = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    if changed:
        k = changed[0]
        raise ConfigError(
            f"config.json differs from what wrote checkpoint {ckpt.name} ({k}: {a.get(k)!r} -> {b.get(k)!r}"
            f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); a resumed run keeps its settings: start a new run to change them"
        )

"""What the run loop (``genrl.trainer.run``) needs from an algorithm and from a kind of run.

An **Algorithm** trains: ``iterate()`` runs one iteration (collect + update) and returns metrics;
its counters say where the run is. A **Task** is one kind of run around an algorithm: it builds
the algorithm, restores a checkpoint, evaluates, writes checkpoints and the final export
(control: evaluation episodes and an exported agent; text-to-image: image grids and a LoRA).
The loop never reads an algorithm's state keys or branches on the kind of run: adding an
algorithm is one file plus a line in ``TASKS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Algorithm(Protocol):
    iteration: int
    """Iterations done."""
    n_iterations: int
    """Iterations of the whole run (the budget rounded up to whole iterations)."""
    steps_per_iter: int
    """Budget units (env steps, scored images) per iteration."""
    policy: Any

    @property
    def global_step(self) -> int: ...

    def iterate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(Protocol):
    algo: Algorithm
    cfg: Any
    unit: str
    """What the budget counts, for messages: "step" or "image"."""

    def restore(self, ckpt: Path) -> None:
        """Load checkpoint ``ckpt`` into ``algo`` (CheckpointError if unreadable)."""

    def prepare(self, run_dir: Path, fresh: bool) -> None:
        """Files the run keeps beside config.json (e.g. its prompts), before the loop."""

    def start_message(self, run_dir: Path) -> str: ...

    def begin(self, logger: Any) -> None:
        """A fresh run's step-0 logging (e.g. the base model's image grid)."""

    def evaluate(self, step: int) -> dict[str, float]: ...

    def save(self, run_dir: Path) -> Path: ...

    def finish(self, run_dir: Path, last_eval: dict[str, float]) -> None:
        """After the last iteration: the export (``final/``) and summaries."""

    def close(self) -> None: ...

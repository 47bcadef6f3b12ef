"""What the run loop (``genrl.trainer.run``) needs from an algorithm and from a kind of run.

An **Algorithm** trains: ``iterate()`` runs one iteration (collect + update) and returns metrics;
its counters say where the run is. A **Task** is one kind of run around an algorithm: it builds
the algorithm, restores a checkpoint, evaluates, writes checkpoints and the final export
(control: evaluation episodes and an exported agent; text-to-image: image grids and a LoRA).
The loop never reads an algorithm's state keys or branches on the kind of run: adding an
algorithm is one file plus a line in ``TASKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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

    def restore(self, ckpt: Path) -> str | None:
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


@dataclass(frozen=True)
class ControlAlgorithm:
    """A registered control algorithm: ``build(policy, env, config, *, total_steps, seed, device)``
    returns an ``Algorithm``; ``config_class`` is the typed dataclass of its ``algo_config``
    section (checked when the run's config is parsed)."""

    build: Callable[..., Algorithm]
    config_class: type | None = None
    defaults: dict[str, Any] | None = None
    """Run settings this algorithm needs other than genrl's defaults (e.g. SAC: no running reward
    normalisation), laid under the user's config when it is parsed, so ``config.json`` shows them;
    ``"policy_config_for": {family: {...}}`` gives policy settings per family."""
    gorl: bool = False
    """For the gorl family, ``build`` also takes ``gorl=`` (the run's ``GoRLTrainConfig``) and
    ``env_factory=`` (a fresh env for refinement data): GoRL around the algorithm (SAC)."""


#: algorithm name -> how to build it; "ppo" (with GoRL around it for the gorl family) is built in
CONTROL_ALGORITHMS: dict[str, ControlAlgorithm] = {}


def register_control_algorithm(name: str, build: Callable[..., Algorithm], config_class: type | None = None, defaults: dict[str, Any] | None = None, gorl: bool = False) -> None:
    """Make ``--algo NAME`` train with ``build`` through genrl's run loop, logs and checkpoints.

    The algorithm's ``state_dict()`` is checkpointed as it is: tensors (and dicts of tensors) in
    ``trainer.safetensors``, an ``"optimizer"`` entry in ``optimizer.pt``, everything else in
    ``state.json``; ``load_state_dict`` gets the same dict back. Its ``policy`` is saved on its own.
    """
    if name == "ppo" or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"invalid algorithm name {name!r}")
    CONTROL_ALGORITHMS[name] = ControlAlgorithm(build, config_class, defaults, gorl)

"""The batched-environment API the trainer sees: tensors in, tensors out.

Shapes: N envs, O observation dim, A action dim. A GPU-batched simulator fits behind the same
API (``reset``, ``step``, ``state_dict``/``load_state_dict``) without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import Tensor


class EnvError(ValueError):
    """Bad environment id or options."""


@dataclass(frozen=True)
class EnvSpec:
    env_id: str
    n_envs: int
    obs_dim: int  # O
    action_dim: int  # A
    action_low: np.ndarray  # (A,)
    action_high: np.ndarray  # (A,)
    max_episode_steps: int | None = None
    backend: str = "gymnasium"
    """The back end stepping the worlds (``envs.make_env``)."""


@dataclass
class StepResult:
    obs: Tensor  # (N, O) next observations (already reset where an episode ended)
    reward: Tensor  # (N,) reward as the learner sees it (scaled if reward normalisation is on)
    terminated: Tensor  # (N,) bool: true end of the MDP, no bootstrap
    truncated: Tensor  # (N,) bool: time limit, bootstrap from final_obs
    final_obs: Tensor  # (N, O) the last observation of an ended episode, else equal to obs
    episode_returns: list[float] = field(default_factory=list)  # raw returns of episodes ended now
    episode_lengths: list[int] = field(default_factory=list)


class BatchedEnv(Protocol):
    """What the trainer needs from a back end."""

    spec: EnvSpec

    def reset(self, seed: int | None = None) -> Tensor: ...  # (N, O)

    def step(self, action: Tensor) -> StepResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...

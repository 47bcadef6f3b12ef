"""Environment back ends: batched tensors in, batched tensors out.

Never imports ``genrl`` or ``policies``.
"""

import os

# Headless MuJoCo rendering: EGL works without a display (set before mujoco is imported).
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

from genrl_envs import maze, multigoal  # noqa: F401  registers genrl/PointMaze-v0, genrl/MultiGoal-v0 for plain gym.make
from genrl_envs.base import BatchedEnv, EnvError, EnvSpec, StepResult
from genrl_envs.gym import GymVectorEnv, check_env_id


def make_env(env_id: str, n_envs: int = 1, **kwargs) -> GymVectorEnv:
    """Build the back end for ``env_id`` (any registered gymnasium id); see ``GymVectorEnv``."""
    return GymVectorEnv(env_id, n_envs, **kwargs)


__all__ = ["BatchedEnv", "EnvError", "EnvSpec", "GymVectorEnv", "StepResult", "check_env_id", "make_env"]

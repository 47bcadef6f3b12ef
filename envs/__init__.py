"""Environment back ends: batched tensors in, batched tensors out.

``make_env(env_id, n_envs, backend=...)`` picks one:

* ``"gymnasium"``: any registered gymnasium id, stepped in this process (``envs.gym``); exact resume;
* ``"torch"``: torch-native batched tasks (``envs.pointmass``: genrl/MultiGoal-v0,
  genrl/PointMaze-v0), thousands of worlds on CPU or CUDA; exact resume;
* ``"envpool"``: EnvPool's C++ thread pool (``envs.envpool_sim``), MuJoCo tasks; no snapshots;
* ``"warp"``: MuJoCo Warp (``envs.warp_sim``), gymnasium's MuJoCo tasks as N GPU worlds;
* ``"auto"``: "torch" for ids that have a torch-native version, else "gymnasium" (a run's default).

Never imports ``genrl`` or ``policies``.
"""

import os
from typing import Any

# Headless MuJoCo rendering: EGL works without a display (set before mujoco is imported).
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("MUJOCO_GL", "egl")

from genrl_envs import maze, multigoal  # noqa: F401  registers genrl/PointMaze-v0, genrl/MultiGoal-v0 for plain gym.make
from genrl_envs.base import BatchedEnv, EnvError, EnvSpec, StepResult
from genrl_envs.gym import GymVectorEnv, check_env_id

BACKENDS = ("auto", "gymnasium", "torch", "envpool", "warp")

#: back end -> (module to import, pip requirement) for the optional ones
_OPTIONAL = {"envpool": ("envpool", "envpool"), "warp": ("mujoco_warp", "mujoco-warp==3.17.0")}


def resolve_backend(env_id: str, backend: str = "auto", *, chunked: bool = False, viewed: bool = False) -> str:
    """The back end ``backend`` means for ``env_id`` ("auto" resolved); EnvError if unknown, not
    installed (the message names the pip command), or unable to run action chunks (``chunked``:
    only gymnasium ends a chunk exactly at an episode's end) or observation views (``viewed``:
    ``envs.views`` wraps gymnasium envs)."""
    from genrl_envs.pointmass import TORCH_SIMS

    if backend not in BACKENDS:
        raise EnvError(f"unknown env backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torch" if env_id in TORCH_SIMS and not (chunked or viewed) else "gymnasium"
    if viewed and backend != "gymnasium":
        raise EnvError(f"observation views (env.obs_resolution) run on the gymnasium back end, not '{backend}'")
    if chunked and backend != "gymnasium":
        raise EnvError(f"action chunks (env.horizon / n_obs_steps / n_action_steps > 1) run on the gymnasium back end, not '{backend}'")
    if backend in _OPTIONAL:
        import importlib.util

        module, requirement = _OPTIONAL[backend]
        if importlib.util.find_spec(module) is None:
            raise EnvError(f"env backend '{backend}' is not installed: pip install {requirement}")
    return backend


def make_env(env_id: str, n_envs: int = 1, *, backend: str = "gymnasium", device: str = "cpu", **kwargs: Any) -> BatchedEnv:
    """Build ``n_envs`` copies of ``env_id`` on ``backend`` (see the module docstring; runs
    choose theirs with ``env.backend``, "auto" by default).

    Keyword arguments: those of ``envs.gym.GymVectorEnv`` (normalize_obs, normalize_reward, gamma,
    clip_obs, clip_reward, reward_scale, env_kwargs; gymnasium only: vectorization, render_mode,
    keep_info); ``device`` places the torch and warp back ends' worlds (the others run on CPU).
    """
    backend = resolve_backend(env_id, backend)
    if backend == "gymnasium":
        return GymVectorEnv(env_id, n_envs, **kwargs)
    from genrl_envs.batched import TensorVectorEnv

    if kwargs.pop("obs_resolution", None):
        raise EnvError(f"observation views (env.obs_resolution) run on the gymnasium back end, not '{backend}'")
    env_kwargs = kwargs.pop("env_kwargs", None)
    vectorization = kwargs.pop("vectorization", "sync")
    for key in ("render_mode", "keep_info"):
        if kwargs.pop(key, None) not in (None, False):
            raise EnvError(f"{key} is for the gymnasium back end, not '{backend}'")
    if backend == "torch":
        from genrl_envs.pointmass import make_torch_sim

        return TensorVectorEnv(make_torch_sim(env_id, n_envs, device=device, env_kwargs=env_kwargs), backend="torch", **kwargs)
    if backend == "envpool":
        from genrl_envs.envpool_sim import make_envpool_env

        return make_envpool_env(env_id, n_envs, asynchronous=vectorization == "async", env_kwargs=env_kwargs, **kwargs)
    from genrl_envs.warp_sim import make_warp_env

    if env_kwargs:
        raise EnvError(f"the warp back end runs gymnasium's tasks with their default arguments; env_kwargs {env_kwargs} are not supported")
    return make_warp_env(env_id, n_envs, device=device, **kwargs)


__all__ = ["BACKENDS", "BatchedEnv", "EnvError", "EnvSpec", "GymVectorEnv", "StepResult", "check_env_id", "make_env", "resolve_backend"]

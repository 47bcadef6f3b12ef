"""Observation history and action chunks, as Diffusion Policy and DPPO run their policies.

``ActionChunking`` wraps one gymnasium env so that a policy decides once per chunk:

* the observation is the last ``n_obs_steps`` observations stacked oldest first, flattened to
  (n_obs_steps * O,); at an episode's start the first observation fills the whole history;
* the action is a chunk of ``horizon`` actions flattened time-major to (horizon * A,), whose first
  ``n_action_steps`` are executed one env step each (DPPO's convention: the chunk starts at the
  current step; the rest of the horizon is predicted, not executed);
* the reward is the sum of the executed steps' rewards; the chunk stops early when the episode
  terminates or is truncated, and ``info["executed_steps"]`` says how many steps ran.

Wrapping each sub-env before vectorisation keeps episode ends exact: a chunk never runs into the
next episode. ``horizon = n_obs_steps = n_action_steps = 1`` is the plain env.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from genrl_envs.base import EnvError


def check_chunking(horizon: int, n_obs_steps: int, n_action_steps: int) -> None:
    """EnvError unless 1 <= n_action_steps <= horizon and n_obs_steps >= 1 (integers)."""
    values = {"horizon": horizon, "n_obs_steps": n_obs_steps, "n_action_steps": n_action_steps}
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise EnvError(f"{name} must be an integer >= 1, got {v!r}")
    if n_action_steps > horizon:
        raise EnvError(f"n_action_steps ({n_action_steps}) must not exceed horizon ({horizon})")


class ActionChunking(gym.Wrapper):
    """One decision per chunk: stacked observations in, a flattened action chunk out."""

    def __init__(self, env: gym.Env, *, horizon: int, n_obs_steps: int, n_action_steps: int) -> None:
        super().__init__(env)
        check_chunking(horizon, n_obs_steps, n_action_steps)
        obs_space, act_space = env.observation_space, env.action_space
        if not (isinstance(obs_space, spaces.Box) and isinstance(act_space, spaces.Box) and len(obs_space.shape) == 1):
            raise EnvError("action chunking needs a flat Box observation space and a Box action space")
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.action_dim = int(np.prod(act_space.shape))
        self.observation_space = spaces.Box(np.tile(obs_space.low, n_obs_steps), np.tile(obs_space.high, n_obs_steps), dtype=obs_space.dtype)
        self.action_space = spaces.Box(np.tile(act_space.low.ravel(), horizon), np.tile(act_space.high.ravel(), horizon), dtype=act_space.dtype)
        self._history: deque[np.ndarray] = deque(maxlen=n_obs_steps)

    def _stacked(self) -> np.ndarray:
        return np.concatenate(list(self._history)).astype(self.observation_space.dtype, copy=False)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._history.clear()
        for _ in range(self.n_obs_steps):
            self._history.append(np.asarray(obs))
        return self._stacked(), info

    def wrapper_arrays(self) -> dict[str, np.ndarray]:
        """The observation history (n_obs_steps, O), for exact resume (``envs.snapshot``)."""
        return {"history": np.stack(list(self._history))} if self._history else {}

    def load_wrapper_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self._history.clear()
        for row in arrays.get("history", ()):
            self._history.append(np.array(row))

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        chunk = np.asarray(action).reshape(self.horizon, self.action_dim)
        total, terminated, truncated, info = 0.0, False, False, {}
        executed = 0
        for a in chunk[: self.n_action_steps]:
            obs, reward, terminated, truncated, info = self.env.step(a.reshape(self.env.action_space.shape))
            self._history.append(np.asarray(obs))
            total += float(reward)
            executed += 1
            if terminated or truncated:
                break
        info = dict(info)
        info["executed_steps"] = executed
        return self._stacked(), total, bool(terminated), bool(truncated), info


__all__ = ["ActionChunking", "check_chunking"]

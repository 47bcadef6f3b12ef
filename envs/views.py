"""Observation views: what a policy's sensors make of the true observation.

GPC composes policies that look at one state through different inputs (a camera and a depth
sensor, in the paper). A view here is a deterministic, per-dimension *resolution*: dimension i
of every observation frame is rounded to the nearest multiple of ``resolution[i]``,

    view(o)_i = q_i * round(o_i / q_i)      (dimensions without a resolution pass unchanged),

the reading of a sensor with step q_i (a camera that resolves position along one axis coarsely
and along the other finely). A view is a function of one frame, so it commutes with the history
stacking of ``envs.chunking`` (each frame of the stack is viewed alike) and is idempotent: viewing
a viewed observation changes nothing. Being deterministic, it keeps exact resume and gives every
parent of a composition the same episodes (common random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

import gymnasium as gym
import numpy as np
import torch

from genrl_envs.base import EnvError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def parse_resolution(resolution: Mapping[Any, Any] | None, obs_dim: int | None = None) -> dict[int, float]:
    """{dimension index: step} from a mapping whose keys are indices (ints or digit strings, as
    JSON writes them); EnvError on a bad index or a step that is not a finite number > 0."""
    out: dict[int, float] = {}
    for key, step in (resolution or {}).items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise EnvError(f"observation resolution: index {key!r} is not an integer") from None
        if i < 0 or (obs_dim is not None and i >= obs_dim):
            raise EnvError(f"observation resolution: index {i} is outside the observation (dimension {obs_dim})")
        if isinstance(step, bool) or not isinstance(step, int | float) or not (math.isfinite(step) and step > 0):
            raise EnvError(f"observation resolution: the step of dimension {i} must be a finite number > 0, got {step!r}")
        out[i] = float(step)
    return dict(sorted(out.items()))


def apply_view(obs: ArrayT, resolution: Mapping[int, float], frame_dim: int) -> ArrayT:
    """``obs`` (..., n * frame_dim), a stack of n frames, with every frame viewed (module doc).
    numpy or torch; dtype and shape kept."""
    if not resolution:
        return obs
    if obs.shape[-1] % frame_dim:
        raise EnvError(f"observation of width {obs.shape[-1]} is not a stack of {frame_dim}-dimensional frames")
    n = obs.shape[-1] // frame_dim
    step = np.zeros(frame_dim)
    for i, q in resolution.items():
        step[i] = q
    step = np.tile(step, n)
    cols = np.flatnonzero(step)
    if isinstance(obs, torch.Tensor):
        q = torch.as_tensor(step[cols], dtype=obs.dtype, device=obs.device)
        idx = torch.as_tensor(cols, device=obs.device)
        out = obs.clone()
        out[..., idx] = torch.round(obs[..., idx] / q) * q
        return out
    out = np.array(obs, copy=True)
    q = step[cols].astype(out.dtype)
    out[..., cols] = np.round(out[..., cols] / q) * q
    return out


class ObservationResolution(gym.ObservationWrapper):
    """One env's observations through a view (``apply_view`` on its single frame)."""

    def __init__(self, env: gym.Env, resolution: Mapping[Any, Any]) -> None:
        super().__init__(env)
        shape = env.observation_space.shape
        if shape is None or len(shape) != 1:
            raise EnvError("an observation resolution needs a flat Box observation")
        self.resolution = parse_resolution(resolution, shape[0])
        self._frame = shape[0]

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return apply_view(observation, self.resolution, self._frame)


__all__ = ["ObservationResolution", "apply_view", "parse_resolution"]

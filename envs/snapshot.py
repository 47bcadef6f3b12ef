"""The full state of one gymnasium sub-environment as arrays + JSON, for exact resume."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class _Snapshot(gym.Wrapper):
    """Exposes the full state of one sub-environment as arrays + JSON (works in subprocesses).

    Reading ``snapshot`` returns the state; assigning to it restores it (so ``set_attr`` of an
    AsyncVectorEnv can restore each worker). With ``keep_info=False`` the per-step info dict is
    dropped: merging it across sub-envs costs ~25 us per step and training never reads it.
    """

    def __init__(self, env: gym.Env, keep_info: bool = True) -> None:
        super().__init__(env)
        self.keep_info = keep_info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, info if self.keep_info else {}

    @property
    def snapshot(self) -> dict[str, Any]:
        base = self.env.unwrapped
        arrays: dict[str, np.ndarray] = {}
        for name, value in vars(base).items():
            if isinstance(value, np.ndarray) and value.dtype != object:
                arrays[f"attr.{name}"] = value.copy()
        scalars = {k: v for k, v in vars(base).items() if isinstance(v, (bool, int, float)) and not k.startswith("_np")}
        data = getattr(base, "data", None)
        if data is not None and type(data).__name__ == "MjData":
            for name in dir(data):
                # efc_*: the constraint workspace, rebuilt by mj_forward at the start of every step
                # and partly uninitialised memory (e.g. efc_J_colind past each row's non-zeros)
                if name.startswith("_") or name.startswith("efc_"):
                    continue
                value = getattr(data, name)
                if isinstance(value, np.ndarray):
                    arrays[f"mj.{name}"] = value.copy()
            scalars["mj.time"] = float(data.time)
        elapsed = {}
        env: Any = self.env
        depth = 0
        while isinstance(env, gym.Wrapper):
            if hasattr(env, "_elapsed_steps"):
                elapsed[str(depth)] = env._elapsed_steps
            if hasattr(env, "wrapper_arrays"):  # a wrapper with state of its own (e.g. an observation history)
                arrays.update({f"wrap{depth}.{k}": v for k, v in env.wrapper_arrays().items()})
            env, depth = env.env, depth + 1
        rng = base.np_random.bit_generator.state
        return {
            "arrays": arrays,
            "meta": {"scalars": scalars, "elapsed": elapsed, "rng": _jsonable(rng), "has_reset": True},
        }

    @snapshot.setter
    def snapshot(self, state: dict[str, Any]) -> None:
        base = self.env.unwrapped
        meta = state["meta"]
        base.np_random.bit_generator.state = _from_jsonable(meta["rng"])
        data = getattr(base, "data", None)
        for key, value in state["arrays"].items():
            kind, name = key.split(".", 1)
            if kind.startswith("wrap"):
                continue
            target = getattr(base, name, None) if kind == "attr" else getattr(data, name, None)
            if isinstance(target, np.ndarray) and target.shape == value.shape:
                if target.flags.writeable:
                    target[...] = value
            elif kind == "attr":
                setattr(base, name, np.array(value))
        for key, value in meta["scalars"].items():
            if key == "mj.time":
                data.time = value
            else:
                setattr(base, key, value)
        env: Any = self.env
        depth = 0
        while isinstance(env, gym.Wrapper):
            if str(depth) in meta["elapsed"]:
                env._elapsed_steps = meta["elapsed"][str(depth)]
            if hasattr(env, "_has_reset"):
                env._has_reset = True
            if hasattr(env, "load_wrapper_arrays"):
                prefix = f"wrap{depth}."
                env.load_wrapper_arrays({k[len(prefix) :]: v for k, v in state["arrays"].items() if k.startswith(prefix)})
            env, depth = env.env, depth + 1


def _jsonable(obj: Any) -> Any:
    """Bit-generator states hold 128-bit ints: JSON keeps them as strings."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return {"__int__": str(int(obj))}
    return obj


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__int__"}:
            return int(obj["__int__"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj

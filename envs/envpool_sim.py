"""EnvPool back end: N worlds of an EnvPool task stepped by EnvPool's C++ thread pool.

``EnvPoolSim`` implements ``envs.batched.BatchedSim`` (and ``step_async`` / ``step_wait``) on a
gymnasium-style EnvPool (``env_type="gymnasium"``, ``num_envs = batch_size = N``: every call
returns all N worlds, put in world order by ``info["env_id"]``); ``make_envpool_env`` wraps it in
``envs.batched.TensorVectorEnv`` (backend name "envpool"). Shapes: N worlds, O observation dim,
A action dim.

* Tasks: any EnvPool id with a Box action space and a Box observation (or a Dict of Boxes,
  flattened in the space's key order): gymnasium's MuJoCo tasks (``Hopper-v5``, ``Ant-v5``, ...,
  also -v3/-v4), dm_control's (``CheetahRun-v1``, ...), Box2D and classic continuous tasks.
* SAME_STEP episodes: EnvPool itself resets a finished world on the *next* ``step`` call in place
  of stepping it (a dead step that drops that call's action and returns reward 0). ``reset_done``
  resets the finished worlds at once through EnvPool's partial reset (``env.reset(ids)``), which
  clears their done flag, so the next ``step`` advances every world with its action. ``step``
  refuses to run while a finished world has not been reset (the dead step would go unnoticed).
* Time limit: EnvPool's own (``max_episode_steps``, counted in ``info["elapsed_step"]``) is
  reported as ``truncated``; ``terminated`` is the task's own end.
* Seeding: EnvPool seeds its worlds when the pool is built (world i from seed + i, a
  ``std::mt19937`` per world that draws every reset's noise); a built pool cannot be re-seeded.
  ``reset(seed)`` therefore builds a new pool with per-world seeds ``(seed + i) mod 2**31``
  (EnvPool's seeds are int32), except on the first reset of a pool built with that seed. Two
  ``reset(s)`` calls give the same worlds; the noise of EnvPool's reset is not numpy's, so a seed
  does not give gymnasium's initial states.
* No snapshots (``has_snapshot = False``): EnvPool does not expose the MuJoCo state; a resumed run
  restarts its episodes (``TensorVectorEnv.load_state_dict``).
* Rewards: EnvPool returns float32 rewards. For gymnasium's MuJoCo -v5 tasks (``REWARD_REBUILD``)
  the float64 reward is rebuilt from EnvPool's float64 terms (``info["reward_*"]``,
  ``info["x_velocity"]``, the healthy bonus read off the float32 reward) in gymnasium's order of
  operations, with the control cost computed from the action as gymnasium v5 computes it (float32
  sum of squares; Humanoid and HumanoidStandup: float64 from ``data.ctrl``). Where the rebuilt
  value strays from EnvPool's reward by more than float32 rounding (options that redefine the
  reward) EnvPool's is kept. InvertedPendulum's reward is exact in float32; InvertedDoublePendulum
  reports no terms and stays float32.
* Agreement with gymnasium (``scripts/envpool_agreement.py``): EnvPool's -v5 tasks load
  gymnasium's XMLs (its ``*_envpool.xml`` copies, byte for byte below a licence comment) with
  gymnasium's constants, and EnvPool links MuJoCo 3.6.0. On the same MuJoCo release, from the same
  state and actions, observations equal gymnasium's bitwise and rebuilt rewards to 1e-14; on
  another release (genrl requires mujoco >= 3.17) the engine's rounding differences grow with the
  dynamics, past 1e-6 after ~6 steps (Humanoid: its PGS solve stops unconverged), ~60
  (HalfCheetah), ~130 (Ant), ~300-600 (Hopper, Walker2d) with random actions: the same task and
  reward, but returns comparable in distribution, not step by step.
* Observations: EnvPool's float64 arrays copied into torch's allocator as float32 CPU tensors
  (``torch.tensor``; see ``envs.gym._aligned`` for why the copy).
* Calls: a step is EnvPool's two C++ calls (``_send`` / ``_recv``) with the fields looked up by
  their position in EnvPool's flat state list, found once per pool; EnvPool's Python
  ``send`` / ``recv`` rebuild the same structures on every call (tested equal to them).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genrl_envs.base import EnvError
from genrl_envs.batched import TensorVectorEnv

_SEED_MOD = 2**31
#: ``envpool.make`` arguments EnvPoolSim sets itself
_RESERVED = ("env_type", "num_envs", "batch_size", "num_threads", "seed", "env_seed")


def _import_envpool() -> Any:
    """The ``envpool`` module, or EnvError saying how to install it."""
    try:
        import envpool
    except ImportError as exc:
        raise EnvError(f"the envpool back end needs EnvPool ({exc}): pip install envpool") from None
    return envpool


def check_envpool_id(env_id: str) -> None:
    """Raise EnvError naming close EnvPool ids when ``env_id`` is not one."""
    ids = _import_envpool().list_all_envs()
    if env_id in ids:
        return
    close = difflib.get_close_matches(env_id, ids, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise EnvError(f"unknown EnvPool env id '{env_id}'{hint} (envpool.list_all_envs() lists them)")


# -- float64 rewards of gymnasium's MuJoCo -v5 tasks ---------------------------------------------
_RewardFn = Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, Any]], np.ndarray]


def _ctrl32(action: np.ndarray, weight: float) -> np.ndarray:
    """gymnasium v5's control cost ``weight * np.sum(np.square(action))`` on a float32 action:
    float32 throughout (NumPy 2 keeps a float32 times a Python float in float32)."""
    return (np.square(action).sum(-1) * np.float32(weight)).astype(np.float64)


def _healthy(rest: np.ndarray, reward32: np.ndarray, bonus: float) -> np.ndarray:
    """The healthy bonus (0 or ``bonus``) that brings ``rest`` closest to EnvPool's reward."""
    with_bonus = np.abs(rest + bonus - reward32) < np.abs(rest - reward32)
    return np.where(with_bonus, bonus, 0.0)


def _forward_healthy_ctrl(info: dict[str, np.ndarray], action: np.ndarray, reward32: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """Hopper-v5, Walker2d-v5: (forward + healthy) - ctrl."""
    forward = cfg["forward_reward_weight"] * info["x_velocity"]
    ctrl = _ctrl32(action, cfg["ctrl_cost_weight"])
    return (forward + _healthy(forward - ctrl, reward32, cfg["healthy_reward"])) - ctrl


def _sum_terms(*terms: tuple[str, float]) -> _RewardFn:
    """A reward that adds ``sign * info[key]`` left to right (a - b is a + (-b) exactly)."""

    def reward(info: dict[str, np.ndarray], action: np.ndarray, reward32: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
        total = terms[0][1] * info[terms[0][0]]
        for key, sign in terms[1:]:
            total = total + sign * info[key]
        return total

    return reward


def _with_ctrl32(forward_key: str) -> _RewardFn:
    """HalfCheetah-v5, Swimmer-v5: forward - ctrl (ctrl from the action, float32)."""

    def reward(info: dict[str, np.ndarray], action: np.ndarray, reward32: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
        return info[forward_key] - _ctrl32(action, cfg["ctrl_cost_weight"])

    return reward


def _ant(info: dict[str, np.ndarray], action: np.ndarray, reward32: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """Ant-v5: (forward + healthy) - (ctrl + contact)."""
    return (info["reward_forward"] + info["reward_survive"]) - (_ctrl32(action, cfg["ctrl_cost_weight"]) - info["reward_contact"])


def _humanoid(info: dict[str, np.ndarray], action: np.ndarray, reward32: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """Humanoid-v5: (forward + healthy) - (ctrl + contact), ctrl in float64 (from ``data.ctrl``)."""
    return (info["reward_linvel"] + info["reward_alive"]) - (-info["reward_quadctrl"] - info["reward_impact"])


def _reach(*extra: str) -> _RewardFn:
    """Reacher-v5 (dist + ctrl), Pusher-v5 (dist + ctrl + near); ctrl from the action, float32."""

    def reward(info: dict[str, np.ndarray], action: np.ndarray, reward32: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
        total = info["reward_dist"] - _ctrl32(action, cfg["ctrl_cost_weight"])
        for key in extra:
            total = total + info[key]
        return total

    return reward


#: -v5 id -> float64 reward from EnvPool's info terms, the float32 action, EnvPool's reward, its config
REWARD_REBUILD: dict[str, _RewardFn] = {
    "Hopper-v5": _forward_healthy_ctrl,
    "Walker2d-v5": _forward_healthy_ctrl,
    "HalfCheetah-v5": _with_ctrl32("reward_run"),
    "Swimmer-v5": _with_ctrl32("reward_fwd"),
    "Ant-v5": _ant,
    "Humanoid-v5": _humanoid,
    "HumanoidStandup-v5": _sum_terms(("reward_linup", 1.0), ("reward_quadctrl", 1.0), ("reward_impact", 1.0), ("reward_alive", 1.0)),
    "Reacher-v5": _reach(),
    "Pusher-v5": _reach("reward_near"),
}


def _flat_box(space: Any, env_id: str) -> tuple[int, tuple[str, ...] | None]:
    """(O, Dict keys or None) of a Box or a Dict of Boxes; EnvError otherwise."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape)), None
    if isinstance(space, gym.spaces.Dict) and all(isinstance(s, gym.spaces.Box) for s in space.spaces.values()):
        return sum(int(np.prod(s.shape)) for s in space.spaces.values()), tuple(space.spaces)
    raise EnvError(f"EnvPool's {env_id} has observation space {space}; a Box or a Dict of Boxes is required")


class EnvPoolSim:
    """N worlds of an EnvPool task (see the module docstring).

    Args:
        env_id: an EnvPool id (``envpool.list_all_envs()``) with Box actions.
        n_envs: N.
        seed: the pool's seed before the first ``reset(seed)``.
        threads: EnvPool's ``num_threads`` (default min(N, os.cpu_count())).
        env_kwargs: further ``envpool.make`` options (e.g. ``max_episode_steps``,
            ``reset_noise_scale``, ``ctrl_cost_weight``).
    """

    has_snapshot = False

    def __init__(self, env_id: str, n_envs: int, *, seed: int = 0, threads: int | None = None, env_kwargs: dict[str, Any] | None = None) -> None:
        envpool = _import_envpool()
        check_envpool_id(env_id)
        if n_envs < 1:
            raise EnvError(f"n_envs must be >= 1, got {n_envs}")
        kwargs = dict(env_kwargs or {})
        reserved = sorted(set(kwargs) & set(_RESERVED))
        if reserved:
            raise EnvError(f"env_kwargs may not set {', '.join(reserved)} (EnvPoolSim sets them)")
        fields = envpool.make_spec(env_id).config._fields
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            close = difflib.get_close_matches(unknown[0], fields, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EnvError(f"EnvPool's {env_id} has no option '{unknown[0]}'{hint}")
        threads = min(n_envs, os.cpu_count() or 1) if threads is None else int(threads)
        if threads < 1:
            raise EnvError(f"threads must be >= 1, got {threads}")
        self.env_id, self.n_envs, self.threads = env_id, n_envs, threads
        self._envpool, self._kwargs = envpool, kwargs
        self.device = torch.device("cpu")
        self._env: Any = None
        self._build(seed)
        import gymnasium as gym

        act = self._env.action_space
        if not isinstance(act, gym.spaces.Box):
            raise EnvError(f"EnvPool's {env_id} has a {type(act).__name__} action space; genrl's control back end needs Box actions")
        self.obs_dim, _ = _flat_box(self._env.observation_space, env_id)
        self.action_dim = int(np.prod(act.shape))
        self.action_low = np.asarray(act.low, dtype=np.float32).reshape(-1)
        self.action_high = np.asarray(act.high, dtype=np.float32).reshape(-1)
        self._action_shape = tuple(act.shape)
        config = self._env.config
        self.max_episode_steps: int | None = int(config["max_episode_steps"]) if config.get("max_episode_steps") else None
        self._config = config
        self._reward_fn = REWARD_REBUILD.get(env_id)
        self._ids = np.arange(n_envs)
        self._ended = np.zeros(n_envs, dtype=bool)
        self._pending: np.ndarray | None = None

    # -- pool -----------------------------------------------------------------------------------
    def _build(self, seed: int) -> None:
        """A new pool with world i seeded (seed + i) mod 2**31; the old one is closed."""
        if self._env is not None:
            self._env.close()
        n = self.n_envs
        env_seed = [(int(seed) + i) % _SEED_MOD for i in range(n)]
        try:
            self._env = self._envpool.make(
                self.env_id, env_type="gymnasium", num_envs=n, batch_size=n, num_threads=self.threads, seed=env_seed[0], env_seed=env_seed, **self._kwargs
            )
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise EnvError(f"cannot create EnvPool's {self.env_id} with env_kwargs {self._kwargs}: {str(exc).splitlines()[0]}") from None
        self._seed, self._fresh = int(seed), True
        self._layout()

    def _layout(self) -> None:
        """Where each field sits in EnvPool's flat C++ state and action lists, so a step is two
        C++ calls and a few array lookups (EnvPool's Python ``send`` / ``recv`` rebuild the same
        structures through optree and config lookups on every call, ~40% of an 8-world step)."""
        env = self._env
        keys = list(env._state_keys)
        index = {k: i for i, k in enumerate(keys)}
        _, space_keys = _flat_box(env.observation_space, self.env_id)
        if space_keys is not None:  # a Dict of Boxes, flattened in the space's key order
            self._obs_idx = [index[f"obs:{k}"] for k in space_keys]
        else:  # a Box: "obs", or a one-key dict EnvPool's gymnasium wrapper unwraps
            self._obs_idx = [index["obs"] if "obs" in index else next(i for k, i in index.items() if k.startswith("obs:"))]
        self._id_idx, self._done_idx, self._trunc_idx, self._rew_idx = index["info:env_id"], index["done"], index["trunc"], index["reward"]
        self._info_idx = {k[5:]: i for k, i in index.items() if k.startswith("info:") and k != "info:players.env_id"}
        self._info_idx["elapsed_step"] = index["elapsed_step"]
        self._send_args = env._from(np.zeros((self.n_envs, *env.action_space.shape)), None)
        self._act_pos = len(env._action_keys) - 1  # env_id, players.env_id, then the action

    def _send(self, action64: np.ndarray) -> None:
        args = list(self._send_args)
        args[self._act_pos] = action64
        self._env._send(args)

    def _recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(obs (B, O) float64, reward float32, terminated, truncated, info, env_id) of the next
        batch EnvPool returns, in its row order."""
        state = self._env._recv()
        parts = [state[i] for i in self._obs_idx]
        obs = parts[0].reshape(len(parts[0]), -1) if len(parts) == 1 else np.concatenate([x.reshape(len(x), -1) for x in parts], axis=1)
        trunc = state[self._trunc_idx]
        info = {k: state[i] for k, i in self._info_idx.items()}
        return obs, state[self._rew_idx], state[self._done_idx] & ~trunc, trunc, info, state[self._id_idx]

    # -- conversion -----------------------------------------------------------------------------
    @staticmethod
    def _tensor(array: np.ndarray) -> Tensor:
        """A float32 copy in torch's allocator (``envs.gym._aligned``)."""
        return torch.tensor(array, dtype=torch.float32)

    def _in_order(self, env_id: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        """``arrays`` with their rows put in world order (EnvPool returns them as threads finish)."""
        if np.array_equal(env_id, self._ids):
            return list(arrays)
        out = []
        for a in arrays:
            b = np.empty_like(a)
            b[env_id] = a
            out.append(b)
        return out

    # -- BatchedSim -----------------------------------------------------------------------------
    def reset(self, seed: int) -> Tensor:
        """Reset every world, world i seeded (seed + i) mod 2**31 (a new pool unless this one was
        just built with ``seed``); obs (N, O) float32."""
        if self._pending is not None:
            raise RuntimeError("reset() while a step_async() awaits its step_wait()")
        if not (self._fresh and int(seed) == self._seed):
            self._build(seed)
        self._fresh = False
        self._env._reset(self._env.all_env_ids)
        obs, *_, env_id = self._recv()
        self._ended[:] = False
        return self._tensor(self._in_order(env_id, obs)[0])

    def reset_done(self, done: Tensor) -> Tensor:
        """Reset the worlds where ``done`` through EnvPool's partial reset; obs (N, O) whose done
        rows are their first observations (other rows zero)."""
        ids = np.flatnonzero(done.numpy() if done.device.type == "cpu" else done.cpu().numpy())
        out = np.zeros((self.n_envs, self.obs_dim))
        if ids.size:
            self._env._reset(ids.astype(np.int32))
            obs, *_, env_id = self._recv()
            out[env_id] = obs
            self._ended[ids] = False
        return self._tensor(out)

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Advance every world with ``action`` (N, A): (obs, reward float64, terminated, truncated)."""
        self.step_async(action)
        return self.step_wait()

    def step_async(self, action: Tensor) -> None:
        """Send the step to EnvPool and return: EnvPool's threads step the N worlds (without the
        GIL) while the caller goes on, e.g. storing the previous transition or running the
        learner; ``step_wait`` collects the result."""
        if self._pending is not None:
            raise RuntimeError("step_async() called twice without step_wait()")
        if self._ended.any():
            ended = np.flatnonzero(self._ended).tolist()
            raise RuntimeError(f"worlds {ended} ended and were not reset (reset_done); EnvPool would reset them in place of this step")
        a32 = action.detach().to("cpu", torch.float32).numpy()
        self._send(a32.reshape((self.n_envs, *self._action_shape)).astype(np.float64))
        self._pending = a32

    def step_wait(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Wait for the step ``step_async`` sent: (obs, reward, terminated, truncated)."""
        if self._pending is None:
            raise RuntimeError("step_wait() without step_async()")
        a32, self._pending = self._pending, None
        obs, reward, terminated, truncated, info, env_id = self._recv()
        obs, reward, terminated, truncated, *values = self._in_order(env_id, obs, reward, terminated, truncated, *info.values())
        info = dict(zip(info, values, strict=True))
        reward64 = self._reward64(info, a32, reward)
        self._ended = terminated | truncated
        return self._tensor(obs), torch.from_numpy(reward64), torch.from_numpy(terminated), torch.from_numpy(truncated.copy())

    def _reward64(self, info: dict[str, Any], action: np.ndarray, reward32: np.ndarray) -> np.ndarray:
        """The float64 reward (module docstring); EnvPool's float32 reward where no rebuild applies
        or where the rebuilt value strays from it by more than float32 rounding (options that
        change the reward's definition)."""
        r32 = reward32.astype(np.float64)
        if self._reward_fn is None:
            return r32
        try:
            r64 = np.asarray(self._reward_fn(info, action, r32, self._config), dtype=np.float64)
        except KeyError:  # options that drop a term from EnvPool's info
            return r32
        close = np.abs(r64 - r32) <= 1e-5 * (1.0 + np.abs(r32))
        return r64 if close.all() else np.where(close, r64, r32)

    def state_dict(self) -> dict[str, np.ndarray]:
        """{}: EnvPool cannot save its worlds (``has_snapshot`` is False)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise EnvError("EnvPool has no state snapshot to restore (its episodes restart on resume)")

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def make_envpool_env(
    env_id: str,
    n_envs: int,
    *,
    threads: int | None = None,
    asynchronous: bool = False,
    env_kwargs: dict[str, Any] | None = None,
    **wrapper_kwargs: Any,
) -> TensorVectorEnv:
    """``env_id`` as N EnvPool worlds behind ``TensorVectorEnv`` (backend "envpool").

    ``asynchronous``: the env's ``step_async`` / ``step_wait`` go through EnvPool's send/recv,
    so the caller's work overlaps the step (False: ``step_async`` steps inline). ``threads`` and
    ``env_kwargs`` go to ``EnvPoolSim``; ``wrapper_kwargs`` (normalize_obs, normalize_reward,
    gamma, ...) to ``TensorVectorEnv``.
    """
    sim = EnvPoolSim(env_id, n_envs, threads=threads, env_kwargs=env_kwargs)
    return TensorVectorEnv(sim, backend="envpool", asynchronous=asynchronous, **wrapper_kwargs)


__all__ = ["REWARD_REBUILD", "EnvPoolSim", "check_envpool_id", "make_envpool_env"]

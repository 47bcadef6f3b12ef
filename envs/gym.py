"""gymnasium back end: any registered continuous-control id, vectorised, tensors in and out.

The wrapper stack (outermost last), all gymnasium's own except the observation normaliser:

    SyncVectorEnv | AsyncVectorEnv  (SAME_STEP autoreset, SB3's semantics)
    -> vector.RecordEpisodeStatistics   raw returns and lengths
    -> NormalizeObservationSameStep      running mean/std, clip; also normalises final_obs
    -> NormalizeRewardSameStep           divides by the std of the discounted return, then clip

gymnasium's vector ``NormalizeObservation`` accepts only NEXT_STEP autoreset, which costs one
dead env step per episode and leaves ``final_obs`` unnormalised, and its ``NormalizeReward``
spends most of its time on NEXT_STEP bookkeeping; the two small wrappers of ``envs.normalize`` keep the same
statistics object (``gymnasium.wrappers.utils.RunningMeanStd``) and maths under SAME_STEP.
Actions are clipped to the action box in ``step`` (the policies' Gaussian actions are
unbounded); that is what ``vector.ClipAction`` does, at a tenth of its per-step cost.

Every piece of state that influences the future of a run (simulator state of each sub-env, its
RNG, time-limit counters, normaliser statistics, episode accumulators) is exposed through
``state_dict``/``load_state_dict`` (one sub-env's part: ``envs.snapshot``) so that a resumed run
continues bitwise.
Shapes: N envs, O observation dim, A action dim.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import vector as vw
from torch import Tensor

from genrl_envs.base import EnvError, EnvSpec, StepResult
from genrl_envs.normalize import NormalizeObservationSameStep, NormalizeRewardSameStep
from genrl_envs.snapshot import _Snapshot
from genrl_envs.views import ObservationResolution, parse_resolution


def check_env_id(env_id: str) -> None:
    """Raise EnvError naming close matches when ``env_id`` is not a registered gymnasium id."""
    _register_project_envs()
    if ":" in env_id:  # gymnasium's "module:EnvId": the module registers the id when imported
        module, _, name = env_id.partition(":")
        try:
            importlib.import_module(module)
        except Exception as exc:  # the user's module may raise anything while importing
            raise EnvError(f"cannot import '{module}' for env '{env_id}': {type(exc).__name__}: {exc}") from None
        if name not in gym.registry:
            raise EnvError(f"importing '{module}' did not register '{name}' (gymnasium.register it in that module)")
        return
    if env_id in gym.registry:
        return
    if _register_ogbench() and env_id in gym.registry:  # OGBench's manipulation ids (cube-single-v0, ...)
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise EnvError(f"unknown env id '{env_id}'{hint} (any registered gymnasium id works)")


def _register_project_envs() -> None:
    """Register the project's own gymnasium ids, and gymnasium-robotics' if it is installed."""
    import genrl_envs.maze  # noqa: F401  genrl/PointMaze-v0
    import genrl_envs.multigoal  # noqa: F401  genrl/MultiGoal-v0

    global _ROBOTICS_TRIED
    if not _ROBOTICS_TRIED:
        _ROBOTICS_TRIED = True
        try:  # optional extra `genrl[robotics]`: PointMaze_*, AntMaze_*, Fetch*, ...
            import contextlib
            import io

            with contextlib.redirect_stderr(io.StringIO()):  # its import prints a notice about Adroit tasks genrl does not use
                import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
            from genrl_envs.maze import register_robotics_maze

            register_robotics_maze()
        except ImportError:
            pass
        try:  # DeepMind Control Suite tasks dmc/HopperStand-v0, ... when dm_control imports (envs.dmc)
            from genrl_envs.dmc import register_dmc_envs

            register_dmc_envs()
        except ImportError:
            pass


_ROBOTICS_TRIED = False


def _register_ogbench() -> bool:
    """Import OGBench's manipulation suite (it registers its ids) if it is installed; only when an
    id is not found otherwise, since the import takes a second."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GLFW complains about a missing display; rendering uses EGL
            import ogbench.manipspace  # noqa: F401
    except ImportError:
        return False
    return True


def _make_flat(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make`` with Dict observations (goal-conditioned tasks) flattened to one Box."""
    try:
        env = gym.make(env_id, **kwargs)
    except (gym.error.Error, ImportError) as exc:  # missing extras (Box2D), ids moved out of gymnasium (mujoco -v2/-v3) ...
        raise EnvError(f"cannot create {env_id}: {str(exc).splitlines()[0]}") from None
    except TypeError as exc:
        raise EnvError(f"cannot create {env_id} with env_kwargs {kwargs}: {exc}") from None
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    return env


def _aligned(array: np.ndarray) -> Tensor:
    """A float32 copy of ``array`` in torch's own (64-byte aligned) memory.

    The policy's matrix products round differently when their input starts at another offset
    from a 64-byte boundary (MKL's kernels peel unaligned heads), and numpy's allocations land at
    offsets that depend on the process's history. Copying every observation into torch's
    allocator makes a policy's actions a function of the values alone, so a resumed run takes
    the same actions as the uninterrupted one. The copy also detaches from the vector env's
    reused buffer.
    """
    return torch.tensor(array, dtype=torch.float32)


class GymVectorEnv:
    """A vector of gymnasium envs behind the tensor API of ``envs.base.BatchedEnv``.

    Args:
        env_id: any registered gymnasium id with a flat Box observation and Box action space.
        n_envs: number of parallel copies.
        vectorization: "sync" (default; fastest on few cores) or "async" (subprocesses).
        normalize_obs / normalize_reward: running normalisation (with clipping at ±clip_*).
        gamma: discount used by the reward normaliser's return estimate.
        reward_scale: training rewards are multiplied by this after normalisation and clipping
            (Brax / GoRL's ``reward_scaling``; episode statistics stay raw).
        render_mode: e.g. "rgb_array" for video capture.
        chunking: {"horizon", "n_obs_steps", "n_action_steps"} to decide once per action chunk on
            stacked observations (``envs.chunking.ActionChunking`` around each sub-env).
        keep_info: keep the sub-envs' per-step info dicts (off by default: training never reads
            them, and merging them is a measurable share of the step time).
        obs_resolution: {dimension: step}, each sub-env's observation seen through this view
            (``envs.views``; before history stacking, so every stacked frame is viewed).
    """

    def __init__(
        self,
        env_id: str,
        n_envs: int = 1,
        *,
        vectorization: str = "sync",
        normalize_obs: bool = True,
        normalize_reward: bool = True,
        gamma: float = 0.99,
        clip_obs: float = 10.0,
        clip_reward: float = 10.0,
        reward_scale: float = 1.0,
        render_mode: str | None = None,
        keep_info: bool = False,
        env_kwargs: dict[str, Any] | None = None,
        chunking: dict[str, int] | None = None,
        obs_resolution: dict[Any, float] | None = None,
    ) -> None:
        check_env_id(env_id)
        if n_envs < 1:
            raise EnvError(f"n_envs must be >= 1, got {n_envs}")
        if vectorization not in ("sync", "async"):
            raise EnvError(f"vectorization must be 'sync' or 'async', got '{vectorization}'")
        kwargs = dict(env_kwargs or {})
        if render_mode is not None:
            kwargs["render_mode"] = render_mode

        self.obs_resolution = parse_resolution(obs_resolution)

        def flat() -> gym.Env:
            env = _make_flat(env_id, **kwargs)
            return ObservationResolution(env, self.obs_resolution) if self.obs_resolution else env

        chunks = {k: int(v) for k, v in (chunking or {}).items()}
        if chunks and any(v != 1 for v in chunks.values()):
            from genrl_envs.chunking import ActionChunking, check_chunking

            check_chunking(chunks.get("horizon", 1), chunks.get("n_obs_steps", 1), chunks.get("n_action_steps", 1))

            def make() -> gym.Env:
                return ActionChunking(flat(), horizon=chunks.get("horizon", 1),
                                      n_obs_steps=chunks.get("n_obs_steps", 1), n_action_steps=chunks.get("n_action_steps", 1))  # fmt: skip
        else:

            def make() -> gym.Env:
                return flat()

        def thunk() -> gym.Env:
            return _Snapshot(make(), keep_info)

        probe = make()
        obs_space, act_space = probe.observation_space, probe.action_space
        max_steps = probe.spec.max_episode_steps if probe.spec is not None else None
        probe.close()
        if not isinstance(act_space, gym.spaces.Box):
            raise EnvError(f"{env_id} has a {type(act_space).__name__} action space; genrl's control back end needs Box actions")
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise EnvError(f"{env_id} has observation space {obs_space}; a flat Box is required")

        cls = SyncVectorEnv if vectorization == "sync" else AsyncVectorEnv
        self._vec = cls([thunk] * n_envs, autoreset_mode=AutoresetMode.SAME_STEP, copy=False)
        env: gym.vector.VectorEnv = vw.RecordEpisodeStatistics(self._vec)
        self._stats = env
        self._obs_norm: NormalizeObservationSameStep | None = None
        if normalize_obs:
            env = self._obs_norm = NormalizeObservationSameStep(env, clip=clip_obs)
        self._rew_norm: NormalizeRewardSameStep | None = None
        if normalize_reward:
            env = self._rew_norm = NormalizeRewardSameStep(env, gamma=gamma)
        self._clip_reward = clip_reward if normalize_reward else None
        if not (np.isfinite(reward_scale) and reward_scale > 0):
            raise EnvError(f"reward_scale must be a finite number > 0, got {reward_scale}")
        self._reward_scale = float(reward_scale)
        self._env = env
        self.spec = EnvSpec(
            env_id=env_id,
            n_envs=n_envs,
            obs_dim=int(obs_space.shape[0]),
            action_dim=int(np.prod(act_space.shape)),
            action_low=np.asarray(act_space.low, dtype=np.float32),
            action_high=np.asarray(act_space.high, dtype=np.float32),
            max_episode_steps=max_steps,
        )
        self._low = torch.from_numpy(self.spec.action_low)
        self._high = torch.from_numpy(self.spec.action_high)

    # -- stepping -------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Tensor:
        """Reset every sub-env (sub-env i gets seed + i) and return obs (N, O)."""
        obs, _ = self._env.reset(seed=seed)
        return _aligned(obs)

    def step(self, action: Tensor) -> StepResult:
        if action.shape != (self.spec.n_envs, self.spec.action_dim):
            raise ValueError(f"action has shape {tuple(action.shape)}, expected ({self.spec.n_envs}, {self.spec.action_dim}) for {self.spec.env_id}")
        clipped = torch.maximum(torch.minimum(action.detach().cpu(), self._high), self._low)
        obs, reward, terminated, truncated, info = self._env.step(clipped.numpy())
        obs_t = _aligned(obs)
        final = obs_t
        returns: list[float] = []
        lengths: list[int] = []
        if "final_obs" in info:
            final = obs_t.clone()
            if "final_obs_normalized" in info:
                idx, values = info["final_obs_normalized"]
                final[idx] = torch.from_numpy(values)
            else:
                for i in np.flatnonzero(info["_final_obs"]):
                    final[i] = torch.from_numpy(np.asarray(info["final_obs"][i], dtype=np.float32))
        if "episode" in info:
            done = info["_episode"]
            returns = [float(r) for r in info["episode"]["r"][done]]
            lengths = [int(n) for n in info["episode"]["l"][done]]
        reward_t = torch.from_numpy(np.asarray(reward, dtype=np.float32))
        if self._clip_reward is not None:
            reward_t = reward_t.clamp_(-self._clip_reward, self._clip_reward)
        if self._reward_scale != 1.0:
            reward_t = reward_t.mul_(self._reward_scale)
        return StepResult(
            obs=obs_t,
            reward=reward_t,
            terminated=torch.from_numpy(np.asarray(terminated, dtype=bool)),
            truncated=torch.from_numpy(np.asarray(truncated, dtype=bool)),
            final_obs=final,
            episode_returns=returns,
            episode_lengths=lengths,
        )

    def render(self) -> np.ndarray | None:
        """The first sub-env's frame (rgb_array render mode only)."""
        frames = self._vec.render()
        return frames[0] if frames else None

    def close(self) -> None:
        self._env.close()

    # -- normaliser access ----------------------------------------------------------------------
    def obs_normalizer_state(self) -> dict[str, np.ndarray] | None:
        if self._obs_norm is None:
            return None
        rms = self._obs_norm.obs_rms
        return {"mean": rms.mean.copy(), "var": rms.var.copy(), "count": np.asarray(rms.count)}

    def set_obs_normalizer(self, state: dict[str, np.ndarray] | None, *, frozen: bool) -> None:
        """Copy observation statistics in (e.g. from the training env into an eval env)."""
        if self._obs_norm is None or state is None:
            return
        rms = self._obs_norm.obs_rms
        rms.mean, rms.var, rms.count = state["mean"].copy(), state["var"].copy(), float(state["count"])
        self._obs_norm.update_running_mean = not frozen

    def running_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """The running normalisers' statistics, {"obs" / "return": {"mean", "var", "count"}} (those
        this env keeps), float64 copies: what data-parallel training merges across processes."""
        out = {}
        for name, wrapper, attr in (("obs", self._obs_norm, "obs_rms"), ("return", self._rew_norm, "return_rms")):
            if wrapper is not None:
                rms = getattr(wrapper, attr)
                out[name] = {"mean": np.array(rms.mean, np.float64), "var": np.array(rms.var, np.float64), "count": np.asarray(float(rms.count))}
        return out

    def set_running_stats(self, stats: dict[str, dict[str, np.ndarray]]) -> None:
        """Overwrite the statistics ``running_stats`` returned (updating continues as before)."""
        for name, wrapper, attr in (("obs", self._obs_norm, "obs_rms"), ("return", self._rew_norm, "return_rms")):
            if wrapper is not None and name in stats:
                rms, s = getattr(wrapper, attr), stats[name]
                rms.mean, rms.var, rms.count = np.array(s["mean"], np.float64), np.array(s["var"], np.float64), float(s["count"])

    # -- exact resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that shapes the future of this env: {"arrays": {name: ndarray}, "meta": json}."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"subenvs": []}
        snaps = self._vec.get_attr("snapshot")
        for i, snap in enumerate(snaps):
            for k, v in snap["arrays"].items():
                arrays[f"env{i}.{k}"] = v
            meta["subenvs"].append(snap["meta"])
        arrays["stats.episode_returns"] = np.asarray(self._stats.episode_returns).copy()
        arrays["stats.episode_lengths"] = np.asarray(self._stats.episode_lengths).copy()
        if self._obs_norm is not None:
            for k, v in self.obs_normalizer_state().items():
                arrays[f"obs_rms.{k}"] = np.asarray(v)
        if self._rew_norm is not None:
            r = self._rew_norm
            arrays["ret_rms.mean"] = np.asarray(r.return_rms.mean)
            arrays["ret_rms.var"] = np.asarray(r.return_rms.var)
            arrays["ret_rms.count"] = np.asarray(r.return_rms.count)
            arrays["ret.accumulated"] = r.accumulated_reward.copy()
        return {"arrays": arrays, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        arrays, meta = state["arrays"], state["meta"]
        n = len(meta["subenvs"])
        if n != self.spec.n_envs:
            raise EnvError(f"saved env state has {n} sub-envs, this env has {self.spec.n_envs}")
        snaps = []
        for i, sub in enumerate(meta["subenvs"]):
            prefix = f"env{i}."
            sub_arrays = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            snaps.append({"arrays": sub_arrays, "meta": sub})
        self._vec.set_attr("snapshot", snaps)
        self._stats.episode_returns = arrays["stats.episode_returns"].copy()
        self._stats.episode_lengths = arrays["stats.episode_lengths"].copy()
        if self._obs_norm is not None:
            self.set_obs_normalizer(
                {k: arrays[f"obs_rms.{k}"] for k in ("mean", "var", "count")},
                frozen=not self._obs_norm.update_running_mean,
            )
        if self._rew_norm is not None:
            r = self._rew_norm
            r.return_rms.mean = arrays["ret_rms.mean"].copy()
            r.return_rms.var = arrays["ret_rms.var"].copy()
            r.return_rms.count = float(arrays["ret_rms.count"])
            r.accumulated_reward = arrays["ret.accumulated"].copy()

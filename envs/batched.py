"""Batched simulators behind the trainer's tensor API, with autoreset and normalisation in torch.

A back end implements ``BatchedSim``: N worlds on one device, stepped together with a (N, A)
action tensor, with its own time limit, and no normalisation or autoreset.
``TensorVectorEnv`` turns one into an ``envs.base.BatchedEnv``:

* actions clipped to the action box;
* SAME_STEP autoreset: worlds whose episode ended are reset within the same ``step`` call; the
  true last observation is ``final_obs`` (bootstrapping of truncated episodes), ``obs`` is the
  first observation of the next episode (gymnasium's ``AutoresetMode.SAME_STEP``, SB3's semantics);
* episode statistics (raw return and length of every episode that ended);
* running observation and reward normalisation, the maths of gymnasium's ``RunningMeanStd`` /
  ``NormalizeObservation`` / ``NormalizeReward`` (``envs.normalize``) in float64: the final
  observation is normalised with the statistics before this step's update, the reward by the std
  of the running discounted return. The bookkeeping runs where the sim's tensors live: in numpy
  for a CPU sim (a small numpy operation costs a quarter of a torch one, and a step does ~60 of
  them), in torch on an accelerator; the two give the same values (tested);
* ``state_dict`` / ``load_state_dict``: the sim's snapshot (when it has one), the normalisers and
  the episode accumulators, as numpy arrays (the checkpoint format of every back end).

Shapes: N worlds, O observation dim, A action dim.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from genrl_envs.base import EnvError, EnvSpec, StepResult
from genrl_envs.normalize import FastRunningMeanStd


class BatchedSim(Protocol):
    """A raw batched simulator: what a back end provides (see the module docstring)."""

    env_id: str
    n_envs: int
    obs_dim: int
    action_dim: int
    action_low: np.ndarray  # (A,) float32
    action_high: np.ndarray  # (A,) float32
    max_episode_steps: int | None
    device: torch.device
    has_snapshot: bool
    """``state_dict`` captures the worlds exactly (False: resuming restarts the episodes)."""

    def reset(self, seed: int) -> Tensor:
        """Reset every world (world i seeded from ``seed`` and i); obs (N, O) float32."""
        ...

    def reset_done(self, done: Tensor) -> Tensor:
        """Reset the worlds where ``done`` (N,) is true; obs (N, O) whose ``done`` rows are the new
        episodes' first observations (other rows: anything)."""
        ...

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Advance every world by one step with ``action`` (N, A), already inside the box:
        (obs (N, O) float32, reward (N,) float, terminated (N,) bool, truncated (N,) bool)."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """The worlds' exact state as numpy arrays ({} when ``has_snapshot`` is False)."""
        ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore ``state_dict()`` (only called when ``has_snapshot``)."""
        ...

    def close(self) -> None: ...


class AsyncBatchedSim(BatchedSim, Protocol):
    """A sim that can step in the background: ``step_async(action)`` returns at once, the
    caller works meanwhile, ``step_wait()`` returns what ``step`` would have."""

    def step_async(self, action: Tensor) -> None: ...

    def step_wait(self) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


class TorchRunningMeanStd:
    """gymnasium's ``RunningMeanStd`` (parallel-variance update, count starting at 1e-4) on a
    device, float64."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, epsilon: float = 1e-4) -> None:
        self.mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self.var = torch.ones(shape, dtype=torch.float64, device=device)
        self.count = torch.tensor(epsilon, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> None:
        """Fold in a batch ``x`` (B, *shape)."""
        x = x.to(torch.float64)
        n = x.shape[0]
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False) if n > 1 else torch.zeros_like(batch_mean)
        delta = batch_mean - self.mean
        tot = self.count + n
        self.mean = self.mean + delta * n / tot
        m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / tot
        self.var = m2 / tot
        self.count = tot

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.cpu().numpy().copy(), "var": self.var.cpu().numpy().copy(), "count": self.count.cpu().numpy().copy()}

    def load(self, state: dict[str, Any]) -> None:
        dev = self.mean.device
        self.mean = torch.as_tensor(np.asarray(state["mean"], dtype=np.float64), device=dev).clone()
        self.var = torch.as_tensor(np.asarray(state["var"], dtype=np.float64), device=dev).clone()
        self.count = torch.as_tensor(np.asarray(state["count"], dtype=np.float64), device=dev).clone()


class NumpyRunningMeanStd(FastRunningMeanStd):
    """The CPU twin of ``TorchRunningMeanStd``: gymnasium's ``RunningMeanStd`` (the gymnasium
    back end's own, ``envs.normalize``) with the same ``state`` / ``load`` API."""

    def __init__(self, shape: tuple[int, ...], epsilon: float = 1e-4) -> None:
        super().__init__(epsilon=epsilon, shape=shape)

    def state(self) -> dict[str, np.ndarray]:
        return {"mean": np.array(self.mean, np.float64), "var": np.array(self.var, np.float64), "count": np.asarray(float(self.count), np.float64)}

    def load(self, state: dict[str, Any]) -> None:
        self.mean = np.array(state["mean"], np.float64).reshape(self.mean.shape)
        self.var = np.array(state["var"], np.float64).reshape(self.var.shape)
        self.count = float(np.asarray(state["count"]))


class TensorVectorEnv:
    """A ``BatchedSim`` as an ``envs.base.BatchedEnv`` (see the module docstring).

    Args mirror ``envs.gym.GymVectorEnv``: normalize_obs / normalize_reward (running, clipped at
    +-clip_*), gamma (the reward normaliser's discount), reward_scale (after normalisation);
    asynchronous: use the sim's ``step_async`` / ``step_wait`` when it has them.
    """

    def __init__(
        self,
        sim: BatchedSim,
        *,
        backend: str,
        normalize_obs: bool = True,
        normalize_reward: bool = True,
        gamma: float = 0.99,
        clip_obs: float = 10.0,
        clip_reward: float = 10.0,
        reward_scale: float = 1.0,
        epsilon: float = 1e-8,
        asynchronous: bool = True,
    ) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise EnvError(f"reward normalisation gamma must be in [0, 1], got {gamma}")
        if not (np.isfinite(reward_scale) and reward_scale > 0):
            raise EnvError(f"reward_scale must be a finite number > 0, got {reward_scale}")
        self.sim, self.backend = sim, backend
        self._async = bool(asynchronous) and hasattr(sim, "step_async")
        dev = self.device = torch.device(sim.device)
        n = sim.n_envs
        self.spec = EnvSpec(
            env_id=sim.env_id, n_envs=n, obs_dim=sim.obs_dim, action_dim=sim.action_dim,
            action_low=np.asarray(sim.action_low, dtype=np.float32), action_high=np.asarray(sim.action_high, dtype=np.float32),
            max_episode_steps=sim.max_episode_steps, backend=backend,
        )  # fmt: skip
        self._low = torch.as_tensor(self.spec.action_low, device=dev)
        self._high = torch.as_tensor(self.spec.action_high, device=dev)
        # On CPU the per-step bookkeeping runs in numpy (a small array op costs a quarter of a
        # torch op, and an 8-world step does ~60 of them); on an accelerator it stays in torch.
        self._cpu = dev.type == "cpu"
        rms: Any = NumpyRunningMeanStd if self._cpu else (lambda shape: TorchRunningMeanStd(shape, dev))
        self.obs_rms = rms((sim.obs_dim,)) if normalize_obs else None
        self.ret_rms = rms(()) if normalize_reward else None
        self.update_obs_stats = True
        self.clip_obs, self.clip_reward, self.gamma, self.epsilon = float(clip_obs), float(clip_reward), float(gamma), epsilon
        self.reward_scale = float(reward_scale)
        self.ep_return: Any = self._zeros(n, torch.float64)
        self.ep_length: Any = self._zeros(n, torch.long)
        self.ret_acc: Any = self._zeros(n, torch.float64)
        self.steps = 0
        """``step`` calls since the last ``reset`` (restart seeds of snapshot-less sims derive from it)."""
        self.seed = 0
        self.restarted_obs: Tensor | None = None
        """After ``load_state_dict`` of a sim without snapshots: the restarted episodes' first
        observations (the algorithm continues from these, not from its saved ones)."""
        self.resume_note: str | None = None
        self._pending: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def _zeros(self, n: int, dtype: torch.dtype) -> Any:
        """A state vector: numpy on CPU, a tensor on the sim's device otherwise."""
        if self._cpu:
            return np.zeros(n, dtype={torch.float64: np.float64, torch.long: np.int64}[dtype])
        return torch.zeros(n, dtype=dtype, device=self.device)

    def _state_array(self, array: Any) -> Any:
        """A saved state vector in this env's representation (a copy)."""
        if self._cpu:
            return np.array(array)
        return torch.as_tensor(np.asarray(array), device=self.device).clone()

    # -- normalisation --------------------------------------------------------------------------
    def _normalize_np(self, obs: np.ndarray) -> np.ndarray:
        rms = self.obs_rms
        assert rms is not None
        out = (obs.astype(np.float64) - rms.mean) / np.sqrt(rms.var + self.epsilon)
        return np.clip(out, -self.clip_obs, self.clip_obs).astype(np.float32)

    def _normalize(self, obs: Tensor) -> Tensor:
        if self._cpu:
            return torch.tensor(self._normalize_np(obs.numpy()))
        rms = self.obs_rms
        assert rms is not None
        out = (obs.to(torch.float64) - rms.mean) / torch.sqrt(rms.var + self.epsilon)
        return out.clamp(-self.clip_obs, self.clip_obs).to(torch.float32)

    def _observe(self, obs: Tensor) -> Tensor:
        if self.obs_rms is None:
            return obs
        if self.update_obs_stats:
            self.obs_rms.update(obs.numpy() if self._cpu else obs)
        return self._normalize(obs)

    # -- stepping -------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Tensor:
        """Reset every world (world i from seed + i) and return obs (N, O)."""
        self.seed, self.steps = (0 if seed is None else int(seed)), 0
        obs = self.sim.reset(self.seed)
        self.ep_return[:] = 0
        self.ep_length[:] = 0
        self.ret_acc[:] = 0
        return self._observe(obs)

    def step(self, action: Tensor) -> StepResult:
        """Step every world with ``action`` (N, A), clipped to the box; SAME_STEP autoreset."""
        return self._finish(*self.sim.step(self._check_action(action)))

    @property
    def can_step_async(self) -> bool:
        """The sim steps in the background (``step_async`` / ``step_wait``): it has them and
        ``asynchronous`` was not turned off."""
        return self._async

    def step_async(self, action: Tensor) -> None:
        """Start a step and return at once (the sim works in its own threads); ``step_wait``
        returns its result. Without an asynchronous sim, the step runs here."""
        action = self._check_action(action)
        if self.can_step_async:
            self.sim.step_async(action)  # type: ignore[attr-defined]
        else:
            self._pending = self.sim.step(action)

    def step_wait(self) -> StepResult:
        if self.can_step_async:
            return self._finish(*self.sim.step_wait())  # type: ignore[attr-defined]
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("step_wait() without step_async()")
        return self._finish(*pending)

    def _check_action(self, action: Tensor) -> Tensor:
        n, a = self.spec.n_envs, self.spec.action_dim
        if tuple(action.shape) != (n, a):
            raise ValueError(f"action has shape {tuple(action.shape)}, expected ({n}, {a}) for {self.spec.env_id}")
        if self._cpu:
            a32 = action.detach().to("cpu", torch.float32).numpy()
            if not np.isfinite(a32).all():
                raise ValueError(f"action for {self.spec.env_id} contains NaN or inf")
            return torch.from_numpy(np.maximum(np.minimum(a32, self.spec.action_high), self.spec.action_low))
        action = action.detach().to(self.device, torch.float32)
        if not bool(torch.isfinite(action).all()):
            raise ValueError(f"action for {self.spec.env_id} contains NaN or inf")
        return torch.maximum(torch.minimum(action, self._high), self._low)

    def _finish(self, obs: Tensor, reward: Tensor, terminated: Tensor, truncated: Tensor) -> StepResult:
        if self._cpu:
            return self._finish_np(obs, reward, terminated, truncated)
        self.steps += 1
        truncated = truncated & ~terminated
        done = terminated | truncated
        reward64 = reward.to(torch.float64)
        self.ep_return += reward64
        self.ep_length += 1
        returns: list[float] = []
        lengths: list[int] = []
        any_done = bool(done.any())
        final = obs
        if any_done:
            returns = self.ep_return[done].tolist()
            lengths = self.ep_length[done].tolist()
            self.ep_return.masked_fill_(done, 0.0)
            self.ep_length.masked_fill_(done, 0)
            final = obs.clone()
            obs = torch.where(done[:, None], self.sim.reset_done(done), obs)
        if self.obs_rms is not None:
            final_n = self._normalize(final) if any_done else None  # this step's statistics are not in yet
            obs = self._observe(obs)
            final = obs if final_n is None else torch.where(done[:, None], final_n, obs)
        if self.ret_rms is not None:
            acc = self.ret_acc * self.gamma * (~terminated).to(torch.float64) + reward64
            self.ret_rms.update(acc)
            self.ret_acc = acc.masked_fill(done, 0.0)
            reward64 = (reward64 / torch.sqrt(self.ret_rms.var + self.epsilon)).clamp(-self.clip_reward, self.clip_reward)
        out_reward = reward64.to(torch.float32)
        if self.reward_scale != 1.0:
            out_reward = out_reward * self.reward_scale
        return StepResult(
            obs=obs, reward=out_reward, terminated=terminated, truncated=truncated, final_obs=final,
            episode_returns=returns, episode_lengths=lengths,
        )  # fmt: skip

    def _finish_np(self, obs_t: Tensor, reward_t: Tensor, terminated_t: Tensor, truncated_t: Tensor) -> StepResult:
        """``_finish`` in numpy (CPU sims): the same operations in the same order."""
        self.steps += 1
        terminated = terminated_t.numpy()
        truncated = truncated_t.numpy() & ~terminated
        done = terminated | truncated
        reward64 = reward_t.numpy().astype(np.float64)
        self.ep_return += reward64
        self.ep_length += 1
        returns: list[float] = []
        lengths: list[int] = []
        any_done = bool(done.any())
        obs = raw = obs_t.numpy()
        final = obs
        if any_done:
            returns = self.ep_return[done].tolist()
            lengths = self.ep_length[done].tolist()
            self.ep_return[done] = 0.0
            self.ep_length[done] = 0
            obs = np.where(done[:, None], self.sim.reset_done(torch.from_numpy(done)).numpy(), obs)
        if self.obs_rms is not None:
            final_n = self._normalize_np(final) if any_done else None  # this step's statistics are not in yet
            if self.update_obs_stats:
                self.obs_rms.update(obs)
            obs = self._normalize_np(obs)
            final = obs if final_n is None else np.where(done[:, None], final_n, obs)
        if self.ret_rms is not None:
            acc = self.ret_acc * self.gamma * ~terminated + reward64
            self.ret_rms.update(acc)
            acc[done] = 0.0
            self.ret_acc = acc
            reward64 = np.clip(reward64 / np.sqrt(self.ret_rms.var + self.epsilon), -self.clip_reward, self.clip_reward)
        out_reward = reward64.astype(np.float32)
        if self.reward_scale != 1.0:
            out_reward = out_reward * np.float32(self.reward_scale)
        obs_out = obs_t if obs is raw else torch.tensor(obs)  # new values go to torch's allocator (envs.gym._aligned)
        return StepResult(
            obs=obs_out, reward=torch.from_numpy(out_reward), terminated=torch.from_numpy(terminated), truncated=torch.from_numpy(truncated),
            final_obs=obs_out if final is obs else torch.tensor(final), episode_returns=returns, episode_lengths=lengths,
        )  # fmt: skip

    def close(self) -> None:
        self.sim.close()

    # -- normaliser access ----------------------------------------------------------------------
    def obs_normalizer_state(self) -> dict[str, np.ndarray] | None:
        return None if self.obs_rms is None else self.obs_rms.state()

    def set_obs_normalizer(self, state: dict[str, np.ndarray] | None, *, frozen: bool) -> None:
        """Copy observation statistics in (e.g. from the training env into an eval env)."""
        if self.obs_rms is None or state is None:
            return
        self.obs_rms.load(state)
        self.update_obs_stats = not frozen

    def running_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """The running normalisers' statistics, {"obs" / "return": {"mean", "var", "count"}} (those
        this env keeps), float64 copies: what data-parallel training merges across processes."""
        return {name: rms.state() for name, rms in (("obs", self.obs_rms), ("return", self.ret_rms)) if rms is not None}

    def set_running_stats(self, stats: dict[str, dict[str, np.ndarray]]) -> None:
        """Overwrite the statistics ``running_stats`` returned (updating continues as before)."""
        for name, rms in (("obs", self.obs_rms), ("return", self.ret_rms)):
            if rms is not None and name in stats:
                rms.load(stats[name])

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"arrays": {name: ndarray}, "meta": json}: sim snapshot, normalisers, accumulators."""
        arrays = {f"sim.{k}": v for k, v in self.sim.state_dict().items()}
        arrays["stats.episode_returns"] = _numpy(self.ep_return)
        arrays["stats.episode_lengths"] = _numpy(self.ep_length)
        if self.obs_rms is not None:
            arrays.update({f"obs_rms.{k}": v for k, v in self.obs_rms.state().items()})
        if self.ret_rms is not None:
            arrays.update({f"ret_rms.{k}": v for k, v in self.ret_rms.state().items()})
            arrays["ret.accumulated"] = _numpy(self.ret_acc)
        meta = {"backend": self.backend, "n_envs": self.spec.n_envs, "has_snapshot": bool(self.sim.has_snapshot), "seed": self.seed, "steps": self.steps}
        return {"arrays": arrays, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        arrays, meta = state["arrays"], state["meta"]
        if meta.get("backend") != self.backend:
            raise EnvError(f"saved env state is from the '{meta.get('backend')}' back end, this env is '{self.backend}'")
        if meta.get("n_envs") != self.spec.n_envs:
            raise EnvError(f"saved env state has {meta.get('n_envs')} envs, this env has {self.spec.n_envs}")
        self.seed, self.steps = int(meta.get("seed", 0)), int(meta.get("steps", 0))
        if self.obs_rms is not None:
            self.obs_rms.load({k: arrays[f"obs_rms.{k}"] for k in ("mean", "var", "count")})
        if self.ret_rms is not None:
            self.ret_rms.load({k: arrays[f"ret_rms.{k}"] for k in ("mean", "var", "count")})
            self.ret_acc = self._state_array(arrays["ret.accumulated"])
        if self.sim.has_snapshot:
            self.sim.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("sim.")})
            self.ep_return = self._state_array(arrays["stats.episode_returns"])
            self.ep_length = self._state_array(arrays["stats.episode_lengths"])
            self.restarted_obs, self.resume_note = None, None
            return
        # no snapshot: every episode restarts, from seeds derived from the run's seed and step count
        obs = self.sim.reset(self.seed + 1_000_003 * (self.steps + 1))
        self.ep_return[:] = 0
        self.ep_length[:] = 0
        self.ret_acc[:] = 0
        self.restarted_obs = self._normalize(obs) if self.obs_rms is not None else obs
        self.resume_note = (
            f"the {self.backend} back end has no state snapshot: resuming restored the RNGs, the normalisers and the step "
            "count, and every episode restarts (the run is not bitwise the uninterrupted one)"
        )


def _numpy(x: Any) -> np.ndarray:
    """A numpy copy of a state vector (numpy or tensor)."""
    return np.array(x) if isinstance(x, np.ndarray) else x.cpu().numpy().copy()


__all__ = ["BatchedSim", "NumpyRunningMeanStd", "TensorVectorEnv", "TorchRunningMeanStd"]

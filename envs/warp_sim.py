"""MuJoCo Warp back end: N worlds of one MJCF model stepped together on a GPU (or Warp's CPU device).

``WarpSim`` implements ``envs.batched.BatchedSim`` on ``mujoco_warp``; ``make_warp_env`` wraps it in
``envs.batched.TensorVectorEnv`` (backend name "warp"). Shapes: N worlds, O observation dim,
A action dim.

* State is shared with torch without copies: ``sim.qpos`` (N, nq), ``sim.qvel``, ``sim.ctrl``,
  ``sim.xpos`` (N, nbody, 3), ``sim.cfrc_ext`` (N, nbody, 6), ... are ``wp.to_torch`` views of
  the Warp arrays; an action is written into ``ctrl`` through its view.
* A step runs ``frame_skip`` ``mjw.step`` calls (then ``mjw.rne_postconstraint`` when the task reads
  contact forces, as gymnasium's ``MujocoEnv`` does). With ``graph=True`` (the default) the step,
  the per-world reset and the forward pass are each captured once as a Warp graph and replayed.
  On CUDA: captured on a private stream (capture is impossible on the legacy default stream torch
  usually runs on) and launched on torch's current stream (``wp.stream_from_torch``), so torch and
  Warp work stay ordered without synchronisation; plain calls run on that stream too. On the CPU:
  Warp's recorded-launch replay, same results as plain calls at a small fraction of their Python
  launch overhead.
* Per-world reset (``reset_done``): ``mjw.reset_data`` with the done mask (MuJoCo's
  ``mj_resetData`` for those worlds: time, act, ctrl, warm start ... cleared), qpos / qvel set to the
  task's initial state plus noise with torch ops on the views (only the done rows change), then
  ``mjw.forward`` for derived quantities. ``forward`` runs on every world but writes none of a
  world's persistent state (qpos, qvel, act, time, ``qacc_warmstart``): the other worlds'
  trajectories are unchanged bitwise.
* Reset noise comes from one ``torch.Generator`` on the device, seeded by ``reset(seed)``; every
  reset draws noise for all N worlds (no host synchronisation) and keeps the done rows.
* ``state_dict`` holds qpos, qvel, act, ``qacc_warmstart``, time, the episode step counters, the
  task's cached pre-step quantity and the generator state, so a resume continues exactly.

Tasks: ``WARP_TASKS`` holds gymnasium's Hopper-v5, HalfCheetah-v5, Walker2d-v5 and Ant-v5 on
gymnasium's own XMLs, with observations, rewards, termination and reset noise computed in torch
as gymnasium v5 defines them (default arguments). Any MJCF model runs with a ``WarpTask`` of its own.
mujoco_warp computes in float32, C MuJoCo in float64: trajectories agree with gymnasium's to
float32 rounding, amplified by the dynamics over an episode. One difference is mujoco_warp's own:
for a capsule touching a plane at less than 30 degrees from the normal it takes a fixed contact
tangent frame where C MuJoCo aligns it with the capsule, which rotates the pyramidal friction
cone; Ant's steep shins hit this, so Warp's Ant is a (valid) different simulation from
gymnasium's once its feet touch the ground (the planar models are unaffected).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genrl_envs.base import EnvError
from genrl_envs.batched import TensorVectorEnv
from genrl_envs.warp_tasks import WARP_TASKS, LocomotionTask, WarpTask, warp_task

MUJOCO_WARP_PIN = "mujoco-warp==3.17.0"


def _import_warp() -> tuple[Any, Any]:
    """``(warp, mujoco_warp)``, or EnvError saying how to install them."""
    try:
        import warp as wp

        if wp.config.log_level == wp.LOG_INFO:  # Warp's default logs a line per compiled module
            wp.config.log_level = wp.LOG_WARNING
        import mujoco_warp as mjw

        wp.init()
    except ImportError as exc:
        raise EnvError(f"the warp back end needs mujoco_warp ({exc}): pip install {MUJOCO_WARP_PIN}") from None
    return wp, mjw


def _torch_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvError(f"device '{device}' requested for the warp back end, but torch sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        raise EnvError(f"the warp back end runs on 'cuda' or 'cpu', got device '{device}'")
    return dev


class WarpSim:
    """N worlds of ``task``'s model on ``device`` (see the module docstring).

    Args:
        task: a ``WarpTask`` (e.g. ``warp_task("Hopper-v5")``).
        n_envs: number of worlds N.
        device: "cuda", "cuda:k" or "cpu" (None: CUDA when torch sees it).
        graph: replay captured graphs (False: plain ``mjw`` calls every time; same results).
        nconmax / njmax: mujoco_warp's per-world contact and constraint capacities (None: its defaults).
        edit_model: called on the compiled ``mujoco.MjModel`` before mujoco_warp takes it (e.g. to
            change an option of ``model.opt``).
    """

    has_snapshot = True

    def __init__(
        self,
        task: WarpTask,
        n_envs: int,
        *,
        device: str | torch.device | None = None,
        graph: bool = True,
        nconmax: int | None = None,
        njmax: int | None = None,
        edit_model: Callable[[Any], None] | None = None,
    ) -> None:
        if n_envs < 1:
            raise EnvError(f"n_envs must be >= 1, got {n_envs}")
        self.device = _torch_device(device)
        wp, mjw = _import_warp()
        import mujoco

        self._wp, self._mjw, self.task = wp, mjw, task
        self.env_id, self.n_envs = task.env_id, n_envs
        self.max_episode_steps = task.max_episode_steps
        self._cuda = self.device.type == "cuda"
        try:
            self._wdev = wp.device_from_torch(self.device)
        except RuntimeError as exc:
            raise EnvError(f"Warp cannot use torch device '{self.device}': {exc}") from None
        self._wp_stream: Any = None
        self._wp_stream_ptr = 0

        try:
            mjm = mujoco.MjModel.from_xml_path(task.xml_path)
        except (ValueError, OSError) as exc:
            raise EnvError(f"cannot load {task.xml_path}: {str(exc).splitlines()[0]}") from None
        if edit_model is not None:
            edit_model(mjm)
        self.mj_model = mjm
        self.nq, self.nv, self.nu, self.na = mjm.nq, mjm.nv, mjm.nu, mjm.na
        self.dt = float(mjm.opt.timestep) * task.frame_skip
        with wp.ScopedDevice(self._wdev):
            try:
                self.model = mjw.put_model(mjm)
                self.data = mjw.make_data(mjm, nworld=n_envs, nconmax=nconmax, njmax=njmax)
            except (NotImplementedError, ValueError) as exc:
                raise EnvError(f"mujoco_warp cannot simulate {os.path.basename(task.xml_path)} ({task.env_id}): {str(exc).splitlines()[0]}") from None
            if self._cuda:  # put_model / make_data ran on Warp's own stream; torch reads the arrays next
                wp.synchronize_device(self._wdev)

        d = self.data
        self.qpos, self.qvel, self.ctrl = wp.to_torch(d.qpos), wp.to_torch(d.qvel), wp.to_torch(d.ctrl)
        self.act = wp.to_torch(d.act) if self.na else None
        self.time, self.qacc_warmstart = wp.to_torch(d.time), wp.to_torch(d.qacc_warmstart)
        self.xpos, self.cfrc_ext = wp.to_torch(d.xpos), wp.to_torch(d.cfrc_ext)
        self.init_qpos = torch.as_tensor(mjm.qpos0, dtype=self.qpos.dtype, device=self.device)
        self.init_qvel = torch.zeros(self.nv, dtype=self.qvel.dtype, device=self.device)

        self.action_dim = self.nu
        bounds = mjm.actuator_ctrlrange.astype(np.float32)  # gymnasium's action box
        self.action_low, self.action_high = bounds[:, 0].copy(), bounds[:, 1].copy()

        self._mask = torch.ones(n_envs, dtype=torch.bool, device=self.device)
        self._mask_wp = wp.from_torch(self._mask)
        self._elapsed = torch.zeros(n_envs, dtype=torch.long, device=self.device)
        self._gen = torch.Generator(device=self.device)
        self._ops: dict[str, Callable[[], None]] = {
            "reset": lambda: mjw.reset_data(self.model, self.data, reset=self._mask_wp),
            "forward": lambda: mjw.forward(self.model, self.data),
            "step": self._physics_step,
        }
        self._graphs: dict[str, Any] = {}
        for op in self._ops.values():  # first calls compile / load the kernels, outside any capture
            with self._scope():
                op()
        if graph:
            # CUDA graphs cannot be captured on the legacy default stream torch usually runs on: capture on
            # a private stream, replay on torch's current stream (graphs are not tied to a stream)
            capture_stream = wp.Stream(self._wdev) if self._cuda else None
            if self._cuda:
                wp.synchronize_device(self._wdev)
            for name, op in self._ops.items():
                try:
                    with self._scope(capture_stream), wp.ScopedCapture(device=self._wdev, stream=capture_stream) as capture:
                        op()
                except RuntimeError as exc:  # e.g. a CUDA driver without conditional graph nodes
                    raise EnvError(f"capturing the {name} graph on {self._wdev} failed ({str(exc).splitlines()[0]}); graph=False steps without graphs") from None
                self._graphs[name] = capture.graph
        self._probe = task.probe(self).clone()
        self.obs_dim = int(self.reset(0).shape[1])

    # -- warp plumbing --------------------------------------------------------------------------
    def _stream(self) -> Any:
        """Warp's handle on torch's current CUDA stream (None on the CPU)."""
        if not self._cuda:
            return None
        ts = torch.cuda.current_stream(self.device)
        if self._wp_stream is None or self._wp_stream_ptr != ts.cuda_stream:
            self._wp_stream, self._wp_stream_ptr = self._wp.stream_from_torch(ts), ts.cuda_stream
        return self._wp_stream

    @contextlib.contextmanager
    def _scope(self, stream: Any = None) -> Iterator[None]:
        """Warp calls on this sim's device; on CUDA, on ``stream`` (default: torch's current stream)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._wp.ScopedDevice(self._wdev))
            if self._cuda:
                stack.enter_context(self._wp.ScopedStream(stream if stream is not None else self._stream()))
            yield

    def _physics_step(self) -> None:
        for _ in range(self.task.frame_skip):
            self._mjw.step(self.model, self.data)
        if self.task.needs_contact_forces:
            self._mjw.rne_postconstraint(self.model, self.data)

    def _run(self, name: str) -> None:
        graph = self._graphs.get(name)
        if graph is not None:
            self._wp.capture_launch(graph, stream=self._stream())
        else:
            with self._scope():
                self._ops[name]()

    def _reset_masked(self) -> None:
        """Start new episodes in the worlds flagged in ``self._mask``."""
        self._run("reset")
        qpos, qvel = self.task.initial_state(self, self._gen)
        m = self._mask[:, None]
        self.qpos.copy_(torch.where(m, qpos, self.qpos))
        self.qvel.copy_(torch.where(m, qvel, self.qvel))
        self._run("forward")
        self._probe.copy_(torch.where(m, self.task.probe(self), self._probe))
        self._elapsed.masked_fill_(self._mask, 0)

    # -- BatchedSim -----------------------------------------------------------------------------
    def reset(self, seed: int) -> Tensor:
        """Reset every world; the noise generator is seeded with ``seed`` (world i: row i of each draw)."""
        self._gen.manual_seed(int(seed))
        self._mask.fill_(True)
        self._reset_masked()
        return self.task.observe(self, first=True)

    def reset_done(self, done: Tensor) -> Tensor:
        self._mask.copy_(done)
        self._reset_masked()
        return self.task.observe(self, first=True)

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self.ctrl.copy_(action)
        self._run("step")
        obs = self.task.observe(self, first=False)
        reward, terminated = self.task.reward(self, self._probe, action)
        self._probe.copy_(self.task.probe(self))
        self._elapsed += 1
        if self.max_episode_steps is None:
            truncated = torch.zeros_like(terminated)
        else:
            truncated = self._elapsed >= self.max_episode_steps
        return obs, reward, terminated, truncated

    def _state_views(self) -> dict[str, Tensor]:
        views = {"qpos": self.qpos, "qvel": self.qvel, "qacc_warmstart": self.qacc_warmstart, "time": self.time}
        if self.act is not None:
            views["act"] = self.act
        return views | {"elapsed": self._elapsed, "probe": self._probe}

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {k: v.detach().cpu().numpy().copy() for k, v in self._state_views().items()}
        out["rng"] = self._gen.get_state().numpy().copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        views = self._state_views()
        missing = sorted((set(views) | {"rng"}) - set(state))
        if missing:
            raise EnvError(f"warp sim state lacks {', '.join(missing)}")
        for name, view in views.items():
            value = np.asarray(state[name])
            if value.shape != tuple(view.shape):
                raise EnvError(f"warp sim state '{name}' has shape {value.shape}, this sim needs {tuple(view.shape)}")
            view.copy_(torch.as_tensor(value, device=self.device))
        self._gen.set_state(torch.as_tensor(np.asarray(state["rng"], dtype=np.uint8)))
        self._run("forward")  # derived quantities of the restored state (no persistent state changes)

    def close(self) -> None:
        self._graphs.clear()


def compare_with_gymnasium(sim: WarpSim, steps: int, *, resync: bool, edit: Callable[[Any], None] | None = None) -> tuple[float, float, int, int]:
    """Step ``sim`` and one gymnasium (C MuJoCo) env per world with the same random actions.

    Every world starts from gymnasium's reset state copied into it; ``resync`` copies the Warp
    state into gymnasium before every step (for tasks whose dynamics amplify float32 rounding);
    ``edit`` changes gymnasium's models as ``WarpSim(edit_model=...)`` changed the Warp one.
    Returns (max |obs error|, max |reward error|, terminations, steps where a world's termination
    differs).
    """
    import gymnasium as gym

    envs = [gym.make(sim.env_id) for _ in range(sim.n_envs)]
    raw: list[Any] = [env.unwrapped for env in envs]  # gymnasium's MujocoEnv
    if edit is not None:
        for u in raw:
            edit(u.model)

    def start(i: int) -> None:  # gymnasium's reset (mj_resetData), then the Warp world's initial state
        envs[i].reset(seed=i)
        raw[i].set_state(sim.qpos[i].double().cpu().numpy(), sim.qvel[i].double().cpu().numpy())

    sim.reset(1)
    for i in range(sim.n_envs):
        start(i)
    gen = torch.Generator().manual_seed(0)
    obs_err = rew_err = 0.0
    terminations = mismatched = 0
    for _ in range(steps):
        action = torch.rand(sim.n_envs, sim.action_dim, generator=gen) * 2 - 1
        if resync:
            for i, u in enumerate(raw):
                data = u.data
                data.qpos[:], data.qvel[:] = sim.qpos[i].cpu().numpy(), sim.qvel[i].cpu().numpy()
                data.qacc_warmstart[:] = sim.qacc_warmstart[i].cpu().numpy()
        obs, reward, terminated, _ = (t.cpu() for t in sim.step(action.to(sim.device)))
        for i, env in enumerate(envs):
            g_obs, g_reward, g_terminated, _, _ = env.step(action[i].double().numpy())
            obs_err = max(obs_err, float(np.abs(g_obs - obs[i].numpy()).max()))
            rew_err = max(rew_err, abs(float(g_reward) - float(reward[i])))
            mismatched += int(g_terminated != bool(terminated[i]))
        if terminated.any():
            terminations += int(terminated.sum())
            sim.reset_done(terminated.to(sim.device))
            for world in torch.nonzero(terminated).flatten().tolist():
                start(world)
    for env in envs:
        env.close()
    return obs_err, rew_err, terminations, mismatched


def make_warp_env(
    env_id: str,
    n_envs: int,
    *,
    device: str | torch.device | None = None,
    graph: bool = True,
    nconmax: int | None = None,
    njmax: int | None = None,
    **wrapper_kwargs: Any,
) -> TensorVectorEnv:
    """``env_id`` (one of ``WARP_TASKS``) as N mujoco_warp worlds behind ``TensorVectorEnv``.

    ``device``, ``graph``, ``nconmax``, ``njmax`` go to ``WarpSim``; ``wrapper_kwargs``
    (normalize_obs, normalize_reward, gamma, ...) to ``TensorVectorEnv``.
    """
    task = warp_task(env_id)
    sim = WarpSim(task, n_envs, device=device, graph=graph, nconmax=nconmax, njmax=njmax)
    return TensorVectorEnv(sim, backend="warp", **wrapper_kwargs)


__all__ = ["WARP_TASKS", "LocomotionTask", "WarpSim", "WarpTask", "compare_with_gymnasium", "make_warp_env", "warp_task"]

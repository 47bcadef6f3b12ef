"""Tasks of the MuJoCo Warp back end (``envs.warp_sim``): gymnasium's Hopper-v5, HalfCheetah-v5,
Walker2d-v5 and Ant-v5 on gymnasium's own XMLs, with observations, rewards, termination and reset
noise computed in torch as gymnasium v5 defines them (default arguments). Any MJCF model runs with
a ``WarpTask`` of its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor

from genrl_envs.base import EnvError

if TYPE_CHECKING:
    from genrl_envs.warp_sim import WarpSim


class WarpTask(Protocol):
    """What a task adds to an MJCF model; ``sim`` is the ``WarpSim`` running it."""

    @property
    def env_id(self) -> str: ...

    @property
    def xml_path(self) -> str: ...

    @property
    def frame_skip(self) -> int: ...

    @property
    def max_episode_steps(self) -> int | None: ...

    @property
    def needs_contact_forces(self) -> bool:
        """Run ``mjw.rne_postconstraint`` after the steps (``cfrc_ext`` valid)."""
        ...

    def initial_state(self, sim: WarpSim, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """qpos (N, nq) and qvel (N, nv) of new episodes, for every world (noise drawn from ``gen``)."""
        ...

    def probe(self, sim: WarpSim) -> Tensor:
        """(N, k): the quantity the reward compares before and after a step (e.g. torso position)."""
        ...

    def observe(self, sim: WarpSim, *, first: bool) -> Tensor:
        """obs (N, O) float32 of the current state; ``first``: right after a reset."""
        ...

    def reward(self, sim: WarpSim, before: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """(reward (N,), terminated (N,) bool) after a step; ``before`` is ``probe`` before it."""
        ...


def _hopper_healthy(qpos: Tensor, qvel: Tensor) -> Tensor:
    state = torch.cat((qpos, qvel), 1)[:, 2:]
    z, angle = qpos[:, 1], qpos[:, 2]
    healthy_state = ((state > -100.0) & (state < 100.0)).all(1)
    return healthy_state & (z > 0.7) & (z < float("inf")) & (angle > -0.2) & (angle < 0.2)


def _walker_healthy(qpos: Tensor, qvel: Tensor) -> Tensor:
    z, angle = qpos[:, 1], qpos[:, 2]
    return (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)


def _ant_healthy(qpos: Tensor, qvel: Tensor) -> Tensor:
    finite = torch.isfinite(torch.cat((qpos, qvel), 1)).all(1)
    z = qpos[:, 2]
    return finite & (z >= 0.2) & (z <= 1.0)


@dataclass(frozen=True)
class LocomotionTask:
    """A gymnasium v5 locomotion task (``<Name>Env.step`` / ``_get_obs`` / ``reset_model``) in torch.

    reward = forward_reward_weight * x velocity + healthy_reward * healthy - ctrl cost - contact cost,
    x velocity from qpos[0] (``main_body`` None) or from ``xpos[main_body]`` before and after the
    step; terminated = not healthy (never, when ``healthy`` is None).
    """

    env_id: str
    xml: str  # file in gymnasium/envs/mujoco/assets
    frame_skip: int
    ctrl_cost_weight: float
    reset_noise_scale: float
    qvel_noise: Literal["uniform", "normal"]
    skip_qpos: int  # leading qpos entries left out of the observation
    healthy: Callable[[Tensor, Tensor], Tensor] | None = None
    healthy_reward: float = 0.0
    forward_reward_weight: float = 1.0
    qvel_clip: float | None = None
    main_body: int | None = None
    contact_cost_weight: float = 0.0
    contact_force_range: tuple[float, float] = (-1.0, 1.0)
    contact_forces_in_obs: bool = False
    max_episode_steps: int | None = 1000

    @property
    def xml_path(self) -> str:
        import gymnasium.envs.mujoco as gym_mujoco

        return os.path.join(os.path.dirname(gym_mujoco.__file__), "assets", self.xml)

    @property
    def needs_contact_forces(self) -> bool:
        return self.contact_forces_in_obs or self.contact_cost_weight > 0

    def initial_state(self, sim: WarpSim, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, s, dev = sim.n_envs, self.reset_noise_scale, sim.device
        qpos = sim.init_qpos + (-s + 2 * s * torch.rand((n, sim.nq), generator=gen, device=dev))
        if self.qvel_noise == "normal":
            qvel = sim.init_qvel + s * torch.randn((n, sim.nv), generator=gen, device=dev)
        else:
            qvel = sim.init_qvel + (-s + 2 * s * torch.rand((n, sim.nv), generator=gen, device=dev))
        return qpos, qvel

    def probe(self, sim: WarpSim) -> Tensor:
        return sim.qpos[:, :1] if self.main_body is None else sim.xpos[:, self.main_body, :2]

    def _contact_forces(self, sim: WarpSim) -> Tensor:
        return sim.cfrc_ext.clamp(*self.contact_force_range)  # (N, nbody, 6)

    def observe(self, sim: WarpSim, *, first: bool) -> Tensor:
        parts = [sim.qpos[:, self.skip_qpos :], sim.qvel if self.qvel_clip is None else sim.qvel.clamp(-self.qvel_clip, self.qvel_clip)]
        if self.contact_forces_in_obs:
            # after a reset gymnasium reads cfrc_ext as mj_resetData left it: zero (mj_forward skips it)
            forces = self._contact_forces(sim)[:, 1:]
            parts.append(torch.zeros_like(forces).flatten(1) if first else forces.flatten(1))
        return torch.cat(parts, 1).to(torch.float32)

    def reward(self, sim: WarpSim, before: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x_velocity = (self.probe(sim)[:, 0] - before[:, 0]) / sim.dt
        reward = self.forward_reward_weight * x_velocity - self.ctrl_cost_weight * action.square().sum(1)
        if self.contact_cost_weight:
            reward = reward - self.contact_cost_weight * self._contact_forces(sim).square().sum((1, 2))
        if self.healthy is None:
            return reward, torch.zeros(sim.n_envs, dtype=torch.bool, device=sim.device)
        healthy = self.healthy(sim.qpos, sim.qvel)
        return reward + self.healthy_reward * healthy.to(reward.dtype), ~healthy


#: gymnasium v5 tasks with their default arguments
WARP_TASKS: dict[str, LocomotionTask] = {
    t.env_id: t
    for t in (
        LocomotionTask(
            "Hopper-v5", "hopper.xml", frame_skip=4, ctrl_cost_weight=1e-3, reset_noise_scale=5e-3, qvel_noise="uniform",
            skip_qpos=1, healthy=_hopper_healthy, healthy_reward=1.0, qvel_clip=10.0,
        ),
        LocomotionTask(
            "HalfCheetah-v5", "half_cheetah.xml", frame_skip=5, ctrl_cost_weight=0.1, reset_noise_scale=0.1, qvel_noise="normal",
            skip_qpos=1,
        ),
        LocomotionTask(
            "Walker2d-v5", "walker2d_v5.xml", frame_skip=4, ctrl_cost_weight=1e-3, reset_noise_scale=5e-3, qvel_noise="uniform",
            skip_qpos=1, healthy=_walker_healthy, healthy_reward=1.0, qvel_clip=10.0,
        ),
        LocomotionTask(
            "Ant-v5", "ant.xml", frame_skip=5, ctrl_cost_weight=0.5, reset_noise_scale=0.1, qvel_noise="normal",
            skip_qpos=2, healthy=_ant_healthy, healthy_reward=1.0, main_body=1, contact_cost_weight=5e-4,
            contact_forces_in_obs=True,
        ),
    )
}  # fmt: skip


def warp_task(env_id: str) -> LocomotionTask:
    """The task for ``env_id``, or EnvError listing the supported ids."""
    try:
        return WARP_TASKS[env_id]
    except KeyError:
        raise EnvError(f"unknown env id '{env_id}' for the warp back end; supported: {', '.join(sorted(WARP_TASKS))}") from None


__all__ = ["WARP_TASKS", "LocomotionTask", "WarpTask", "warp_task"]

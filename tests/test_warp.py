"""genrl_envs.warp_sim: mujoco_warp worlds against gymnasium's C MuJoCo envs, per-world reset, exact resume.

Runs on Warp's CPU device with 3 worlds. Warp compiles its kernels on the first run (about 30 s for
the first model, under 10 s for each further one; Warp's kernel cache keeps them, later runs build a
sim in 1-2 s); the comparisons of the three tasks beyond Hopper are marked slow.

Tolerances are absolute, on float32 observations and rewards against gymnasium's float64 ones. A
free run (the two engines step on their own, synchronised only when an episode restarts) stays
close over 100 steps for Hopper and Walker2d; HalfCheetah's and Ant's dynamics amplify float32
rounding within tens of steps, so there each step starts gymnasium from the Warp state
(``resync``). Ant runs with elliptic friction cones on both engines: with pyramidal cones
mujoco_warp's contact frame for steep capsules differs from C MuJoCo's (see ``envs.warp_sim``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco_warp")

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402

from genrl_envs.base import EnvError  # noqa: E402
from genrl_envs.warp_sim import WARP_TASKS, WarpSim, compare_with_gymnasium, make_warp_env, warp_task  # noqa: E402

N = 3


@pytest.fixture(scope="module")
def hopper() -> Iterator[WarpSim]:
    sim = WarpSim(warp_task("Hopper-v5"), N, device="cpu")
    yield sim
    sim.close()


def _elliptic(model: Any) -> None:
    model.opt.cone = mujoco.mjtCone.mjCONE_ELLIPTIC


def test_hopper_matches_gymnasium_over_100_steps(hopper: WarpSim) -> None:
    assert (hopper.obs_dim, hopper.action_dim, hopper.max_episode_steps) == (11, 3, 1000)
    obs_err, rew_err, terminations, mismatched = compare_with_gymnasium(hopper, 100, resync=False)
    assert mismatched == 0  # terminations agree at every step
    assert terminations > 0  # the per-world reset is part of the comparison
    assert obs_err < 1e-4 and rew_err < 2e-5, (obs_err, rew_err)  # measured 1.1e-5, 1.6e-6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env_id", "resync", "edit", "obs_tol", "rew_tol"),
    [
        ("Walker2d-v5", False, None, 5e-3, 1e-4),  # measured 5.5e-4, 1.1e-5
        ("HalfCheetah-v5", True, None, 1e-2, 1e-4),  # measured 1.6e-3, 6.5e-6
        ("Ant-v5", True, _elliptic, 1e-2, 1e-4),  # measured 8.3e-4, 1.1e-5
    ],
)
def test_other_tasks_match_gymnasium(env_id: str, resync: bool, edit: Callable[[Any], None] | None, obs_tol: float, rew_tol: float) -> None:
    sim = WarpSim(warp_task(env_id), N, device="cpu", edit_model=edit)
    reference = gym.make(env_id)
    assert reference.observation_space.shape == (sim.obs_dim,) and reference.action_space.shape == (sim.action_dim,)
    obs_err, rew_err, _, mismatched = compare_with_gymnasium(sim, 100, resync=resync, edit=edit)
    assert mismatched == 0
    assert obs_err < obs_tol and rew_err < rew_tol, (obs_err, rew_err)


def _rollout(sim: WarpSim, actions: list[torch.Tensor], reset_at: int | None, done: torch.Tensor) -> torch.Tensor:
    """(T, N, O + 1): observation and reward of every step, ``reset_done(done)`` before step ``reset_at``."""
    out = []
    for t, action in enumerate(actions):
        if t == reset_at:
            sim.reset_done(done)
        obs, reward, _, _ = sim.step(action)
        out.append(torch.cat((obs, reward[:, None]), 1))
    return torch.stack(out)


def test_reset_done_only_touches_done_worlds(hopper: WarpSim) -> None:
    gen = torch.Generator().manual_seed(1)
    actions = [torch.rand(N, 3, generator=gen) * 2 - 1 for _ in range(10)]
    hopper.reset(3)
    for action in actions[:3]:
        hopper.step(action)
    snapshot = hopper.state_dict()
    done = torch.tensor([False, True, False])
    plain = _rollout(hopper, actions[3:], None, done)
    hopper.load_state_dict(snapshot)
    with_reset = _rollout(hopper, actions[3:], 2, done)
    keep = ~done
    assert torch.equal(with_reset[:, keep], plain[:, keep])  # bitwise: the other worlds never notice
    assert torch.equal(with_reset[:2, 1], plain[:2, 1]) and not torch.equal(with_reset[2:, 1], plain[2:, 1])
    state = hopper.state_dict()
    np.testing.assert_array_equal(state["elapsed"], [10, 5, 10])
    np.testing.assert_allclose(state["time"][1], 5 * hopper.dt, rtol=1e-5)  # the clock restarted at 0

    first = hopper.reset_done(done)[1]  # gymnasium's reset: init_qpos/qvel + U(-5e-3, 5e-3)
    init = torch.cat((hopper.init_qpos[1:], hopper.init_qvel))
    assert 0 < (first - init).abs().max() <= 5e-3
    assert hopper.time[1] == 0 and hopper.state_dict()["elapsed"][1] == 0


def test_resume_from_state_dict_is_exact(hopper: WarpSim) -> None:
    gen = torch.Generator().manual_seed(2)
    actions = [torch.rand(N, 3, generator=gen) * 2 - 1 for _ in range(8)]
    done = torch.tensor([True, False, True])
    hopper.reset(4)
    for action in actions[:2]:
        hopper.step(action)
    snapshot = hopper.state_dict()
    assert {"qpos", "qvel", "qacc_warmstart", "time", "elapsed", "probe", "rng"} <= set(snapshot)
    expected = _rollout(hopper, actions[2:], 3, done)  # the reset draws noise from the saved generator

    hopper.load_state_dict(snapshot)
    assert torch.equal(_rollout(hopper, actions[2:], 3, done), expected)
    # a fresh sim stepping with plain mujoco_warp calls continues bitwise too (graph replay == plain calls)
    other = WarpSim(warp_task("Hopper-v5"), N, device="cpu", graph=False)
    other.load_state_dict(snapshot)
    assert torch.equal(_rollout(other, actions[2:], 3, done), expected)

    with pytest.raises(EnvError, match="'qpos' has shape"):
        other.load_state_dict({**snapshot, "qpos": snapshot["qpos"][:2]})


def test_make_warp_env_autoresets_and_resumes() -> None:
    env = make_warp_env("Hopper-v5", N, device="cpu")
    assert env.backend == "warp" and env.spec.obs_dim == 11 and env.spec.max_episode_steps == 1000
    np.testing.assert_array_equal(env.spec.action_low, -1.0)
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(3)
    ended = []
    for _ in range(200):  # random actions topple the hopper within a few dozen steps
        result = env.step(torch.randn(N, 3, generator=gen))
        ended += result.episode_lengths
        if ended:
            break
    assert ended and result.terminated.any()
    done = result.terminated
    assert not torch.equal(result.final_obs[done], result.obs[done])
    state = env.state_dict()
    assert state["meta"]["backend"] == "warp" and state["meta"]["has_snapshot"]
    actions = [torch.randn(N, 3, generator=gen) for _ in range(3)]
    expected = [env.step(a).obs for a in actions]
    env.load_state_dict(state)
    assert all(torch.equal(env.step(a).obs, o) for a, o in zip(actions, expected, strict=True))
    env.close()


def test_errors_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    supported = ", ".join(sorted(WARP_TASKS))
    assert supported == "Ant-v5, HalfCheetah-v5, Hopper-v5, Walker2d-v5"
    with pytest.raises(EnvError, match=f"unknown env id 'Humanoid-v5' for the warp back end; supported: {supported}"):
        make_warp_env("Humanoid-v5", 2, device="cpu")
    with pytest.raises(EnvError, match="hopper.xml.*mjSOL_PGS is unsupported"):
        WarpSim(warp_task("Hopper-v5"), 2, device="cpu", edit_model=lambda m: setattr(m.opt, "solver", mujoco.mjtSolver.mjSOL_PGS))
    with pytest.raises(EnvError, match="'cuda' or 'cpu'"):
        WarpSim(warp_task("Hopper-v5"), 2, device="meta")
    monkeypatch.setitem(sys.modules, "mujoco_warp", None)  # as if not installed
    with pytest.raises(EnvError, match=r"pip install mujoco-warp==3\.17\.0") as info:
        WarpSim(warp_task("Hopper-v5"), 2, device="cpu")
    assert "\n" not in str(info.value)

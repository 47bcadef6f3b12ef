"""genrl_envs.dmc: the dm_control -> gymnasium adapter and its dmc/* ids.

Skipped when dm_control is not installed (it needs mujoco < 4; see pyproject.toml).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("dm_control")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from gymnasium.utils.env_checker import check_env  # noqa: E402

from genrl_envs import check_env_id, make_env  # noqa: E402
from genrl_envs.dmc import DMC_ENV_IDS, DMCEnv, register_dmc_envs  # noqa: E402

HS = "dmc/HopperStand-v0"

pytestmark = pytest.mark.filterwarnings("ignore:.*settotalmass.*")


def actions(n: int, dim: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, dim).astype(np.float32) for _ in range(n)]


def test_gymnasium_env_checker() -> None:
    env = DMCEnv("hopper", "stand")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings are failures too ...
        warnings.filterwarnings("ignore", ".*is -?infinity.*")  # ... but an unbounded Box, as every MuJoCo env has
        check_env(env, skip_render_check=True)


def test_ids_registered_with_dims_and_no_time_limit_wrapper() -> None:
    check_env_id(HS)  # registers the project's ids, dmc/* included
    assert register_dmc_envs()
    assert set(DMC_ENV_IDS) <= set(gym.registry)
    env = gym.make(HS)
    assert env.observation_space.shape == (15,) and env.observation_space.dtype == np.float32
    assert env.action_space.shape == (4,)
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    np.testing.assert_array_equal(env.action_space.high, 1.0)
    assert env.spec.max_episode_steps is None  # dm_control's own limit, no gymnasium TimeLimit
    assert env.unwrapped.max_episode_steps == 1000
    assert env.unwrapped.obs_keys == ("position", "velocity", "touch")
    wrapper: object = env
    while isinstance(wrapper, gym.Wrapper):
        assert not isinstance(wrapper, gym.wrappers.TimeLimit)
        wrapper = wrapper.env
    env.close()


def test_episode_is_1000_steps_truncated_once_rewards_in_unit_interval() -> None:
    env = DMCEnv("hopper", "stand")
    env.reset(seed=0)
    rewards, truncs, terms = [], [], []
    for a in actions(1000, 4):
        _, r, term, trunc, _ = env.step(a)
        rewards.append(r)
        truncs.append(trunc)
        terms.append(term)
    assert truncs == [False] * 999 + [True]
    assert not any(terms)
    assert all(0.0 <= r <= 1.0 for r in rewards)
    assert 0.0 <= sum(rewards) <= 1000.0
    with pytest.raises(gym.error.ResetNeeded):
        env.step(np.zeros(4, np.float32))
    env.reset()
    assert env.elapsed_steps == 0


def test_seed_determinism() -> None:
    def rollout(seed: int) -> tuple[np.ndarray, list[float]]:
        env = DMCEnv("hopper", "stand")
        obs, _ = env.reset(seed=seed)
        seq, rews = [obs], []
        for a in actions(60, 4):
            obs, r, *_ = env.step(a)
            seq.append(obs)
            rews.append(r)
        return np.stack(seq), rews

    a, ra = rollout(11)
    b, rb = rollout(11)
    c, _ = rollout(12)
    assert np.array_equal(a, b) and ra == rb
    assert not np.array_equal(a[0], c[0])  # the initial joint angles come from the seed


def test_bitwise_equal_to_dm_control_environment() -> None:
    """Same task seed (drawn from np_random) and actions: identical to dm_control's own step loop
    (this also shows that the extra mj_step1 before each step is bitwise neutral)."""
    from dm_control import suite

    env = DMCEnv("hopper", "stand")
    obs, _ = env.reset(seed=5)
    task_seed = int(np.random.Generator(np.random.PCG64(5)).integers(0, 2**32 - 1))
    ref = suite.load("hopper", "stand", task_kwargs={"random": task_seed})
    ts = ref.reset()

    def flat(o) -> np.ndarray:
        return np.concatenate([np.asarray(v, np.float64).ravel() for v in o.values()]).astype(np.float32)

    assert np.array_equal(flat(ts.observation), obs)
    for a in actions(300, 4, seed=1):
        obs, r, *_ = env.step(a)
        ts = ref.step(a)
        assert np.array_equal(flat(ts.observation), obs) and r == ts.reward


@pytest.mark.parametrize("env_id", [HS, "dmc/FishSwim-v0"])
def test_snapshot_restore_is_exact(env_id: str) -> None:
    """state_dict mid-episode, load into a fresh env in another state (other contacts, other
    target): the next steps, across the episode end and the autoreset, are identical."""
    gen = torch.Generator().manual_seed(0)
    env = make_env(env_id, 1)
    dim = env.spec.action_dim
    acts = [torch.rand(1, dim, generator=gen) * 2 - 1 for _ in range(1100)]
    env.reset(seed=3)
    for a in acts[:950]:
        env.step(a)
    state = env.state_dict()
    first = [env.step(a) for a in acts[950:]]
    env.close()

    other = make_env(env_id, 1)
    other.reset(seed=99)
    for a in acts[:37]:
        other.step(a)
    other.load_state_dict(state)
    second = [other.step(a) for a in acts[950:]]
    other.close()
    assert sum(bool(x.truncated.any()) for x in first) == 1  # the episode end is inside the window
    for x, y in zip(first, second):
        assert torch.equal(x.obs, y.obs) and torch.equal(x.reward, y.reward)
        assert torch.equal(x.truncated, y.truncated) and torch.equal(x.terminated, y.terminated)
        assert x.episode_returns == y.episode_returns


def test_render_rgb_array() -> None:
    env = DMCEnv("hopper", "stand", render_mode="rgb_array", width=96, height=64)
    env.reset(seed=0)
    try:
        frame = env.render()
    except Exception as exc:  # no EGL/OSMesa on this machine
        pytest.skip(f"offscreen rendering unavailable: {exc}")
    assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
    assert frame.std() > 0  # not a blank frame
    env.close()
    assert DMCEnv("hopper", "stand").render() is None  # render_mode None

"""The project's navigation toys: genrl/MultiGoal-v0 and genrl/PointMaze-v0 (envs/multigoal.py, envs/maze.py)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import genrl_envs as envs
from genrl_envs.maze import PointMazeEnv, interior_block, route_taken
from genrl_envs.multigoal import MultiGoalEnv, count_goals_reached, goal_histogram, goal_index, goal_positions

MG, PM = "genrl/MultiGoal-v0", "genrl/PointMaze-v0"


def rollout(env: gym.Env, policy, seed: int, max_steps: int = 500):
    """Run ``policy(obs) -> action`` until the episode ends: (observations (T+1, O), rewards, last info, terminated)."""
    obs, _ = env.reset(seed=seed)
    observations, rewards, info, terminated = [obs], [], {}, False
    for _ in range(max_steps):
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            break
    return np.asarray(observations), np.asarray(rewards), info, terminated


# -- both envs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [MultiGoalEnv, PointMazeEnv])
def test_env_checker_and_render(cls) -> None:
    check_env(cls(), skip_render_check=True)
    env = cls(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    frame = env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    assert frame.min() < frame.max()  # something drawn
    assert cls().render() is None  # no render mode, no frame


@pytest.mark.parametrize("env_id,kwargs", [(MG, {"init_noise": 0.1}), (PM, {})])
def test_deterministic_given_seed(env_id: str, kwargs: dict) -> None:
    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        env = gym.make(env_id, **kwargs)
        actions = np.random.default_rng(123).uniform(-1, 1, size=(30, 2)).astype(np.float32)
        obs, _ = env.reset(seed=seed)
        out, rewards = [obs], []
        for a in actions:
            obs, r, term, trunc, _ = env.step(a)
            out.append(obs)
            rewards.append(r)
            if term or trunc:
                break
        return np.asarray(out), np.asarray(rewards)

    o1, r1 = run(7)
    o2, r2 = run(7)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(run(8)[0][0], o1[0])  # the seed moves the start


@pytest.mark.parametrize("env_id,n,obs_dim", [(MG, 2, 2), (PM, 1, 4)])
def test_project_back_end(env_id: str, n: int, obs_dim: int) -> None:
    envs.check_env_id(env_id)
    env = envs.make_env(env_id, n)
    assert env.spec.obs_dim == obs_dim and env.spec.action_dim == 2
    assert env.spec.max_episode_steps == (50 if env_id == MG else 200)
    obs = env.reset(seed=0)
    assert obs.shape == (n, obs_dim) and obs.dtype == torch.float32
    for _ in range(3):
        res = env.step(torch.rand(n, 2) * 2 - 1)
    assert res.obs.shape == (n, obs_dim) and res.reward.shape == (n,) and res.terminated.shape == (n,)
    state = env.state_dict()
    env.load_state_dict(state)
    env.close()


@pytest.mark.parametrize("typo,registered", [("genrl/MultiGoal-v1", MG), ("genrl/PointMaze-v1", PM)])
def test_typo_names_close_match(typo: str, registered: str) -> None:
    with pytest.raises(envs.EnvError, match=registered):
        envs.check_env_id(typo)


def test_exact_resume_of_pointmaze_state() -> None:
    a = envs.make_env(PM, 1, normalize_obs=False, normalize_reward=False)
    b = envs.make_env(PM, 1, normalize_obs=False, normalize_reward=False)
    a.reset(seed=3)
    b.reset(seed=99)
    for _ in range(5):
        a.step(torch.tensor([[0.7, -0.2]]))
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        act = torch.tensor([[-0.3, 0.9]])
        ra, rb = a.step(act), b.step(act)
        assert torch.equal(ra.obs, rb.obs) and torch.equal(ra.reward, rb.reward)


# -- MultiGoal ------------------------------------------------------------------------------------
def test_goal_layout() -> None:
    goals = goal_positions()
    assert goals.shape == (6, 2)
    np.testing.assert_allclose(np.linalg.norm(goals, axis=1), 5.0)
    np.testing.assert_allclose(goals[0], [5.0, 0.0])
    four = goal_positions(4, 5.0)  # the paper's (+-5, 0), (0, +-5)
    assert {tuple(g) for g in four} == {(5.0, 0.0), (0.0, 5.0), (-5.0, 0.0), (0.0, -5.0)}


@pytest.mark.parametrize("i", range(6))
def test_scripted_policy_reaches_goal_i(i: int) -> None:
    env = gym.make(MG)
    goal = goal_positions()[i]

    def head_to_goal(obs: np.ndarray) -> np.ndarray:
        d = goal - obs
        return (d / max(np.linalg.norm(d), 1e-9)).astype(np.float32)

    observations, _, info, terminated = rollout(env, head_to_goal, seed=i)
    assert terminated and info["goal"] == i
    assert len(observations) - 1 <= 50
    assert goal_index(observations[-1]) == i


def test_reward_hand_computed() -> None:
    env = MultiGoalEnv()
    env.reset(seed=0)
    _, r, term, trunc, info = env.step(np.zeros(2, np.float32))
    assert r == pytest.approx(-1.0 * 5.0) and not term and not trunc and info["goal"] == -1
    env.reset(seed=0)
    obs, r, *_ = env.step(np.array([1.0, 0.0], np.float32))  # v = (5, 0): x = (0.5, 0)
    np.testing.assert_allclose(obs, [0.5, 0.0])
    assert r == pytest.approx(-4.5 - 0.01 * 25.0)
    env = MultiGoalEnv(distance_cost_coeff=2.0, action_cost_coeff=0.0, goal_reward=10.0)
    env.reset(seed=0)
    env.position[:] = [4.5, 0.0]
    _, r, term, _, info = env.step(np.zeros(2, np.float32))
    assert term and info["goal"] == 0 and r == pytest.approx(-2.0 * 0.5 + 10.0)


def test_goal_index_helpers() -> None:
    goals = goal_positions()
    np.testing.assert_array_equal(goal_index(goals), np.arange(6))
    np.testing.assert_array_equal(goal_index(goals * 1.1), np.arange(6))  # 0.5 from each goal
    pts = np.array([[0.0, 0.0], [7.0, 7.0], [4.6, 0.1], [-2.5, -4.0]])
    np.testing.assert_array_equal(goal_index(pts), [-1, -1, 0, 4])
    assert goal_index(pts, goal_radius=None)[0] in range(6) and goal_index(pts, goal_radius=None)[1] == 1
    assert goal_index(pts[2]) == 0 and goal_index(pts[:, None, :]).shape == (4, 1)
    assert count_goals_reached(pts) == 2
    assert count_goals_reached(np.concatenate([goals, goals[:2]])) == 6
    np.testing.assert_array_equal(goal_histogram(np.concatenate([goals, goals[:2]])), [2, 2, 1, 1, 1, 1])
    assert count_goals_reached(np.zeros((3, 2))) == 0


# -- PointMaze ------------------------------------------------------------------------------------
def waypoint_policy(waypoints: list[tuple[float, float]]):
    """PD controller through waypoints (switches when within 0.25)."""
    state = {"k": 0}

    def policy(obs: np.ndarray) -> np.ndarray:
        pos, vel = obs[:2].astype(np.float64), obs[2:].astype(np.float64)
        while state["k"] < len(waypoints) - 1 and np.linalg.norm(np.asarray(waypoints[state["k"]]) - pos) < 0.25:
            state["k"] += 1
        target = np.asarray(waypoints[state["k"]])
        return np.clip(3.0 * (target - pos) - 1.5 * vel, -1, 1).astype(np.float32)

    return policy


def test_walls_block_straight_line() -> None:
    env = gym.make(PM)
    xmin, xmax, ymin, ymax = interior_block()
    assert (xmin, xmax, ymin, ymax) == (2.0, 5.0, 2.0, 4.0)
    observations, _, _, terminated = rollout(env, lambda obs: np.array([0.0, 1.0], np.float32), seed=0, max_steps=200)
    assert not terminated
    r = env.unwrapped.agent_radius
    assert observations[:, 1].max() <= ymin - r + 1e-6  # stopped below the block
    assert observations[-1, 1] == pytest.approx(ymin - r) and observations[-1, 3] == 0.0
    assert route_taken(observations) == "none"
    # full speed into the outer wall: clipped there too
    observations, *_ = rollout(env, lambda obs: np.array([-1.0, 0.0], np.float32), seed=0, max_steps=50)
    assert observations[:, 0].min() >= 1.0 + r - 1e-6


def test_no_tunnelling_at_high_speed() -> None:
    env = PointMazeEnv(max_speed=50.0, accel_scale=500.0, reset_noise=0.0)
    env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(np.array([0.0, 1.0], np.float32))
        assert obs[1] <= 2.0 - env.agent_radius + 1e-9


@pytest.mark.parametrize(
    "side,waypoints",
    [
        ("left", [(1.5, 1.5), (1.5, 4.5), (3.5, 4.5)]),
        ("right", [(5.5, 1.5), (5.5, 4.5), (3.5, 4.5)]),
    ],
)
def test_two_routes_reach_goal(side: str, waypoints) -> None:
    env = gym.make(PM)
    observations, rewards, info, terminated = rollout(env, waypoint_policy(waypoints), seed=1, max_steps=200)
    assert terminated and info["success"]
    assert len(rewards) < 200
    np.testing.assert_allclose(rewards[-1], -np.linalg.norm(observations[-1, :2] - [3.5, 4.5]), rtol=1e-5)
    assert route_taken(observations) == side
    assert route_taken(observations[:, :2]) == side


def test_route_taken_labels_last_crossing() -> None:
    down_left_up_right = np.array([[3.5, 1.5], [1.5, 1.5], [1.5, 3.5], [1.5, 2.5], [5.5, 2.5], [5.5, 3.5], [5.5, 4.5]])
    # crossed y = 3 going up on the left, back down on the left, up again on the right
    assert route_taken(down_left_up_right) == "right"
    assert route_taken(np.zeros((1, 2))) == "none"

"""MultiGoal: a 2-D point mass that may end its episode at any of several goals.

The multimodality toy of soft Q-learning (Haarnoja et al. 2017, "Reinforcement Learning with
Deep Energy-Based Policies"), in the variant PolicyFlow trains on (design notes, section 3.5):
6 goals on a circle of radius 5, 50-step episodes, dt 0.1, actions clipped at 5, reward =
distance cost (scale 1) + action cost (-0.01). An optimal maximum-entropy policy spreads its
mass over all goals; a unimodal Gaussian usually commits to one.

Dynamics (no inertia, the action is a velocity):
    v = action_scale * clip(a, -1, 1)            a in the Box(-1, 1, (2,)) action space
    x' = clip(x + dt * v, -bound, bound)         bound = radius + 2 (7 for radius 5, as the paper)
Reward:
    r = -distance_cost_coeff * min_g ||x' - g|| - action_cost_coeff * ||v||^2 + goal_reward * [reached]
Termination: ||x' - g|| < goal_radius for some goal g; ``info["goal"]`` is its index (else -1).

Choices, against the paper's environment (rllab/softqlearning ``MultiGoalEnv``: 4 goals at
(+-5, 0), (0, +-5), x' = x + a with |a| <= 1, squared distance cost, actuation cost coefficient
30, goal bonus +10, start N(0, 0.1^2), goal threshold 1, terminate at a goal):
- goals: ``n_goals`` (6) evenly spaced on a circle of ``radius`` (5), goal 0 at (radius, 0),
  counter-clockwise; ``n_goals=4`` gives the paper's four positions.
- distance cost is the plain (not squared) distance, scale 1, as PolicyFlow describes it.
- action cost is on the physical velocity command v (PolicyFlow's actions live in [-5, 5]):
  0.01 * ||v||^2, at most 0.5 a step.
- goal bonus ``goal_reward`` defaults to 0 (PolicyFlow names only the two costs); set 10 for the
  paper's bonus.
- start exactly at the origin (``init_noise`` = 0); ``init_noise`` > 0 adds N(0, init_noise^2)
  from the env's ``np_random`` (the paper used 0.1).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from genrl_envs.render import disc

ENV_ID = "genrl/MultiGoal-v0"
MAX_EPISODE_STEPS = 50


def goal_positions(n_goals: int = 6, radius: float = 5.0) -> np.ndarray:
    """(n_goals, 2) goal coordinates, evenly spaced on a circle, goal 0 at (radius, 0)."""
    angles = 2.0 * np.pi * np.arange(n_goals) / n_goals
    goals = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.round(goals, 12)  # exact zeros instead of 3e-16


def goal_index(
    positions: Any,
    goals: np.ndarray | None = None,
    goal_radius: float | None = 1.0,
) -> np.ndarray:
    """Index of the goal each position is at: (..., 2) -> (...) int64.

    A position farther than ``goal_radius`` from every goal gets -1; ``goal_radius=None`` gives
    the nearest goal whatever the distance. ``goals`` defaults to the registered env's 6 goals.
    """
    goals = goal_positions() if goals is None else np.asarray(goals, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    dist = np.linalg.norm(pos[..., None, :] - goals, axis=-1)  # (..., G)
    idx = np.argmin(dist, axis=-1).astype(np.int64)
    if goal_radius is not None:
        idx = np.where(np.min(dist, axis=-1) < goal_radius, idx, -1)
    return idx


def goal_histogram(final_positions: Any, goals: np.ndarray | None = None, goal_radius: float | None = 1.0) -> np.ndarray:
    """(G,) how many of the final positions ended at each goal (misses are not counted)."""
    goals = goal_positions() if goals is None else np.asarray(goals, dtype=np.float64)
    idx = np.asarray(goal_index(final_positions, goals, goal_radius)).ravel()
    return np.bincount(idx[idx >= 0], minlength=len(goals))


def count_goals_reached(final_positions: Any, goals: np.ndarray | None = None, goal_radius: float | None = 1.0) -> int:
    """Number of distinct goals that at least one of the final positions reached."""
    return int(np.count_nonzero(goal_histogram(final_positions, goals, goal_radius)))


class MultiGoalEnv(gym.Env):
    """2-D point mass, several goals; observation = position (float32, 2). See the module doc."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        n_goals: int = 6,
        radius: float = 5.0,
        goal_radius: float = 1.0,
        dt: float = 0.1,
        action_scale: float = 5.0,
        distance_cost_coeff: float = 1.0,
        action_cost_coeff: float = 0.01,
        goal_reward: float = 0.0,
        init_noise: float = 0.0,
        render_mode: str | None = None,
        render_size: int = 256,
    ) -> None:
        if n_goals < 1:
            raise ValueError(f"n_goals must be >= 1, got {n_goals}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.n_goals = int(n_goals)
        self.radius = float(radius)
        self.goal_radius = float(goal_radius)
        self.dt = float(dt)
        self.action_scale = float(action_scale)
        self.distance_cost_coeff = float(distance_cost_coeff)
        self.action_cost_coeff = float(action_cost_coeff)
        self.goal_reward = float(goal_reward)
        self.init_noise = float(init_noise)
        self.render_mode = render_mode
        self.render_size = int(render_size)
        self.goals = goal_positions(self.n_goals, self.radius)
        self.bound = float(np.float32(self.radius + 2.0))
        self.observation_space = spaces.Box(-self.bound, self.bound, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = np.zeros(2, dtype=np.float64)

    def _obs(self) -> np.ndarray:
        return self.position.astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position[:] = 0.0
        if self.init_noise > 0.0:
            noise = self.init_noise * self.np_random.standard_normal(2)
            self.position[:] = np.clip(noise, -self.bound, self.bound)
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        velocity = self.action_scale * a
        self.position[:] = np.clip(self.position + self.dt * velocity, -self.bound, self.bound)
        dist = np.linalg.norm(self.position - self.goals, axis=1)
        nearest = int(np.argmin(dist))
        min_dist = float(dist[nearest])
        reached = min_dist < self.goal_radius
        reward = -self.distance_cost_coeff * min_dist - self.action_cost_coeff * float(velocity @ velocity)
        if reached:
            reward += self.goal_reward
        info = {"goal": nearest if reached else -1, "distance": min_dist}
        return self._obs(), float(reward), bool(reached), False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        size = self.render_size
        scale = size / (2.0 * self.bound)

        def to_px(p: np.ndarray) -> tuple[float, float]:  # y points up in the image
            return (p[0] + self.bound) * scale, (self.bound - p[1]) * scale

        img = np.full((size, size, 3), 255, dtype=np.uint8)
        centre = to_px(np.zeros(2))
        img[int(centre[1]), :] = (225, 225, 225)
        img[:, int(centre[0])] = (225, 225, 225)
        for g in self.goals:
            disc(img, *to_px(g), self.goal_radius * scale, (230, 120, 110))
        disc(img, *to_px(self.position), max(3.0, 0.25 * scale), (40, 90, 200))
        return img


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="genrl_envs.multigoal:MultiGoalEnv", max_episode_steps=MAX_EPISODE_STEPS)

"""PointMaze: a 2-D point mass in a small walled maze with two routes to the goal.

A numpy-only stand-in for gymnasium-robotics' ``PointMaze_*`` tasks (no MuJoCo): the default
map puts a central block between start and goal, so the goal is reached around either its left
or its right side, two equally short routes (a multimodal optimum):

    #######
    #..G..#      '#' wall cell (1 x 1), '.' free, 'S' start, 'G' goal
    #.###.#      x grows to the right, y grows upwards (the bottom row is y in [0, 1])
    #.###.#
    #..S..#
    #######

Dynamics (dt 0.1): the action is an acceleration command,
    v' = clip(v + dt * accel_scale * clip(a, -1, 1), -max_speed, max_speed)   (per axis)
    x' = x + dt * v', moved one axis at a time and clipped against the wall cells inflated by
the point's radius (swept test: no tunnelling at any speed); the velocity component into a wall
is zeroed. Observation: [x, y, vx, vy] (float32). Reward (dense): -||x' - goal|| (+
``success_bonus`` when reached); terminated when ||x' - goal|| < ``goal_radius``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from genrl_envs.render import disc

ENV_ID = "genrl/PointMaze-v0"
MAX_EPISODE_STEPS = 200

DEFAULT_MAP: tuple[str, ...] = (
    "#######",
    "#..G..#",
    "#.###.#",
    "#.###.#",
    "#..S..#",
    "#######",
)


def parse_map(maze_map: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(wall boxes (B, 4) as [xmin, xmax, ymin, ymax], start (2,), goal (2,), width, height)."""
    rows = [str(r) for r in maze_map]
    height, width = len(rows), len(rows[0]) if rows else 0
    if height == 0 or any(len(r) != width for r in rows):
        raise ValueError("maze_map must be a non-empty list of equal-length strings")
    boxes, start, goal = [], None, None
    for r, row in enumerate(rows):
        y0 = float(height - 1 - r)
        for c, ch in enumerate(row):
            if ch == "#":
                boxes.append((float(c), c + 1.0, y0, y0 + 1.0))
            elif ch in "Ss":
                start = np.array([c + 0.5, y0 + 0.5])
            elif ch in "Gg":
                goal = np.array([c + 0.5, y0 + 0.5])
            elif ch != ".":
                raise ValueError(f"unknown maze cell {ch!r} (use '#', '.', 'S', 'G')")
    if start is None or goal is None:
        raise ValueError("maze_map needs one 'S' and one 'G' cell")
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), start, goal, width, height


def interior_block(maze_map: Sequence[str] = DEFAULT_MAP) -> tuple[float, float, float, float]:
    """Bounding box (xmin, xmax, ymin, ymax) of the wall cells that do not touch the border."""
    boxes, _, _, width, height = parse_map(maze_map)
    inner = boxes[(boxes[:, 0] > 0) & (boxes[:, 1] < width) & (boxes[:, 2] > 0) & (boxes[:, 3] < height)]
    if len(inner) == 0:
        raise ValueError("maze_map has no interior wall block")
    return float(inner[:, 0].min()), float(inner[:, 1].max()), float(inner[:, 2].min()), float(inner[:, 3].max())


def route_taken(trajectory: Any, block: tuple[float, float, float, float] | None = None) -> str:
    """Which side of the central block a trajectory went round: "left", "right" or "none".

    ``trajectory``: (T, >=2) positions (or observations whose first two columns are x, y).
    The label is the side (x left/right of the block's centre) where the trajectory last
    crossed the block's mid-height line; "none" if it never crossed it. ``block`` defaults to
    the interior block of the default map.
    """
    xmin, xmax, ymin, ymax = interior_block() if block is None else block
    xy = np.asarray(trajectory, dtype=np.float64)[:, :2]
    if len(xy) < 2:
        return "none"
    y_mid, x_mid = 0.5 * (ymin + ymax), 0.5 * (xmin + xmax)
    side = np.sign(xy[:, 1] - y_mid)
    crossed = np.flatnonzero((side[:-1] != side[1:]) | (side[1:] == 0))
    if len(crossed) == 0:
        return "none"
    k = crossed[-1]
    x_cross = 0.5 * (xy[k, 0] + xy[k + 1, 0])
    return "left" if x_cross < x_mid else "right"


class PointMazeEnv(gym.Env):
    """Point mass in a walled maze; observation [x, y, vx, vy]. See the module doc."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        maze_map: Sequence[str] | None = None,
        dt: float = 0.1,
        accel_scale: float = 10.0,
        max_speed: float = 2.0,
        agent_radius: float = 0.1,
        goal_radius: float = 0.45,
        success_bonus: float = 0.0,
        reset_noise: float = 0.1,
        render_mode: str | None = None,
        cell_px: int = 40,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if not 0.0 <= agent_radius < 0.5 or not 0.0 <= reset_noise < 0.5 - agent_radius:
            raise ValueError("need 0 <= agent_radius < 0.5 and 0 <= reset_noise < 0.5 - agent_radius")
        self.maze_map = tuple(DEFAULT_MAP if maze_map is None else maze_map)
        boxes, self.start, self.goal, self.width, self.height = parse_map(self.maze_map)
        self.walls = boxes  # (B, 4) wall cells [xmin, xmax, ymin, ymax]
        r = float(agent_radius)
        self._inflated = boxes + np.array([-r, r, -r, r])
        self.dt = float(dt)
        self.accel_scale = float(accel_scale)
        self.max_speed = float(max_speed)
        self.agent_radius = r
        self.goal_radius = float(goal_radius)
        self.success_bonus = float(success_bonus)
        self.reset_noise = float(reset_noise)
        self.render_mode = render_mode
        self.cell_px = int(cell_px)
        low = np.array([0.0, 0.0, -self.max_speed, -self.max_speed], dtype=np.float32)
        high = np.array([self.width, self.height, self.max_speed, self.max_speed], dtype=np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = self.start.copy()
        self.velocity = np.zeros(2, dtype=np.float64)

    # -- physics ----------------------------------------------------------------------------
    def _move_axis(self, pos: np.ndarray, delta: float, axis: int) -> tuple[float, bool]:
        """New coordinate along ``axis`` after moving by ``delta``, stopped by the first wall."""
        b = self._inflated
        lo, hi = (0, 1) if axis == 0 else (2, 3)  # this axis' box faces
        olo, ohi = (2, 3) if axis == 0 else (0, 1)  # the other axis' faces
        other = pos[1 - axis]
        x, new = float(pos[axis]), float(pos[axis] + delta)
        across = (b[:, olo] < other) & (other < b[:, ohi])  # boxes overlapping the motion line
        if delta > 0:
            hit = across & (x <= b[:, lo]) & (b[:, lo] < new)
            if hit.any():
                return float(b[hit, lo].min()), True
        elif delta < 0:
            hit = across & (x >= b[:, hi]) & (b[:, hi] > new)
            if hit.any():
                return float(b[hit, hi].max()), True
        return new, False

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.position, self.velocity]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position[:] = self.start
        if self.reset_noise > 0.0:
            self.position += self.np_random.uniform(-self.reset_noise, self.reset_noise, size=2)
        self.velocity[:] = 0.0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        self.velocity[:] = np.clip(self.velocity + self.dt * self.accel_scale * a, -self.max_speed, self.max_speed)
        for axis in (0, 1):
            self.position[axis], hit = self._move_axis(self.position, self.dt * self.velocity[axis], axis)
            if hit:
                self.velocity[axis] = 0.0
        dist = float(np.linalg.norm(self.position - self.goal))
        success = dist < self.goal_radius
        reward = -dist + (self.success_bonus if success else 0.0)
        return self._obs(), float(reward), bool(success), False, {"success": bool(success), "distance": dist}

    # -- rendering ------------------------------------------------------------------------------
    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        px = self.cell_px
        img = np.full((self.height * px, self.width * px, 3), 255, dtype=np.uint8)
        for r, row in enumerate(self.maze_map):
            for c, ch in enumerate(row):
                if ch == "#":
                    img[r * px : (r + 1) * px, c * px : (c + 1) * px] = (70, 70, 80)

        def to_px(p: np.ndarray) -> tuple[float, float]:  # y points up in the image
            return p[0] * px, (self.height - p[1]) * px

        disc(img, *to_px(self.goal), self.goal_radius * px, (90, 190, 100))
        disc(img, *to_px(self.position), max(3.0, self.agent_radius * px), (40, 90, 200))
        return img


if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="genrl_envs.maze:PointMazeEnv", max_episode_steps=MAX_EPISODE_STEPS)


ROBOTICS_ENV_ID = "genrl/RoboticsPointMaze-v0"


def robotics_map(maze_map: Sequence[str] = DEFAULT_MAP) -> list[list[Any]]:
    """``maze_map`` in gymnasium-robotics' notation: 1 wall, 0 free, "r" the reset cell, "g" the goal."""
    code = {"#": 1, ".": 0, "S": "r", "s": "r", "G": "g", "g": "g"}
    return [[code[ch] for ch in row] for row in maze_map]


def register_robotics_maze() -> None:
    """Register ``genrl/RoboticsPointMaze-v0``: gymnasium-robotics' MuJoCo PointMaze on this
    module's two-route map, ending at the goal (``continuing_task=False``), 300 steps (its UMaze
    limit). Call after gymnasium-robotics has registered its own ids."""
    if ROBOTICS_ENV_ID not in gym.registry:
        gym.register(
            ROBOTICS_ENV_ID,
            entry_point="gymnasium_robotics.envs.maze.point_maze:PointMazeEnv",
            kwargs={"maze_map": robotics_map(), "continuing_task": False, "reset_target": False, "reward_type": "dense"},
            max_episode_steps=300,
        )

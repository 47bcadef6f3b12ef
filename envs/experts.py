"""Scripted experts and demonstration recording for behaviour cloning.

An expert acts on the env's raw observations (``Expert``); ``record_demos`` runs one in a
gymnasium env and returns the episodes as flat numpy arrays (the layout of ``genrl.datasets``).

* ``genrl/PointMaze-v0`` (``MazeExpert``): PD control towards waypoints round the left or the
  right of the central block, then to the goal; the route is drawn per episode (``p_left``), so
  the demonstrations are bimodal. Episode info: ``route`` (planned) and ``route_taken``.
* ``genrl/RoboticsPointMaze-v0`` (gymnasium-robotics' MuJoCo PointMaze on the same two-route map)
  and any gymnasium-robotics ``PointMaze_*`` id (``RoboticsMazeExpert``): a breadth-first planner
  on the maze's cells picks, per episode, one of the shortest routes (left or right where there
  are two, ``p_left``) and a PD controller follows its cell centres, then the goal.
* OGBench ``cube-single-v0`` and its single-task ids ``cube-single-singletask[-taskK]-v0``
  (``CubeExpert``): OGBench's own Markov pick-and-place oracle (the one behind its "noisy"
  datasets), fed from the observation vector and the task's goal observation (``info["goal"]``
  at reset). The env runs in OGBench's evaluation (task) mode; cube-single-v0 cycles through
  tasks 1..5 (``reset(options={"task_id": k})``), the single-task ids fix theirs. Episode info:
  ``task_id``. Needs ``pip install ogbench``.

Episode ``i`` resets the env with seed ``seed + i`` and gives the expert
``np.random.default_rng([seed, i])``, so every episode replays on its own.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from genrl_envs.base import EnvError
from genrl_envs.maze import DEFAULT_MAP, interior_block, parse_map, route_taken
from genrl_envs.maze import ENV_ID as MAZE_ID
from genrl_envs.maze import ROBOTICS_ENV_ID as ROBOTICS_MAZE_ID

CUBE_GOAL_CONDITIONED = "cube-single-v0"
CUBE_SINGLE_TASK = ("cube-single-singletask-v0", *(f"cube-single-singletask-task{k}-v0" for k in range(1, 6)))
ROBOTICS_MAZES = (ROBOTICS_MAZE_ID, "PointMaze_UMaze-v3", "PointMaze_Open-v3", "PointMaze_Medium-v3", "PointMaze_Large-v3")
SUPPORTED_ENVS = (MAZE_ID, *ROBOTICS_MAZES, CUBE_GOAL_CONDITIONED, *CUBE_SINGLE_TASK)


class Expert(Protocol):
    """A scripted controller: ``reset`` once per episode, then ``act`` on every observation."""

    name: str

    def reset(self, obs: np.ndarray, info: dict[str, Any], rng: np.random.Generator) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...

    def episode_info(self, observations: np.ndarray) -> dict[str, Any]:
        """JSON-able facts about the episode just played (``observations``: all of them, the final one included)."""
        ...


@dataclass
class _WaypointExpert:
    """What the point-mass experts share: the route draw (``p_left``), per-episode action noise
    (a level xi ~ U(0, ``noise``) per episode, N(0, xi^2) on every action) and the PD controller
    that follows waypoints, switching to the next one within ``switch_radius``."""

    p_left: float = 0.5
    kp: float = 1.0
    kd: float = 0.0
    switch_radius: float = 0.5
    noise: float = 0.0

    def _check(self, what: str, extra_ok: bool = True, extra: str = "") -> None:
        if not 0.0 <= self.p_left <= 1.0 or self.noise < 0.0 or self.switch_radius <= 0.0 or not extra_ok:
            raise EnvError(f"{what}: need 0 <= p_left <= 1, noise >= 0{extra} and switch_radius > 0")
        self._k, self._xi = 0, 0.0
        self._rng = np.random.default_rng(0)

    def _start_episode(self, rng: np.random.Generator) -> None:
        """After the route draw: back to the first waypoint, this episode's noise level."""
        self._k = 0
        self._xi = float(rng.uniform(0.0, self.noise)) if self.noise > 0 else 0.0
        self._rng = rng

    def _follow(self, waypoints: Any, pos: np.ndarray, vel: np.ndarray) -> np.ndarray:
        """Advance past waypoints closer than ``switch_radius``, then ``kp (waypoint - pos) - kd vel``
        plus the episode's noise, clipped to [-1, 1]."""
        while self._k < len(waypoints) - 1 and np.linalg.norm(waypoints[self._k] - pos) < self.switch_radius:
            self._k += 1
        action = self.kp * (waypoints[self._k] - pos) - self.kd * vel
        if self._xi > 0:
            action = action + self._rng.normal(0.0, self._xi, size=2)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


@dataclass
class MazeExpert(_WaypointExpert):
    """Waypoint PD controller for genrl/PointMaze-v0 (obs [x, y, vx, vy], action = acceleration).

    The waypoints are the corners of the corridor on the chosen side of the map's interior
    block: (side, start row), (side, goal row), then the goal; the controller switches to the
    next one within ``switch_radius``. Works for maps laid out like the default one (start below
    the block, goal above it, a free corridor on each side). ``noise``: each episode draws a level
    xi ~ U(0, noise) and adds N(0, xi^2) to every action.
    """

    kp: float = 2.0
    kd: float = 0.8
    maze_map: tuple[str, ...] = DEFAULT_MAP
    name: str = field(default="maze-waypoint-pd", init=False)

    def __post_init__(self) -> None:
        self._check("maze expert")
        self.maze_map = tuple(self.maze_map)
        _, start, goal, _, _ = parse_map(self.maze_map)
        self._block = interior_block(self.maze_map)
        xmin, xmax = self._block[:2]
        self._routes = {side: np.array([(x, start[1]), (x, goal[1]), tuple(goal)]) for side, x in (("left", xmin - 0.5), ("right", xmax + 0.5))}
        self.route = "left"

    def reset(self, obs: np.ndarray, info: dict[str, Any], rng: np.random.Generator) -> None:
        self.route = "left" if rng.random() < self.p_left else "right"
        self._start_episode(rng)

    def act(self, obs: np.ndarray) -> np.ndarray:
        pos, vel = np.asarray(obs[:2], dtype=np.float64), np.asarray(obs[2:4], dtype=np.float64)
        return self._follow(self._routes[self.route], pos, vel)

    def episode_info(self, observations: np.ndarray) -> dict[str, Any]:
        return {"route": self.route, "route_taken": route_taken(observations, self._block)}

    def config(self) -> dict[str, Any]:
        return {**asdict(self), "maze_map": list(self.maze_map)}


def _neighbours(cell: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    r, c = cell
    return (r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)


@dataclass
class RoboticsMazeExpert(_WaypointExpert):
    """Planner + PD controller for gymnasium-robotics' PointMaze (flattened observation
    [achieved_goal (2), desired_goal (2), x, y, vx, vy], action = force in [-1, 1]^2).

    At reset a breadth-first search from the goal's cell gives every free cell its distance; the
    route starts with one of the start cell's neighbours that lie on a shortest path (the left one
    with probability ``p_left`` when there are two, on either side of the start) and then descends
    the distances; the controller aims ``kp (target - x) - kd v`` at each cell centre in turn
    (switching within ``switch_radius``) and finally at the goal. ``maze_map``: the env's map
    (rows of 1 wall / 0 free / "r" reset / "g" goal / "c" either), ``scaling`` its cell size.
    """

    kp: float = 10.0
    kd: float = 1.0
    switch_radius: float = 0.3
    maze_map: tuple[tuple[Any, ...], ...] = ()
    scaling: float = 1.0
    name: str = field(default="robotics-maze-bfs-pd", init=False)

    def __post_init__(self) -> None:
        self._check("robotics maze expert", bool(self.maze_map) and self.scaling > 0.0, ", a maze_map, scaling > 0")
        self.maze_map = tuple(tuple(row) for row in self.maze_map)
        self._rows, self._cols = len(self.maze_map), len(self.maze_map[0])
        self._path: list[tuple[int, int]] = []
        self.route = "none"
        self._goal = np.zeros(2)

    def _xy(self, cell: tuple[int, int]) -> np.ndarray:
        """gymnasium-robotics' ``Maze.cell_rowcol_to_xy``: the map centred on the origin, y up."""
        r, c = cell
        return np.array([(c + 0.5) * self.scaling - self._cols * self.scaling / 2, self._rows * self.scaling / 2 - (r + 0.5) * self.scaling])

    def _cell(self, xy: np.ndarray) -> tuple[int, int]:
        return (int(np.floor((self._rows * self.scaling / 2 - xy[1]) / self.scaling)), int(np.floor((xy[0] + self._cols * self.scaling / 2) / self.scaling)))

    def _free(self, cell: tuple[int, int]) -> bool:
        r, c = cell
        return 0 <= r < self._rows and 0 <= c < self._cols and self.maze_map[r][c] != 1

    def reset(self, obs: np.ndarray, info: dict[str, Any], rng: np.random.Generator) -> None:
        o = np.asarray(obs, dtype=np.float64)
        self._goal = o[2:4].copy()
        start, goal = self._cell(o[4:6]), self._cell(self._goal)
        dist = {goal: 0}
        frontier = [goal]
        while frontier:  # breadth-first distances from the goal cell
            nxt = []
            for cell in frontier:
                for n in _neighbours(cell):
                    if self._free(n) and n not in dist:
                        dist[n] = dist[cell] + 1
                        nxt.append(n)
            frontier = nxt
        if start not in dist:
            raise EnvError(f"robotics maze expert: no path from cell {start} to the goal's cell {goal}")

        def steps(cell: tuple[int, int]) -> list[tuple[int, int]]:  # the neighbours one step closer to the goal
            return [n for n in _neighbours(cell) if dist.get(n) == dist[cell] - 1]

        path = [start]
        first = sorted(steps(start), key=lambda n: n[1])  # by column: left first
        if first:
            left = rng.random() < self.p_left
            pick = first[0] if left or len(first) == 1 else first[-1]
            self.route = ("left" if pick[1] < start[1] else "right") if pick[1] != start[1] else "straight"
            path.append(pick)
        while dist[path[-1]] > 0:
            path.append(steps(path[-1])[0])
        self._path = path[1:]
        self._start_episode(rng)

    def act(self, obs: np.ndarray) -> np.ndarray:
        o = np.asarray(obs, dtype=np.float64)
        return self._follow([self._xy(c) for c in self._path[:-1]] + [self._goal], o[4:6], o[6:8])

    def episode_info(self, observations: np.ndarray) -> dict[str, Any]:
        xy = np.asarray(observations, dtype=np.float64)[:, 4:6]
        start = xy[0, 0]
        side = "none" if len(xy) < 2 else ("left" if xy[:, 0].min() < start - 0.5 * self.scaling else "right" if xy[:, 0].max() > start + 0.5 * self.scaling else "none")
        return {"route": self.route, "route_taken": side}

    def config(self) -> dict[str, Any]:
        return {**asdict(self), "maze_map": [list(r) for r in self.maze_map]}


#: OGBench's arm sampling box (``ManipSpaceEnv._arm_sampling_bounds``): where the oracle parks the arm after a placement
_ARM_BOUNDS = np.array([[0.25, -0.35, 0.20], [0.6, 0.35, 0.35]])
_XYZ_CENTER = np.array([0.425, 0.0, 0.0])  # OGBench's state observation: (xyz - centre) * 10


def _cube_state(obs: np.ndarray) -> dict[str, np.ndarray]:
    """The oracle's ``info`` keys, decoded from a cube-single state observation (28 values)."""
    o = np.asarray(obs, dtype=np.float64)
    if o.shape != (28,):
        raise EnvError(f"cube expert: expected a cube-single state observation of 28 values, got shape {o.shape}")
    return {
        "proprio/effector_pos": o[12:15] / 10.0 + _XYZ_CENTER,
        "proprio/effector_yaw": np.array([np.arctan2(o[16], o[15])]),
        "proprio/gripper_opening": o[17:18] / 3.0,
        "proprio/gripper_contact": o[18:19],
        "privileged/block_0_pos": o[19:22] / 10.0 + _XYZ_CENTER,
        "privileged/block_0_yaw": np.array([np.arctan2(o[27], o[26])]),
    }


@dataclass
class CubeExpert:
    """OGBench's ``CubeMarkovOracle`` on cube-single state observations.

    The target pose comes from the goal observation OGBench returns at reset (``info["goal"]``).
    ``noise``: OGBench's data-collection noise, a level xi ~ U(0, noise) per episode and
    N(0, [xi, xi, xi, 3 xi, 10 xi]^2) added to every action (0: the clean oracle).
    """

    min_norm: float = 0.4
    noise: float = 0.0
    name: str = field(default="ogbench-cube-markov", init=False)

    def __post_init__(self) -> None:
        if self.min_norm < 0.0 or self.noise < 0.0:
            raise EnvError("cube expert: need min_norm >= 0 and noise >= 0")
        try:
            from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
        except ImportError:
            raise EnvError("the cube expert needs OGBench: pip install ogbench") from None
        stub_env = types.SimpleNamespace(unwrapped=types.SimpleNamespace(_arm_sampling_bounds=_ARM_BOUNDS))
        self._oracle = CubeMarkovOracle(env=stub_env, min_norm=self.min_norm)
        self._target: dict[str, Any] = {}
        self._xi = 0.0
        self._rng = np.random.default_rng(0)

    def reset(self, obs: np.ndarray, info: dict[str, Any], rng: np.random.Generator) -> None:
        if "goal" not in info:
            raise EnvError("cube expert: the env gave no goal observation at reset (use OGBench's task mode)")
        goal = _cube_state(info["goal"])
        self._target = {
            "privileged/target_block": 0,
            "privileged/target_block_pos": goal["privileged/block_0_pos"],
            "privileged/target_block_yaw": goal["privileged/block_0_yaw"],
        }
        saved = np.random.get_state()  # the oracle draws its parking pose from numpy's global RNG
        self._oracle.reset(obs, info)
        np.random.set_state(saved)
        self._oracle._final_pos = rng.uniform(*_ARM_BOUNDS)
        self._oracle._final_yaw = rng.uniform(-np.pi, np.pi)
        self._xi = float(rng.uniform(0.0, self.noise)) if self.noise > 0 else 0.0
        self._rng = rng

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = np.asarray(self._oracle.select_action(obs, {**_cube_state(obs), **self._target}), dtype=np.float64)
        if self._xi > 0:
            action = action + self._rng.normal(0.0, self._xi * np.array([1.0, 1.0, 1.0, 3.0, 10.0]))
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def episode_info(self, observations: np.ndarray) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _quiet_boxes() -> Iterator[None]:
    """Silence gymnasium's float64 -> float32 Box warning (OGBench builds a new float64 action box on every access)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")
        yield


def make_demo_env(env_id: str, env_kwargs: dict[str, Any] | None = None, max_steps: int | None = None) -> gym.Env:
    """The gymnasium env ``record_demos`` uses for ``env_id`` (EnvError if no expert exists for it)."""
    if env_id not in SUPPORTED_ENVS:
        raise EnvError(f"no scripted expert for '{env_id}'; supported: {', '.join(SUPPORTED_ENVS)}")
    if env_id in ROBOTICS_MAZES:
        from genrl_envs.gym import check_env_id

        check_env_id(env_id)  # registers gymnasium-robotics' ids (and genrl's) when it is installed
        if env_id not in gym.registry:
            raise EnvError(f"'{env_id}' needs gymnasium-robotics: pip install gymnasium-robotics")
    elif env_id != MAZE_ID:
        try:
            import ogbench.manipspace  # noqa: F401  registers the cube ids
        except ImportError:
            raise EnvError(f"'{env_id}' needs OGBench: pip install ogbench") from None
    if max_steps is not None and max_steps < 1:
        raise EnvError(f"max_steps must be >= 1, got {max_steps}")
    extra = {} if max_steps is None else {"max_episode_steps": int(max_steps)}
    try:
        with _quiet_boxes():
            env = gym.make(env_id, **(env_kwargs or {}), **extra)
        # Dict observations flattened exactly as genrl's training envs do (envs.gym._make_flat)
        return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env
    except (TypeError, ValueError, AssertionError) as exc:
        raise EnvError(f"cannot make '{env_id}' with env_kwargs {env_kwargs or {}}: {exc}") from None


def make_expert(env_id: str, env_kwargs: dict[str, Any] | None = None, **options: Any) -> Expert:
    """The scripted expert for ``env_id``; ``options`` are its dataclass fields (e.g. p_left, noise)."""
    if env_id not in SUPPORTED_ENVS:
        raise EnvError(f"no scripted expert for '{env_id}'; supported: {', '.join(SUPPORTED_ENVS)}")
    try:
        if env_id == MAZE_ID:
            maze_map = (env_kwargs or {}).get("maze_map") or DEFAULT_MAP
            return MazeExpert(maze_map=tuple(maze_map), **options)
        if env_id in ROBOTICS_MAZES:
            make_demo_env(env_id).close()  # registers the id (or says what to install)
            kwargs = {**gym.spec(env_id).kwargs, **(env_kwargs or {})}
            maze_map = kwargs.get("maze_map")
            if maze_map is None:
                raise EnvError(f"'{env_id}' has no maze_map to plan on (pass it in env_kwargs)")
            return RoboticsMazeExpert(maze_map=tuple(tuple(r) for r in maze_map), scaling=float(kwargs.get("maze_size_scaling", 1.0)), **options)
        return CubeExpert(**options)
    except TypeError as exc:
        raise EnvError(f"bad expert option for '{env_id}': {exc}") from None


def _reset_options(env_id: str, episode: int) -> dict[str, Any] | None:
    """OGBench's goal-conditioned cube env: evaluation task ``1 + episode % 5``."""
    return {"task_id": 1 + episode % 5} if env_id == CUBE_GOAL_CONDITIONED else None


def record_demos(
    env_id: str,
    n_episodes: int,
    seed: int = 0,
    expert: Expert | None = None,
    env_kwargs: dict[str, Any] | None = None,
    max_steps: int | None = None,
    expert_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Play ``n_episodes`` of ``expert`` (default: ``make_expert(env_id, ...)``) and return them.

    Returns ``obs`` (T, O) float32, ``actions`` (T, A) float32 (as sent to the env, clipped to the
    action box), ``rewards`` (T,) float32, ``episode_ends`` (E,) int64 cumulative ends,
    ``success`` (E,) bool (``info["success"]`` at the last step), ``lengths`` (E,) int64, and
    ``meta``: env_id, env_kwargs, expert (name and settings), seed, max_episode_steps and
    ``episodes`` (per-episode info: seed, task_id where the env has one, the expert's facts).
    Row t holds the observation before action t and the reward after it.
    """
    if n_episodes < 1:
        raise EnvError(f"n_episodes must be >= 1, got {n_episodes}")
    with _quiet_boxes():
        env = make_demo_env(env_id, env_kwargs, max_steps)
        try:
            if expert is None:
                expert = make_expert(env_id, env_kwargs, **(expert_options or {}))
            data = _play(env, env_id, expert, n_episodes, seed)
        finally:
            env.close()
    config = expert.config() if hasattr(expert, "config") else {}
    data["meta"] = {
        "env_id": env_id,
        "env_kwargs": dict(env_kwargs or {}),
        "expert": {"name": getattr(expert, "name", type(expert).__name__), **config},
        "seed": seed,
        "max_episode_steps": env.spec.max_episode_steps if env.spec is not None else None,
        "episodes": data.pop("episodes"),
    }
    return data


def _play(env: gym.Env, env_id: str, expert: Expert, n_episodes: int, seed: int) -> dict[str, Any]:
    """The episodes of ``record_demos`` (its arrays, and ``episodes``: the per-episode facts)."""
    low, high = env.action_space.low, env.action_space.high
    obs_rows: list[np.ndarray] = []
    act_rows: list[np.ndarray] = []
    rew_rows: list[float] = []
    lengths: list[int] = []
    success: list[bool] = []
    episodes: list[dict[str, Any]] = []
    for i in range(n_episodes):
        obs, info = env.reset(seed=seed + i, options=_reset_options(env_id, i))
        expert.reset(obs, info, np.random.default_rng([seed, i]))
        trajectory = [np.asarray(obs)]
        done, info = False, {}
        while not done:
            action = np.clip(np.asarray(expert.act(obs), dtype=np.float32), low, high)
            next_obs, reward, terminated, truncated, info = env.step(action)
            obs_rows.append(np.asarray(obs, dtype=np.float32))
            act_rows.append(action)
            rew_rows.append(float(reward))
            obs, done = next_obs, bool(terminated or truncated)
            trajectory.append(np.asarray(obs))
        lengths.append(len(trajectory) - 1)
        success.append(bool(info.get("success", False)))
        episode: dict[str, Any] = {"seed": seed + i}
        task_id = getattr(env.unwrapped, "cur_task_id", None)
        if task_id is not None:
            episode["task_id"] = int(task_id)
        episode.update(expert.episode_info(np.stack(trajectory)))
        episodes.append(episode)
    return {
        "obs": np.stack(obs_rows),
        "actions": np.stack(act_rows),
        "rewards": np.asarray(rew_rows, dtype=np.float32),
        "episode_ends": np.cumsum(lengths).astype(np.int64),
        "success": np.asarray(success, dtype=bool),
        "lengths": np.asarray(lengths, dtype=np.int64),
        "episodes": episodes,
    }

"""Demonstration datasets: one safetensors file per dataset, and Diffusion Policy style windows.

File format "genrl-demos", version 1: a single ``.safetensors`` file. T steps in all, E episodes
stored back to back in order, O observation dim, A action dim. Tensors:

    obs           float32 (T, O)  row t: the observation before action t
    actions       float32 (T, A)  row t: the action taken (as sent to the env)
    rewards       float32 (T,)    row t: the reward received after action t
    episode_ends  int64   (E,)    cumulative ends (robomimic / Diffusion Policy ``episode_ends``):
                                  episode i is rows episode_ends[i-1] .. episode_ends[i] - 1,
                                  episode 0 starts at row 0; strictly increasing, the last is T
    success       uint8   (E,)    1 if the episode reached its goal, else 0 (bool is read too)

The observation after an episode's last action is not stored. Other float dtypes are read and
converted to float32; extra tensors are ignored. Header metadata (safetensors ``__metadata__``,
str -> str): ``format`` = ``genrl-demos`` and ``version`` = ``1`` as plain strings; every other
value is JSON text (``json.dumps``):

    env_id             str        gymnasium id of the demos' env (required)
    obs_dim            int        O (required)
    action_dim         int        A (required)
    n_episodes         int        E (required)
    env_kwargs         object     gymnasium.make keyword arguments (default {})
    expert             object     {"name": ..., its settings} of what produced the demos (default {})
    seed               int|null   seed of the recording (default null)
    max_episode_steps  int|null   the env's time limit (default null)
    episodes           list       E objects of per-episode facts, e.g. {"seed": 3, "route": "left"}

Other keys are kept in ``Demos.meta``. Writing one from your own data (``save_demos`` does the
same after checking everything, and writes atomically):

    import json
    from safetensors.numpy import save_file
    meta = {"env_id": "genrl/PointMaze-v0", "obs_dim": 4, "action_dim": 2, "n_episodes": 2}
    save_file({"obs": obs, "actions": actions, "rewards": rewards,
               "episode_ends": np.array([40, 75], dtype=np.int64), "success": np.array([1, 1], dtype=np.uint8)},
              "demos.safetensors", metadata={"format": "genrl-demos", "version": "1", **{k: json.dumps(v) for k, v in meta.items()}})

Windows (``ChunkDataset``, Diffusion Policy's conventions): for step t of an episode starting at
row s and ending before row e, the observation history is rows max(t - n_obs_steps + 1 + k, s),
k = 0 .. n_obs_steps - 1 (the first observation repeated before the start), flattened
oldest-first to (n_obs_steps * O,); the action chunk is rows min(t + j, e - 1), j = 0 .. horizon - 1
(the last action repeated past the end), flattened time-major to (horizon * A,).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genrl.errors import GenrlError

FORMAT = "genrl-demos"
VERSION = 1
TENSORS = ("obs", "actions", "rewards", "episode_ends", "success")
REQUIRED_META = ("env_id", "obs_dim", "action_dim", "n_episodes")


class DatasetError(GenrlError):
    """A missing, unreadable, foreign or inconsistent demonstrations file."""


@dataclass(frozen=True)
class Demos:
    """A demonstrations dataset in memory (numpy arrays, shapes as in the module doc)."""

    obs: np.ndarray  # (T, O) float32
    actions: np.ndarray  # (T, A) float32
    rewards: np.ndarray  # (T,) float32
    episode_ends: np.ndarray  # (E,) int64 cumulative ends
    success: np.ndarray  # (E,) bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return int(self.obs.shape[0])

    @property
    def n_episodes(self) -> int:
        return int(self.episode_ends.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_starts(self) -> np.ndarray:
        """(E,) first row of each episode."""
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return (self.episode_ends - self.episode_starts).astype(np.int64)

    @property
    def env_id(self) -> str:
        return str(self.meta["env_id"])

    @property
    def env_kwargs(self) -> dict[str, Any]:
        return dict(self.meta.get("env_kwargs") or {})

    @property
    def episodes(self) -> list[dict[str, Any]]:
        """Per-episode facts (``meta["episodes"]``), one dict per episode."""
        return list(self.meta.get("episodes") or [{} for _ in range(self.n_episodes)])

    def episode(self, i: int) -> slice:
        """Rows of episode ``i``."""
        return slice(int(self.episode_starts[i]), int(self.episode_ends[i]))

    def select(self, episodes: Any) -> Demos:
        """The dataset restricted to ``episodes`` (indices or an (E,) bool mask), e.g. ``demos.select(demos.success)``."""
        idx = np.arange(self.n_episodes)[np.asarray(episodes)]
        if idx.size == 0:
            raise DatasetError("select: no episodes chosen")
        rows = np.concatenate([np.arange(self.episode_starts[i], self.episode_ends[i]) for i in idx])
        every = self.episodes
        meta = {**self.meta, "n_episodes": int(idx.size), "episodes": [every[i] for i in idx]}
        ends = np.cumsum(self.lengths[idx]).astype(np.int64)
        return Demos(self.obs[rows], self.actions[rows], self.rewards[rows], ends, self.success[idx], meta)


def _validate(t: dict[str, np.ndarray], meta: dict[str, Any], where: str) -> Demos:
    """A ``Demos`` from raw arrays and metadata; DatasetError (one line) at the first inconsistency."""
    missing = [k for k in TENSORS if k not in t]
    if missing:
        raise DatasetError(f"{where} lacks tensor(s) {', '.join(missing)}")
    obs, actions, rewards, ends, success = (np.asarray(t[k]) for k in TENSORS)
    for name, arr, ndim in (("obs", obs, 2), ("actions", actions, 2), ("rewards", rewards, 1)):
        if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.floating):
            raise DatasetError(f"{where}: {name} must be a {ndim}-D float array, got {arr.dtype} {tuple(arr.shape)}")
    n = obs.shape[0]
    if n == 0 or actions.shape[0] != n or rewards.shape[0] != n:
        raise DatasetError(f"{where}: obs, actions and rewards need the same number of rows (>= 1), got {n}, {actions.shape[0]}, {rewards.shape[0]}")
    if ends.ndim != 1 or ends.size == 0 or not np.issubdtype(ends.dtype, np.integer):
        raise DatasetError(f"{where}: episode_ends must be a non-empty 1-D integer array, got {ends.dtype} {tuple(ends.shape)}")
    if ends[0] < 1 or np.any(np.diff(ends) < 1):
        raise DatasetError(f"{where}: episode_ends must be strictly increasing from >= 1 (every episode has a step)")
    if int(ends[-1]) != n:
        raise DatasetError(f"{where}: episode_ends ends at {int(ends[-1])} but there are {n} steps")
    if success.shape != ends.shape or not (success.dtype == np.bool_ or np.issubdtype(success.dtype, np.integer)) or np.any((success != 0) & (success != 1)):
        raise DatasetError(f"{where}: success must hold one 0/1 (or bool) value per episode ({ends.size}), got {success.dtype} {tuple(success.shape)}")
    for name, arr in (("obs", obs), ("actions", actions), ("rewards", rewards)):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DatasetError(f"{where}: {name} holds NaN/inf values (first at row {int(np.argwhere(bad)[0][0])})")
    absent = [k for k in REQUIRED_META if k not in meta]
    if absent:
        raise DatasetError(f"{where}: metadata lacks {', '.join(absent)}")
    if not isinstance(meta["env_id"], str) or not isinstance(meta.get("env_kwargs", {}), dict):
        raise DatasetError(f"{where}: metadata env_id must be a string and env_kwargs an object")
    for key, value in (("obs_dim", obs.shape[1]), ("action_dim", actions.shape[1]), ("n_episodes", ends.size)):
        if meta[key] != value:
            raise DatasetError(f"{where}: metadata {key} is {meta[key]!r} but the tensors give {value}")
    episodes = meta.get("episodes")
    if episodes is not None and (not isinstance(episodes, list) or len(episodes) != ends.size or not all(isinstance(e, dict) for e in episodes)):
        raise DatasetError(f"{where}: metadata episodes must be a list of {ends.size} objects")
    meta = {"env_kwargs": {}, "expert": {}, "seed": None, "max_episode_steps": None, **meta}
    return Demos(obs.astype(np.float32), actions.astype(np.float32), rewards.astype(np.float32), ends.astype(np.int64), success.astype(bool), meta)


def save_demos(path: str | Path, data: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Check and write ``data`` (the five tensors; its ``meta`` entry, if any, under ``meta``) to ``path`` atomically.

    obs_dim, action_dim and n_episodes are filled in from the arrays when absent.
    """
    path = Path(path)
    meta = {**(data.get("meta") or {}), **(meta or {})}
    for key in ("format", "version"):
        meta.pop(key, None)
    arrays = {k: np.asarray(data[k]) for k in TENSORS if k in data}
    if all(k in arrays for k in ("obs", "actions", "episode_ends")) and arrays["obs"].ndim == 2 == arrays["actions"].ndim:
        meta.setdefault("obs_dim", int(arrays["obs"].shape[1]))
        meta.setdefault("action_dim", int(arrays["actions"].shape[1]))
        meta.setdefault("n_episodes", int(arrays["episode_ends"].shape[0]))
    demos = _validate(arrays, meta, "demos")
    try:
        header = {"format": FORMAT, "version": str(VERSION), **{k: json.dumps(v, allow_nan=False) for k, v in demos.meta.items()}}
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"demos metadata is not JSON-serialisable: {exc}") from None
    tensors = {"obs": demos.obs, "actions": demos.actions, "rewards": demos.rewards, "episode_ends": demos.episode_ends, "success": demos.success.astype(np.uint8)}
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=header)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # safetensors writes 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(header metadata, tensors) of a safetensors file; DatasetError if it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise DatasetError(f"demos file {path} not found")
    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                return header, {}
            return header, {k: f.get_tensor(k) for k in f.keys() if k in TENSORS}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DatasetError(f"{path} is not a readable safetensors file ({reason})") from None


def is_demos_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file whose header says format genrl-demos."""
    try:
        return _read(Path(path))[0].get("format") == FORMAT
    except DatasetError:
        return False


def load_demos(path: str | Path) -> Demos:
    """Read and check a genrl-demos file; DatasetError (one line) if it is missing, foreign, of
    another version, inconsistent or holds NaN/inf."""
    path = Path(path)
    header, tensors = _read(path)
    if header.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a genrl demos file (format {header.get('format')!r}, expected '{FORMAT}')")
    if header.get("version") != str(VERSION):
        raise DatasetError(f"{path} has demos format version {header.get('version')!r}; this genrl reads version {VERSION}")
    meta: dict[str, Any] = {}
    for key, text in header.items():
        if key not in ("format", "version"):
            try:
                meta[key] = json.loads(text)
            except json.JSONDecodeError:
                raise DatasetError(f"{path}: metadata {key!r} is not JSON") from None
    return _validate(tensors, meta, str(path))


def window_index(rows: Tensor, starts: Tensor, ends: Tensor, n_obs_steps: int, horizon: int) -> tuple[Tensor, Tensor]:
    """Row indices (B, n_obs_steps) of the observation histories and (B, horizon) of the action
    chunks of steps ``rows`` (B,); ``starts``/``ends`` (T,): first row and end (exclusive) of each row's episode."""
    s, e = starts[rows][:, None], ends[rows][:, None]
    past = torch.arange(1 - n_obs_steps, 1, device=rows.device)
    ahead = torch.arange(horizon, device=rows.device)
    return torch.maximum(rows[:, None] + past, s), torch.minimum(rows[:, None] + ahead, e - 1)


def windows(demos: Demos, n_obs_steps: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """(obs_index (T, n_obs_steps), action_index (T, horizon)): the rows of every step's window."""
    ds = ChunkDataset(demos, n_obs_steps, horizon)
    obs_i, act_i = window_index(torch.arange(demos.n_steps), ds.starts, ds.ends, n_obs_steps, horizon)
    return obs_i.numpy(), act_i.numpy()


class ChunkDataset(torch.utils.data.Dataset):
    """Every step of every episode as (observation history, action chunk), flattened (module doc).

    ``ds[t]`` gives one pair; ``ds.sample(batch_size, generator)`` a uniform random batch
    (B, n_obs_steps * O), (B, horizon * A) by index arithmetic on ``device``.
    """

    def __init__(self, demos: Demos, n_obs_steps: int = 2, horizon: int = 16, device: str | torch.device = "cpu") -> None:
        if n_obs_steps < 1 or horizon < 1:
            raise DatasetError(f"n_obs_steps and horizon must be >= 1, got {n_obs_steps} and {horizon}")
        self.n_obs_steps, self.horizon = int(n_obs_steps), int(horizon)
        self.obs = torch.as_tensor(demos.obs, device=device)
        self.actions = torch.as_tensor(demos.actions, device=device)
        lengths = torch.as_tensor(demos.lengths, device=device)
        self.starts = torch.repeat_interleave(torch.as_tensor(demos.episode_starts, device=device), lengths)  # (T,)
        self.ends = torch.repeat_interleave(torch.as_tensor(demos.episode_ends, device=device), lengths)  # (T,)

    @property
    def obs_dim(self) -> int:
        """Flattened observation-history size, n_obs_steps * O."""
        return self.n_obs_steps * int(self.obs.shape[1])

    @property
    def action_dim(self) -> int:
        """Flattened action-chunk size, horizon * A."""
        return self.horizon * int(self.actions.shape[1])

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def get(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Windows of steps ``rows`` (B,): obs (B, n_obs_steps * O), actions (B, horizon * A)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.obs.device).reshape(-1)
        obs_i, act_i = window_index(rows, self.starts, self.ends, self.n_obs_steps, self.horizon)
        return self.obs[obs_i].reshape(len(rows), -1), self.actions[act_i].reshape(len(rows), -1)

    def __getitem__(self, t: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= t < len(self):
            raise IndexError(f"step {t} out of range for {len(self)} steps")
        obs, actions = self.get(torch.tensor([t % len(self)]))
        return obs[0], actions[0]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``batch_size`` windows at uniformly drawn steps (``generator`` on the dataset's device, or None)."""
        rows = torch.randint(len(self), (batch_size,), generator=generator, device=self.obs.device)
        return self.get(rows)


@dataclass
class Normalizer:
    """Per-dimension affine map x -> x * scale + offset (Diffusion Policy's LinearNormalizer).

    ``fit(x, "limits")`` maps each column's [min, max] to [-1, 1]; "gaussian" to zero mean, unit
    std; constant columns are only shifted. ``normalize``/``unnormalize`` take (..., D) or a
    flattened window (..., k * D).
    """

    scale: Tensor  # (D,)
    offset: Tensor  # (D,)

    @classmethod
    def fit(cls, x: Any, mode: str = "limits", eps: float = 1e-4) -> Normalizer:
        x = torch.as_tensor(x, dtype=torch.float32)
        x = x.reshape(-1, x.shape[-1])
        if mode == "limits":
            lo, hi = x.min(0).values, x.max(0).values
            flat = (hi - lo) < eps
            scale = torch.where(flat, torch.ones_like(lo), 2.0 / (hi - lo).clamp_min(eps))
            offset = torch.where(flat, -lo, -1.0 - scale * lo)
        elif mode == "gaussian":
            mean, std = x.mean(0), x.std(0, unbiased=False)
            scale = torch.where(std < eps, torch.ones_like(std), 1.0 / std.clamp_min(eps))
            offset = -mean * scale
        else:
            raise DatasetError(f"unknown normalisation mode '{mode}'; valid: limits, gaussian")
        return cls(scale, offset)

    def _tiled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        d = self.scale.shape[0]
        if x.shape[-1] % d:
            raise DatasetError(f"normaliser of {d} dims cannot apply to a last dim of {x.shape[-1]}")
        k = x.shape[-1] // d
        return self.scale.to(x.device).repeat(k), self.offset.to(x.device).repeat(k)

    def normalize(self, x: Tensor) -> Tensor:
        scale, offset = self._tiled(x)
        return x * scale + offset

    def unnormalize(self, x: Tensor) -> Tensor:
        scale, offset = self._tiled(x)
        return (x - offset) / scale

    def state_dict(self) -> dict[str, Tensor]:
        """The two tensors; ``Normalizer(**state)`` rebuilds it."""
        return {"scale": self.scale.clone(), "offset": self.offset.clone()}

"""The replay buffer of the off-policy algorithms (``--algo sac``): transitions preallocated on the
device, uniform sampling by index with the algorithm's generator, n-step returns formed when a
batch is drawn, and a checkpointable state (the written rows). Shapes: N envs, O obs dim, A
action dim, B batch, R rows (one per env step, N transitions each), n the return horizon."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    obs: Tensor  # (B, O)
    action: Tensor  # (B, A)
    reward: Tensor  # (B,) the n-step return R_n
    next_obs: Tensor  # (B, O) the observation R_n bootstraps from
    discount: Tensor  # (B,) gamma^k (1 - terminated) for the k steps R_n spans


class ReplayBuffer:
    """Circular storage of transitions preallocated on a device: R rows of N transitions (one row
    per env step), sampled uniformly by index; no per-transition Python objects. Rows not yet
    written are never read (``torch.empty``: their memory is not touched until then)."""

    FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")

    def __init__(self, capacity: int, n_envs: int, obs_dim: int, action_dim: int, device: torch.device) -> None:
        self.rows, self.n_envs = capacity // n_envs, n_envs
        empty = lambda *shape, dtype=torch.float32: torch.empty(self.rows, n_envs, *shape, dtype=dtype, device=device)  # noqa: E731
        self.obs, self.next_obs, self.action, self.reward = empty(obs_dim), empty(obs_dim), empty(action_dim), empty()
        self.terminated, self.truncated = empty(dtype=torch.bool), empty(dtype=torch.bool)
        self.pos, self.full = 0, False

    def __len__(self) -> int:
        return (self.rows if self.full else self.pos) * self.n_envs

    def add(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor, terminated: Tensor, truncated: Tensor) -> None:
        """One env step: (N, O), (N, A), (N,), (N, O) (the true last obs where an episode ended), (N,), (N,)."""
        for name, value in zip(self.FIELDS, (obs, action, reward, next_obs, terminated, truncated), strict=True):
            getattr(self, name)[self.pos].copy_(value)
        self.pos = (self.pos + 1) % self.rows
        self.full = self.full or self.pos == 0

    def sample(self, batch_size: int, gamma: float, n_step: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(len(self), (batch_size,), generator=generator, device=self.obs.device)
        row, env = idx // self.n_envs, idx % self.n_envs
        obs, action = self.obs[row, env], self.action[row, env]
        if n_step == 1:
            return Batch(obs, action, self.reward[row, env], self.next_obs[row, env], gamma * (~self.terminated[row, env]).float())
        # n-step: steps k = 0..n-1 of the same env, up to and including the first episode end,
        # and no further than the newest stored row
        k = torch.arange(n_step, device=row.device)
        rows, envs = (row[:, None] + k) % self.rows, env[:, None]  # (B, n), (B, 1)
        stored = k <= ((self.pos - 1 - row) % self.rows)[:, None]  # not beyond the newest row (unwritten rows are garbage)
        ended = torch.where(stored, self.terminated[rows, envs] | self.truncated[rows, envs], True).int()
        used = stored & (ended.cumsum(1) - ended == 0)  # and no episode end before step k
        powers = gamma ** k.to(torch.float32)
        reward = torch.where(used, self.reward[rows, envs] * powers, 0.0).sum(1)
        last = used.sum(1) - 1
        last_row = rows.gather(1, last[:, None]).squeeze(1)
        discount = gamma * powers[last] * (~self.terminated[last_row, env]).float()
        return Batch(obs, action, reward, self.next_obs[last_row, env], discount)

    def state_dict(self) -> dict[str, Tensor]:
        """The written rows (views, no copy)."""
        n = self.rows if self.full else self.pos
        return {name: getattr(self, name)[:n] for name in self.FIELDS}

    def load_state_dict(self, tensors: dict[str, Tensor], pos: int, full: bool) -> None:
        for name in self.FIELDS:
            mine, saved = getattr(self, name), tensors[name]
            if saved.shape == mine.shape and saved.device == mine.device and saved.dtype == mine.dtype:
                setattr(self, name, saved)  # a full buffer: take the loaded tensor, no second copy
            else:
                mine[: saved.shape[0]].copy_(saved)
        self.pos, self.full = int(pos), bool(full)


__all__ = ["Batch", "ReplayBuffer"]

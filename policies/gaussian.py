"""Diagonal Gaussian policy: the simplest instance of the policy contract.

pi(a|s) = N(a; mu_theta(s), diag(sigma^2)), with a state-independent log sigma (the PPO
default for MuJoCo) or a state-dependent one. Actions are unbounded; the environment clips.
Shapes: B batch, A action dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genrl_policies.base import PolicyModule, check_detached
from genrl_policies.nets import LOG_SQRT_2PI, diag_gaussian_log_prob, mlp


@dataclass(frozen=True)
class GaussianConfig:
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the mean network."""
    activation: str = "tanh"
    log_std_init: float = 0.0
    """Initial log sigma of every action dimension."""
    state_dependent_std: bool = False
    """If true, log sigma is a second head of the network instead of a free parameter."""

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(int(h) <= 0 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")


@dataclass(frozen=True)
class GaussianRecord:
    action: Tensor  # (B, A) the sampled action, before any clipping by the env
    log_prob: Tensor  # (B,) log pi_old(action | obs)


class GaussianPolicy(PolicyModule):
    """Diagonal Gaussian policy; ``regularizer`` is the entropy."""

    family = "gaussian"
    config_class = GaussianConfig

    def __init__(self, obs_dim: int, action_dim: int, config: GaussianConfig | None = None) -> None:
        super().__init__(obs_dim, action_dim, config or GaussianConfig())
        cfg = self.config
        out = 2 * action_dim if cfg.state_dependent_std else action_dim
        self.net = mlp(obs_dim, tuple(cfg.hidden_sizes), out, cfg.activation, out_gain=0.01)
        if cfg.state_dependent_std:
            with torch.no_grad():
                self.net[-1].bias[action_dim:] = cfg.log_std_init
        else:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(cfg.log_std_init)))

    def distribution(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(mean (B, A), log_std (B, A) or (A,))."""
        out = self.net(obs)
        if self.config.state_dependent_std:
            return out[:, : self.action_dim], out[:, self.action_dim :]
        return out, self.log_std

    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, GaussianRecord]:
        self.check_obs(obs)
        mean, log_std = self.distribution(obs)
        if deterministic:
            action = mean
        else:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            action = mean + noise * log_std.exp()
        log_prob = diag_gaussian_log_prob(action, mean, log_std)
        return action.detach(), GaussianRecord(action.detach(), log_prob.detach())

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        mean, log_std = self.distribution(obs)
        return diag_gaussian_log_prob(action, mean, log_std)

    def log_ratio(self, obs: Tensor, record: GaussianRecord) -> Tensor:
        check_detached(record)
        self.check_obs(obs)
        return self.log_prob(obs, record.action) - record.log_prob

    def regularizer(self, obs: Tensor, record: GaussianRecord) -> Tensor:
        """Entropy of the Gaussian at ``obs``: sum_a (log sigma_a + 0.5 log(2 pi e)), shape (B,)."""
        if self.config.state_dependent_std:
            _, log_std = self.distribution(obs)
        else:
            log_std = self.log_std.expand(obs.shape[0], -1)
        return (log_std + LOG_SQRT_2PI + 0.5).sum(-1)

"""Diagonal Gaussian policy: the simplest instance of the policy contract.

pi(a|s) = N(a; mu_theta(s), diag(sigma^2)), with a state-independent log sigma (the PPO
default for MuJoCo) or a state-dependent one. By default actions are unbounded and the
environment clips. With ``squash = "tanh"`` (SAC's actor) the action is a = tanh(u) * scale +
offset with u ~ N(mu, sigma^2): ``set_action_box`` stores scale and offset as buffers, so a saved
or exported policy acts in its env's box on its own; log-probs are those of tanh(u) in [-1, 1]^A
(the Gaussian's minus the tanh Jacobian; the box rescale is a constant left out, as SB3), and
log sigma is clamped to [-20, 2] (SB3, the official PMOE-SAC code). ``rsample`` gives the
reparameterised sample and its log-prob, differentiable, for SAC's actor loss.
Shapes: B batch, A action dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genrl_policies.base import PolicyModule, check_detached
from genrl_policies.nets import LOG_SQRT_2PI, diag_gaussian_log_prob, mlp

SQUASHES = ("none", "tanh")
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
"""Clamp of log sigma under the tanh squash (SB3's SAC actor)."""


def tanh_log_det_jacobian(u: Tensor) -> Tensor:
    """log(1 - tanh(u)^2) elementwise, in the stable form 2 (log 2 - u - softplus(-2u))."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


@dataclass(frozen=True)
class GaussianConfig:
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the mean network."""
    activation: str = "tanh"
    log_std_init: float = 0.0
    """Initial log sigma of every action dimension."""
    state_dependent_std: bool = False
    """If true, log sigma is a second head of the network instead of a free parameter."""
    squash: str = "none"
    """"none": unbounded actions (the env clips); "tanh": tanh(u) rescaled to the action box
    (``set_action_box``), log-probs with the tanh Jacobian, log sigma in [-20, 2] (SAC)."""

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(int(h) <= 0 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")
        if self.squash not in SQUASHES:
            raise ValueError(f"squash must be one of {SQUASHES}, got {self.squash!r}")


@dataclass(frozen=True)
class GaussianRecord:
    action: Tensor  # (B, A) the sampled action, before any clipping by the env (tanh squash: u, before the squash)
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
        self.squashed = cfg.squash == "tanh"
        if self.squashed:  # a = tanh(u) * action_scale + action_offset; [-1, 1] until set_action_box
            self.register_buffer("action_scale", torch.ones(action_dim))
            self.register_buffer("action_offset", torch.zeros(action_dim))

    def set_action_box(self, low: Any, high: Any) -> None:
        """Squash into the box [low, high] ((A,) arrays or tensors, finite); saved with the weights."""
        if not self.squashed:
            raise ValueError("set_action_box needs squash = 'tanh'")
        low64, high64 = torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
        if low64.shape != (self.action_dim,) or high64.shape != (self.action_dim,):
            raise ValueError(f"action box bounds must have shape ({self.action_dim},), got {tuple(low64.shape)} and {tuple(high64.shape)}")
        if not bool(torch.isfinite(low64).all() and torch.isfinite(high64).all() and (high64 > low64).all()):
            raise ValueError("a tanh-squashed policy needs a finite action box with high > low")
        self.action_scale.copy_((high64 - low64) / 2.0)
        self.action_offset.copy_((high64 + low64) / 2.0)

    def distribution(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(mean (B, A), log_std (B, A) or (A,)); the mean and log sigma of u under the squash."""
        out = self.net(obs)
        if self.config.state_dependent_std:
            mean, log_std = out[:, : self.action_dim], out[:, self.action_dim :]
        else:
            mean, log_std = out, self.log_std
        if self.squashed:
            log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std

    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, GaussianRecord]:
        self.check_obs(obs)
        mean, log_std = self.distribution(obs)
        if deterministic:
            action = mean
        else:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            action = mean + noise * log_std.exp()
        log_prob = diag_gaussian_log_prob(action, mean, log_std)
        if self.squashed:  # the record keeps u; the env gets the squashed, rescaled action
            log_prob = log_prob - tanh_log_det_jacobian(action).sum(-1)
            return self.squash(action).detach(), GaussianRecord(action.detach(), log_prob.detach())
        return action.detach(), GaussianRecord(action.detach(), log_prob.detach())

    def rsample(self, obs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A reparameterised sample: (action (B, A), log_prob (B,)), both differentiable in the
        parameters (SAC's actor loss and soft value target). Under the tanh squash the action
        is in the action box and the log-prob that of tanh(u) (module docstring)."""
        self.check_obs(obs)
        mean, log_std = self.distribution(obs)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        u = mean + noise * log_std.exp()
        log_prob = (-0.5 * noise.square() - log_std - LOG_SQRT_2PI).sum(-1)  # log N(u; mean, sigma) at u = mean + sigma * noise
        if not self.squashed:
            return u, log_prob
        return self.squash(u), log_prob - tanh_log_det_jacobian(u).sum(-1)

    def squash(self, u: Tensor) -> Tensor:
        """tanh(u) rescaled to the action box."""
        return torch.tanh(u) * self.action_scale + self.action_offset

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """log pi(action | obs) of an action as ``act`` returns it (in the box under the squash)."""
        if self.squashed:  # invert the squash; actions on the box's edge are pulled just inside
            eps = torch.finfo(action.dtype).eps
            y = ((action - self.action_offset) / self.action_scale).clamp(-1.0 + eps, 1.0 - eps)
            return self._squashed_log_prob(obs, torch.atanh(y))
        mean, log_std = self.distribution(obs)
        return diag_gaussian_log_prob(action, mean, log_std)

    def _squashed_log_prob(self, obs: Tensor, u: Tensor) -> Tensor:
        mean, log_std = self.distribution(obs)
        return diag_gaussian_log_prob(u, mean, log_std) - tanh_log_det_jacobian(u).sum(-1)

    def log_ratio(self, obs: Tensor, record: GaussianRecord) -> Tensor:
        check_detached(record)
        self.check_obs(obs)
        if self.squashed:
            return self._squashed_log_prob(obs, record.action) - record.log_prob
        return self.log_prob(obs, record.action) - record.log_prob

    def regularizer(self, obs: Tensor, record: GaussianRecord) -> Tensor:
        """Entropy of the Gaussian at ``obs``: sum_a (log sigma_a + 0.5 log(2 pi e)), shape (B,)
        (under the squash: of u, before it; the squashed action's has no closed form)."""
        if self.config.state_dependent_std:
            _, log_std = self.distribution(obs)
        elif self.squashed:
            log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).expand(obs.shape[0], -1)
        else:
            log_std = self.log_std.expand(obs.shape[0], -1)
        return (log_std + LOG_SQRT_2PI + 0.5).sum(-1)

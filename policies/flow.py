"""Conditional flow-matching building blocks for control policies.

Convention (B of the design notes), used by every flow family in genrl: t runs from 0 (noise)
to 1 (action); the straight interpolant is x_t = (1 - t) z + t a, whose velocity is u = a - z;
integration goes forward, dt = +1/K.

Shapes: B batch, O obs dim, A action dim, K integration steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from policies.nets import ACTIVATIONS, mlp

METHODS = ("euler", "midpoint")


class TimeEmbedding(nn.Module):
    """Fixed Fourier features of t in [0, 1]: [sin(2 pi f t), cos(2 pi f t)] over log-spaced f."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be an even number >= 2, got {dim}")
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:  # (B,) or (B, 1) -> (B, dim)
        angles = 2.0 * math.pi * t.reshape(-1, 1) * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class VelocityNet(nn.Module):
    """v_theta(x_t, t | s): an MLP on concat[x_t, emb(t) + cond(s)] (PolicyFlow's FlowMlp layout).

    The last layer starts at zero ("Glorot + zero last layer", the best init in PolicyFlow's
    ablation), so the initial flow is the identity map z -> z.
    """

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: tuple[int, ...] = (256, 256), activation: str = "silu", embed_dim: int = 64
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; valid: {sorted(ACTIVATIONS)}")
        self.time_embed = TimeEmbedding(embed_dim)
        self.cond = nn.Linear(obs_dim, embed_dim)
        self.net = mlp(action_dim + embed_dim, tuple(hidden), action_dim, activation, out_gain=1.0)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        """x (B, A), t (B,) or scalar tensor, obs (B, O) -> velocity (B, A)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.time_embed(t) + self.cond(obs)
        return self.net(torch.cat([x, h], dim=-1))


def time_grid(n_steps: int, method: str) -> Tensor:
    """The times at which ``integrate`` evaluates the velocity: K (Euler) or 2K (midpoint) points."""
    check_integration(n_steps, method)
    per = 1 if method == "euler" else 2
    return torch.arange(per * n_steps, dtype=torch.float64) / (per * n_steps)


def check_integration(n_steps: int, method: str) -> None:
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"the number of integration steps must be a positive integer, got {n_steps!r}")
    if method not in METHODS:
        raise ValueError(f"unknown integration method '{method}'; valid: {', '.join(METHODS)}")


def integrate(
    velocity: nn.Module,
    z: Tensor,
    obs: Tensor,
    n_steps: int,
    method: str = "euler",
    *,
    noise_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrate dx/dt = v(x, t | s) from x_0 = z at t = 0 to t = 1 in ``n_steps`` uniform steps.

    ``noise_scale`` > 0 adds exploration noise noise_scale * sqrt(dt) * xi after each step (an
    Euler-Maruyama perturbation; 0 gives the deterministic ODE map).
    Returns x_1 (B, A).
    """
    check_integration(n_steps, method)
    if noise_scale < 0 or not math.isfinite(noise_scale):
        raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale}")
    dt = 1.0 / n_steps
    x = z
    for k in range(n_steps):
        t = torch.full((z.shape[0],), k * dt, dtype=z.dtype, device=z.device)
        if method == "euler":
            x = x + dt * velocity(x, t, obs)
        else:
            x_mid = x + 0.5 * dt * velocity(x, t, obs)
            x = x + dt * velocity(x_mid, t + 0.5 * dt, obs)
        if noise_scale > 0:
            xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + noise_scale * math.sqrt(dt) * xi
    return x


def cfm_loss(velocity: nn.Module, action: Tensor, z: Tensor, t: Tensor, obs: Tensor) -> Tensor:
    """Conditional flow-matching loss per sample: ||v(x_t, t | s) - (a - z)||^2 summed over A.

    x_t = (1 - t) z + t a. Shapes: action, z (B, A); t (B,); returns (B,).
    """
    tt = t.reshape(-1, 1)
    x_t = (1.0 - tt) * z + tt * action
    return (velocity(x_t, t, obs) - (action - z)).square().sum(-1)


__all__ = ["METHODS", "TimeEmbedding", "VelocityNet", "cfm_loss", "check_integration", "integrate", "time_grid"]

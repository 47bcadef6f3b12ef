"""Conditional flow-matching building blocks for control policies.

Convention (B of the design notes), used by every flow family in genrl: t runs from 0 (noise)
to 1 (action); the straight interpolant is x_t = (1 - t) z + t a, whose velocity is u = a - z;
integration goes forward, dt = +1/K.

Shapes: B batch, O obs dim, A action dim, K integration steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genrl_policies.nets import ACTIVATIONS, mlp

METHODS = ("euler", "midpoint")


class TimeEmbedding(nn.Module):
    """Fixed Fourier features of t in [0, 1]: [sin(2 pi f t), cos(2 pi f t)], f log-spaced in
    [1/8, max_freq].

    A control flow is integrated on a coarse grid (K ~ 10 steps); features oscillating faster
    than the grid resolves make the velocity rough in t, which breaks PolicyFlow's
    interpolation-path ratio (35% off the exact CNF ratio with f up to 1000, ~1% with f <= 1).
    """

    def __init__(self, dim: int, max_freq: float = 2.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be an even number >= 2, got {dim}")
        if not max_freq > 0.125:
            raise ValueError(f"max_freq must be > 1/8, got {max_freq}")
        freqs = torch.exp(torch.linspace(math.log(0.125), math.log(max_freq), dim // 2))
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
        self,
        obs_dim: int,
        action_dim: int,
        hidden: tuple[int, ...] = (256, 256),
        activation: str = "silu",
        embed_dim: int = 64,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_scale = float(output_scale)  # FPO's policy_mlp_output_scale (0.25); 1: none
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
        out = self.net(torch.cat([x, h], dim=-1))
        return out if self.output_scale == 1.0 else out * self.output_scale

    def conditioned(self, obs: Tensor, times: Tensor) -> Callable[[Tensor, int], Tensor]:
        """v(x, times[k] | obs) as a function of (x, k), for integrating at fixed obs and times.

        The first layer acts on concat[x, emb(t) + cond(s)], so its obs and time parts are
        computed once per call instead of once per step: at batch 1 that halves the cost of a
        10-step midpoint sample. Equal to ``forward`` up to float rounding.
        """
        first, first_act = self.net._plan[0]
        x_dim = first.in_features - self.cond.out_features
        w_x, w_h = first.weight[:, :x_dim], first.weight[:, x_dim:]
        c = F.linear(self.cond(obs), w_h, first.bias)  # (B, H)
        e = F.linear(self.time_embed(times.to(obs.dtype)), w_h)  # (n_t, H)
        rest = self.net._plan[1:]
        scale = self.output_scale

        def v(x: Tensor, k: int) -> Tensor:
            h = F.linear(x, w_x) + c + e[k]
            if first_act is not None:
                h = first_act(h)
            for layer, act in rest:
                h = F.linear(h, layer.weight, layer.bias)
                if act is not None:
                    h = act(h)
            return h if scale == 1.0 else h * scale

        return v


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
    fast = velocity.conditioned(obs, time_grid(n_steps, method)) if isinstance(velocity, VelocityNet) else None
    for k in range(n_steps):
        if fast is not None:  # grid index: Euler evaluates k, midpoint 2k and 2k + 1
            if method == "euler":
                x = x + dt * fast(x, k)
            else:
                x = x + dt * fast(x + 0.5 * dt * fast(x, 2 * k), 2 * k + 1)
        else:
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


# -- exact CNF likelihood (reference and diagnostics; not used in training) ----------------------
#: torchdiffeq solvers; the fixed-grid ones take ``n_steps`` steps over [0, 1], the others adapt.
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun3", "rk4")
ODE_FIXED_METHODS = ("euler", "midpoint", "heun3", "rk4")


def flow_bc_loss(velocity: nn.Module, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Behaviour cloning by conditional flow matching on the rectified path: z ~ N(0, I),
    t ~ U[0, 1), mean over batch and action dims of ||v(x_t, t | s) - (a - z)||^2 (``cfm_loss``)."""
    B, A = actions.shape
    z = torch.randn(B, A, generator=generator, dtype=actions.dtype, device=actions.device)
    t = torch.rand(B, generator=generator, dtype=actions.dtype, device=actions.device)
    return cfm_loss(velocity, actions, z, t, obs).mean() / A


def _odeint(func, y0: Tensor, t0: float, t1: float, n_steps: int, method: str, atol: float, rtol: float) -> Tensor:
    """torchdiffeq.odeint from t0 to t1, validating the arguments; returns the state at t1."""
    import torchdiffeq  # optional dependency (the "flow" extra): only the reference paths need it

    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method '{method}'; valid: {', '.join(ODE_METHODS)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if not (atol > 0 and rtol > 0):
        raise ValueError(f"atol and rtol must be > 0, got {atol}, {rtol}")
    options = {"step_size": 1.0 / n_steps} if method in ODE_FIXED_METHODS else None
    ts = torch.tensor([t0, t1], dtype=y0.dtype, device=y0.device)
    return torchdiffeq.odeint(func, y0, ts, method=method, atol=atol, rtol=rtol, options=options)[-1]


def flow_map(
    velocity: nn.Module,
    z: Tensor,
    obs: Tensor,
    *,
    n_steps: int = 100,
    method: str = "dopri5",
    atol: float = 1e-7,
    rtol: float = 1e-7,
) -> Tensor:
    """phi_1(z; s): the CNF's own map, dx/dt = v(x, t | s) from t = 0 to 1 with a torchdiffeq solver.

    The accurate counterpart of ``integrate`` (whose K-step map is what a policy executes).
    Differentiable through the solver. z (B, A), obs (B, O) -> x_1 (B, A).
    """

    def func(t: Tensor, x: Tensor) -> Tensor:
        return velocity(x, t.expand(x.shape[0]), obs)

    return _odeint(func, z, 0.0, 1.0, n_steps, method, atol, rtol)


def divergence(velocity: nn.Module, x: Tensor, t: Tensor, obs: Tensor, probes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """v(x, t | s) and div_x v = tr(dv/dx), both detached: (B, A), (B,).

    ``probes`` None: the exact trace, one vector-Jacobian product per action dim. Otherwise
    Hutchinson's estimator mean_p eps_p^T (dv/dx) eps_p over probes (P, B, A) (Rademacher:
    unbiased, variance 2 * sum_{i != j} J_ij^2 / P), one pass on a (P * B)-row batch.
    t: (B,) or scalar. Autograd runs even under ``no_grad``.
    """
    b, a_dim = x.shape
    n_rep = 1 if probes is None else probes.shape[0]
    if t.ndim == 0:
        t = t.expand(b)
    with torch.enable_grad():
        # Hutchinson: all P probes in one pass over P stacked copies of the batch
        x_rep = x.detach().repeat(n_rep, 1).requires_grad_(True)  # (P * B, A)
        v = velocity(x_rep, t.repeat(n_rep), obs.repeat(n_rep, 1))
        if not v.requires_grad:  # a field that ignores x (e.g. constant) is divergence-free
            return v[:b].detach(), v.new_zeros(b)
        if probes is None:
            cols = [_grad_or_zero(v[:, i].sum(), x_rep, None)[:, i] for i in range(a_dim)]
            div = torch.stack(cols, dim=-1).sum(-1)
        else:
            eps = probes.reshape(n_rep * b, a_dim)
            div = (_grad_or_zero(v, x_rep, eps) * eps).sum(-1).view(n_rep, b).mean(0)
    return v[:b].detach(), div.detach()


def _grad_or_zero(out: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
    """d(weight . out)/dx, zeros where ``out`` does not depend on ``x``."""
    (grad,) = torch.autograd.grad(out, x, weight, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def cnf_log_prob(
    velocity: nn.Module,
    action: Tensor,
    obs: Tensor,
    *,
    n_steps: int = 100,
    method: str = "dopri5",
    exact_divergence: bool | None = None,
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    atol: float = 1e-7,
    rtol: float = 1e-7,
) -> Tensor:
    """Exact log-likelihood log p_1(a | s) of the CNF dx/dt = v(x, t | s) with source N(0, I).

    Instantaneous change of variables: integrate x back from x_1 = a at t = 1 to z = x_0 at t = 0
    jointly with l(t) = int_1^t div v dt', so that log p_1(a) = log N(z; 0, I) + l(0)
    (= log N(z; 0, I) - int_0^1 div v(x_t, t) dt).

    Args:
        velocity: v(x (B, A), t (B,), obs (B, O)) -> (B, A).
        action: (B, A) points to score; obs: (B, O).
        n_steps: steps of a fixed-grid ``method`` (ignored by the adaptive ones).
        exact_divergence: exact trace (default when A <= 8) or Hutchinson with ``n_probes``
            Rademacher probes drawn once from ``generator`` and held fixed along the solve.
    Returns:
        (B,) log-densities, detached (a diagnostic: no gradient flows back to the velocity).
    """
    b, a_dim = action.shape
    exact = a_dim <= 8 if exact_divergence is None else bool(exact_divergence)
    probes = None
    if not exact:
        if not isinstance(n_probes, int) or n_probes < 1:
            raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
        bits = torch.randint(0, 2, (n_probes, b, a_dim), generator=generator, device=action.device)
        probes = (2 * bits - 1).to(action.dtype)

    def func(t: Tensor, state: Tensor) -> Tensor:
        v, div = divergence(velocity, state[:, :a_dim], t.expand(b), obs, probes)
        return torch.cat([v, div.unsqueeze(-1)], dim=-1)

    start = torch.cat([action.detach(), action.new_zeros(b, 1)], dim=-1)
    with torch.no_grad():
        end = _odeint(func, start, 1.0, 0.0, n_steps, method, atol, rtol)
    z, delta = end[:, :a_dim], end[:, a_dim]
    return -0.5 * z.square().sum(-1) - a_dim * 0.5 * math.log(2.0 * math.pi) + delta


def conditional_log_prob(velocity: nn.Module, action: Tensor, z: Tensor, obs: Tensor, log_std: Tensor, **ode: object) -> Tensor:
    """log N(a; phi_1(z; s), diag sigma^2) summed over A, shape (B,).

    A noisy CNF policy a = phi_1(z; s) + n (PolicyFlow) has the marginal int N(a; phi_1(z), sigma^2)
    p(z) dz, a Gaussian convolution without closed form; its ratio is taken *given z*, and this is
    that conditional likelihood with the exact flow map (``flow_map``; ``ode`` goes to it).
    """
    mean = flow_map(velocity, z, obs, **ode)  # type: ignore[arg-type]
    x = (action - mean) * torch.exp(-log_std)
    return (-0.5 * x.square() - log_std - 0.5 * math.log(2.0 * math.pi)).sum(-1)


__all__ += ["ODE_METHODS", "cnf_log_prob", "conditional_log_prob", "divergence", "flow_map"]

"""What test-time composition (GPC, ``policies.compose``) asks of a generative policy, and the exact
conversions between its possible outputs.

Every parametrisation is read against one forward process, x_t = alpha_t x0 + sigma_t eps with
eps ~ N(0, I):

* DDPM (variance preserving, ``policies.diffusion``): alpha = sqrt(abar_k), sigma = sqrt(1 - abar_k),
  so alpha^2 + sigma^2 = 1; step index k = 0 (least noisy) ... K - 1.
* Rectified flow (genrl's convention, ``policies.flow``): x_t = (1 - t) z + t a, t = 0 noise,
  t = 1 action; so alpha = t, sigma = 1 - t, x0 = a, eps = z, and the velocity is v = a - z.

Given the state x, each prediction fixes the others through maps that are affine in the prediction,
with coefficients depending on (x, alpha, sigma) only:

    score:          s = -eps / sigma
    x0-prediction:  x0 = (x - sigma eps) / alpha,        eps = (x - alpha x0) / sigma
    v-prediction:   v = alpha eps - sigma x0,            eps = alpha v + sigma x   (needs alpha^2 + sigma^2 = 1)
    RF velocity:    v = x0 - eps:  eps = x - t v,  x0 = x + (1 - t) v,  v = (x - eps) / t = (x0 - x) / (1 - t)

Hence a convex mix (weights summing to 1) of parents sharing (x, alpha, sigma) is the same whichever
of these spaces it is taken in; with a sum other than 1 the spaces disagree (the x-dependent offset
is then scaled by the sum).

**Variance-preserving <-> rectified-flow map** (cross-family composition). A DDPM state is
x = sqrt(abar) a + sqrt(1 - abar) eps. Scaling it by c > 0 gives c sqrt(abar) a + c sqrt(1 - abar) eps,
which is the rectified-flow state y_t = t a + (1 - t) eps, with the *same* a and eps, iff
c sqrt(abar) = t and c sqrt(1 - abar) = 1 - t. Adding the two: c (sqrt(abar) + sqrt(1 - abar)) = 1, so

    y = x / (sqrt(abar) + sqrt(1 - abar)),    t = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar)).

Conversely, from (y, t): with r = sqrt(t^2 + (1 - t)^2), x = y / r and abar = t^2 / r^2. Because the
noise eps is the same draw in both states, a flow parent's eps-prediction y - t v(y, t) estimates the
very eps a DDPM parent predicts at x: that is how the two families are mixed in eps-space.

Shapes: N rows, A action dims (a parent may cover only a prefix of the composed action, GPC's
shorter chunk), K steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from genrl_policies.flow import VelocityNet

Scalar = float | Tensor

# -- conversions (pure; alpha, sigma, t are floats or tensors broadcastable against x) -----------


def eps_to_score(eps: Tensor, sigma: Scalar) -> Tensor:
    """s = -eps / sigma."""
    return -eps / sigma


def score_to_eps(score: Tensor, sigma: Scalar) -> Tensor:
    """eps = -sigma s."""
    return -sigma * score


def eps_to_x0(x: Tensor, eps: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
    """x0 = (x - sigma eps) / alpha."""
    return (x - sigma * eps) / alpha


def x0_to_eps(x: Tensor, x0: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
    """eps = (x - alpha x0) / sigma."""
    return (x - alpha * x0) / sigma


def eps_to_vpred(x: Tensor, eps: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
    """Salimans & Ho's v = alpha eps - sigma x0, with x0 from (x, eps)."""
    return alpha * eps - sigma * eps_to_x0(x, eps, alpha, sigma)


def vpred_to_eps(x: Tensor, v: Tensor, alpha: Scalar, sigma: Scalar) -> Tensor:
    """eps = alpha v + sigma x; exact only on a variance-preserving path (alpha^2 + sigma^2 = 1)."""
    return alpha * v + sigma * x


def velocity_to_eps(x: Tensor, v: Tensor, t: Scalar) -> Tensor:
    """Rectified flow: the noise z = x - t v implied by a velocity at x_t."""
    return x - t * v


def eps_to_velocity(x: Tensor, eps: Tensor, t: Scalar) -> Tensor:
    """Rectified flow: v = (x - eps) / t (undefined at t = 0, where x_t is the noise itself)."""
    return (x - eps) / t


def velocity_to_x0(x: Tensor, v: Tensor, t: Scalar) -> Tensor:
    """Rectified flow: the action a = x + (1 - t) v implied by a velocity at x_t."""
    return x + (1 - t) * v


def x0_to_velocity(x: Tensor, x0: Tensor, t: Scalar) -> Tensor:
    """Rectified flow: v = (x0 - x) / (1 - t) (undefined at t = 1)."""
    return (x0 - x) / (1 - t)


def vp_to_rf(x: Tensor, alpha_bar: float) -> tuple[Tensor, float]:
    """A DDPM state x at abar -> the rectified-flow state (y, t) with the same action and noise."""
    check_alpha_bar(alpha_bar)
    scale, t = vp_to_rf_coefficients(alpha_bar)
    return x * scale, t


def rf_to_vp(y: Tensor, t: float) -> tuple[Tensor, float]:
    """A rectified-flow state (y, t) -> the DDPM state x and its abar (inverse of ``vp_to_rf``)."""
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t must be in (0, 1] to map onto a variance-preserving state, got {t}")
    r = math.sqrt(t * t + (1 - t) * (1 - t))
    return y / r, (t / r) ** 2


def vp_to_rf_coefficients(alpha_bar: float) -> tuple[float, float]:
    """(c, t): y = c x and the flow time t of a DDPM noise level abar (derivation in the module doc)."""
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    return 1.0 / (a + s), a / (a + s)


def check_alpha_bar(alpha_bar: float) -> None:
    if not 0.0 < alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must be in (0, 1], got {alpha_bar}")


# -- the denoisers the families expose -------------------------------------------------------------

Start = Callable[[tuple[int, int], bool, "torch.Generator | None", torch.dtype, torch.device], Tensor]


@dataclass(frozen=True, eq=False)
class EpsDenoiser:
    """A DDPM noise-prediction parent (``DiffusionPolicy.denoiser()``) and its ancestral sampler."""

    parametrisation: ClassVar[str] = "eps"
    family: str
    obs_dim: int
    action_dim: int
    alphas_cumprod: Tensor
    """(K,) float64 abar_k of the schedule, k = 0 (least noisy) ... K - 1."""
    predict_fn: Callable[[Tensor, int, Tensor], Tensor]
    """(x (N, A'), k, obs (N, O)) -> eps (N, A'); the parent's own network for step k."""
    mean_fn: Callable[[Tensor, int, Tensor], Tensor]
    """(x, k, eps) -> the parent's DDPM posterior mean mu_k (x0 clipping included)."""
    sampling_std: Tensor
    """(K,) per-step std of the parent's sampler."""
    noise_clamp: float | None
    final_action_clip: float | None
    sampler_settings: dict[str, Any] = field(default_factory=dict)
    """What parents must share to run one sampler (compared by ``compose``)."""

    @property
    def n_steps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def alpha_sigma(self, k: int) -> tuple[float, float]:
        """(alpha, sigma) = (sqrt(abar_k), sqrt(1 - abar_k)) of step k."""
        abar = float(self.alphas_cumprod[k])
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def predict(self, x: Tensor, step: int, obs: Tensor) -> Tensor:
        """eps-prediction at DDPM step ``step`` (an integer in [0, K))."""
        if not 0 <= int(step) < self.n_steps:
            raise ValueError(f"DDPM step must be in [0, {self.n_steps}), got {step}")
        return self.predict_fn(x, int(step), obs)


@dataclass(frozen=True, eq=False)
class VelocityDenoiser:
    """A rectified-flow velocity parent (PolicyFlow, FPO) and its sampler's settings."""

    parametrisation: ClassVar[str] = "velocity"
    family: str
    obs_dim: int
    action_dim: int
    velocity: nn.Module
    """v(x (N, A'), t (N,), obs (N, O)) -> (N, A')."""
    n_steps: int
    method: str
    """"euler" or "midpoint" (``flow.integrate``)."""
    start_fn: Start
    """(shape, deterministic, generator, dtype, device) -> the start x_0, drawing exactly as the
    parent's ``act`` does."""
    feather_std: float = 0.0
    """Per-step noise scale of the sampler (FPO's ``exploration_noise``; ``flow.integrate``)."""
    terminal_std: Tensor | None = None
    """(A,) std of the Gaussian action noise added after integration (PolicyFlow's sigma), or None."""

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha, sigma) = (t, 1 - t) of the rectified-flow interpolant."""
        return t, 1.0 - t

    def predict(self, x: Tensor, t: float | Tensor, obs: Tensor) -> Tensor:
        """Velocity at flow time ``t`` (a float or (N,) tensor in [0, 1])."""
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return self.velocity(x, tt.expand(x.shape[0]) if tt.ndim == 0 else tt, obs)

    def bind(self, obs: Tensor, times: Tensor) -> Callable[[Tensor, int], Tensor]:
        """v(x, times[j] | obs) as a function of (x, j): the same fast path ``flow.integrate`` uses
        for a ``VelocityNet`` (so a composed sampler reproduces the parent bit for bit)."""
        if isinstance(self.velocity, VelocityNet):
            return self.velocity.conditioned(obs, times.to(obs.device))
        ts = times.to(dtype=obs.dtype, device=obs.device)

        def v(x: Tensor, j: int) -> Tensor:
            return self.velocity(x, ts[j].expand(x.shape[0]), obs)

        return v


Denoiser = EpsDenoiser | VelocityDenoiser

__all__ = [
    "Denoiser",
    "EpsDenoiser",
    "VelocityDenoiser",
    "eps_to_score",
    "eps_to_velocity",
    "eps_to_vpred",
    "eps_to_x0",
    "rf_to_vp",
    "score_to_eps",
    "velocity_to_eps",
    "velocity_to_x0",
    "vp_to_rf",
    "vp_to_rf_coefficients",
    "vpred_to_eps",
    "x0_to_eps",
    "x0_to_velocity",
]

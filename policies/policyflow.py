"""PolicyFlow: PPO for continuous-normalising-flow policies (Yang, Liu and Chen, "PolicyFlow: Policy
Optimization with Continuous Normalizing Flow in Reinforcement Learning", arXiv 2602.01156, ICLR 2026).

Policy: z ~ N(0, I), phi_1 = flow of dx/dt = v_theta(x, t | s) from x_0 = z (t = 0 noise, t = 1
action; K midpoint steps), a = phi_1 + n with n ~ N(0, diag sigma^2) and a state-independent
learnable sigma (log sigma clamped to [-5, 2]). The record keeps z, phi_1 and n.

Ratio: given the stored z, the exact conditional ratio is N(n; dphi_1, sigma^2) / N(n; 0, sigma_old^2)
with dphi_1 = phi_1^theta(z) - phi_1^old(z). PolicyFlow replaces dphi_1 by the velocity variation
dv_t = v_theta(x_t, t | s) - v_old(x_t, t | s) on the straight path x_t = (1 - t) z + t phi_1^old,
with v_old a frozen copy of the velocity net taken once per update (``begin_update``).

Choices and deviations (see design notes §3):

* The official code's ratio, not the paper's E_t inside the ratio: one t per sample per call,
  uniform over the sampler's evaluation times plus t = 1 (2K + 1 points for midpoint, K + 1 for
  Euler; ``t_sampling="continuous"``: t ~ U[0, 1)). It uses the global torch RNG (checkpointed by
  the trainer). Since log N is quadratic in its mean, E_t[log rho_t] sits below log rho(E_t dv) by
  sum_d Var_t(dv_d) / (2 sigma_d^2): a small downward bias the paper accepts.
* Brownian regulariser as in Algorithm 1 and the code, eta = (1 - t) v_theta(x_t) - (x_t - t v_old(x_t));
  Eq. 16 writes v_old in the first term, which has no gradient (a typo flagged by reviewers). It is
  evaluated at the same (t, x_t) as the ratio of the same minibatch and returned, weighted by
  ``brownian_coef``, from ``auxiliary_loss``. The Gaussian entropy (w_g) is ``regularizer``;
  set the algorithm's entropy coefficient to w_g (paper: 0.01).
* Before the first ``begin_update`` there is no frozen copy: v_old is the live net (detached), so
  dv = 0 and only sigma moves the ratio.
* ``deterministic=True`` acts with z = 0 and n = 0, the flow map of the source mean. The paper
  deploys the stochastic policy; for multimodal tasks evaluate stochastically.
* Only the rectified interpolation path (the paper's default); no EMA copy, no KL-adaptive LR.
* Behaviour cloning (``bc_loss``) is conditional flow matching on the same path; ``denoiser``
  exposes the velocity and sampler to test-time composition (``policies.compose``).

Shapes: B batch, O obs dim, A action dim, K integration steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from genrl_policies.base import PolicyModule, Terms, check_detached
from genrl_policies.denoisers import VelocityDenoiser
from genrl_policies.flow import METHODS, VelocityNet, flow_bc_loss, integrate, time_grid
from genrl_policies.nets import ACTIVATIONS, LOG_SQRT_2PI, diag_gaussian_log_prob

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the official code's clamp on log sigma
PATHS = ("rectified",)
T_SAMPLINGS = ("discrete", "continuous")


@dataclass(frozen=True)
class PolicyFlowConfig:
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden widths of the velocity MLP."""
    activation: str = "silu"
    embed_dim: int = 64
    """Width of the time embedding and of the observation embedding it is added to."""
    n_steps: int = 10
    """Integration steps K of the sampler."""
    method: str = "midpoint"
    """Sampler: "midpoint" (RK2, the paper's) or "euler"."""
    sigma_init: float = 1.0
    """Initial std of the action noise n (state-independent, learned)."""
    path: str = "rectified"
    """Interpolation path of the ratio: x_t = (1 - t) z + t phi_1."""
    brownian_coef: float = 0.01
    """Weight w_b of the Brownian regulariser (added to the loss by ``auxiliary_loss``)."""
    t_sampling: str = "discrete"
    """"discrete": uniform over the sampler's evaluation times and 1; "continuous": U[0, 1)."""
    degenerate_to_gaussian: bool = False
    """z = 0 always: a Gaussian policy with state-dependent mean phi_1(0; s)."""

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(int(h) <= 0 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{self.activation}'; valid: {sorted(ACTIVATIONS)}")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be an even integer >= 2, got {self.embed_dim!r}")
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {self.n_steps!r}")
        for name, value, valid in (("method", self.method, METHODS), ("path", self.path, PATHS), ("t_sampling", self.t_sampling, T_SAMPLINGS)):
            if value not in valid:
                raise ValueError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
        lo, hi = math.exp(LOG_STD_MIN), math.exp(LOG_STD_MAX)
        if not (math.isfinite(self.sigma_init) and lo <= self.sigma_init <= hi):
            raise ValueError(f"sigma_init must be in [{lo:.4g}, {hi:.4g}] (the log-sigma clamp), got {self.sigma_init}")
        if not (math.isfinite(self.brownian_coef) and self.brownian_coef >= 0):
            raise ValueError(f"brownian_coef must be a finite number >= 0, got {self.brownian_coef}")


@dataclass(frozen=True)
class PolicyFlowRecord:
    z: Tensor  # (B, A) source sample (zeros for deterministic or degenerate acting)
    phi1: Tensor  # (B, A) pre-noise flow output phi_1^old(z; s), the interpolation endpoint
    noise: Tensor  # (B, A) action noise n; the executed action is phi1 + noise
    log_prob: Tensor  # (B,) sum_d log N(n_d; 0, sigma_old_d^2)


def brownian_residual(v_theta: Tensor, v_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """eta_t = (1 - t) v_theta(x_t, t) - (x_t - t v_hat(x_t, t)), (B, A) (Algorithm 1's form).

    For rectified flow from N(0, I), x - t v_hat(x, t) = E[z | x_t = x] = -(1 - t) grad log p_t(x),
    so eta = 0 iff v_theta is the heat-equation velocity -grad log p_t of the reference flow.
    t: (B,) or (B, 1).
    """
    t = t.reshape(-1, 1)
    return (1.0 - t) * v_theta - (x_t - t * v_hat)


class PolicyFlowPolicy(PolicyModule):
    """CNF policy with PolicyFlow's interpolation-path ratio; ``regularizer`` is the Gaussian
    entropy of n, ``auxiliary_loss`` the weighted Brownian regulariser."""

    family = "policyflow"
    config_class = PolicyFlowConfig

    def __init__(self, obs_dim: int, action_dim: int, config: PolicyFlowConfig | None = None) -> None:
        super().__init__(obs_dim, action_dim, config or PolicyFlowConfig())
        cfg = self.config
        hidden = tuple(int(h) for h in cfg.hidden_sizes)
        self.velocity = VelocityNet(obs_dim, action_dim, hidden, cfg.activation, cfg.embed_dim)
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(cfg.sigma_init)))
        # The frozen v_old lives in a plain list: not a submodule, so it is in neither
        # parameters() (the optimiser) nor state_dict() (save/load); ``_apply`` moves it.
        self._frozen: list[VelocityNet] = []

    def _apply(self, fn: Any, recurse: bool = True) -> PolicyFlowPolicy:
        super()._apply(fn, recurse)
        for net in self._frozen:  # .to(), .double(), .cuda() reach the frozen copy too
            net._apply(fn, recurse)
        return self

    def clamped_log_std(self) -> Tensor:
        """log sigma clamped to [-5, 2], shape (A,)."""
        return self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def t_grid(self) -> Tensor:
        """The discrete t set: the sampler's evaluation times and 1 (2K + 1 points for midpoint)."""
        grid = time_grid(self.config.n_steps, self.config.method)
        return torch.cat([grid, grid.new_ones(1)])

    # -- acting ---------------------------------------------------------------------------------
    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, PolicyFlowRecord]:
        """a = phi_1(z; s) + n. ``deterministic``: z = 0 and n = 0 (the flow map of the source mean)."""
        self.check_obs(obs)
        cfg, shape = self.config, (obs.shape[0], self.action_dim)
        if deterministic or cfg.degenerate_to_gaussian:
            z = obs.new_zeros(shape)
        else:
            z = torch.randn(shape, generator=generator, dtype=obs.dtype, device=obs.device)
        log_std = self.clamped_log_std().detach()
        with torch.no_grad():
            phi1 = integrate(self.velocity, z, obs, cfg.n_steps, cfg.method)
            if deterministic:
                noise = torch.zeros_like(phi1)
            else:
                noise = torch.randn(shape, generator=generator, dtype=obs.dtype, device=obs.device)
                noise = noise * log_std.exp()
            log_prob = diag_gaussian_log_prob(noise, torch.zeros_like(noise), log_std)
        return phi1 + noise, PolicyFlowRecord(z, phi1, noise, log_prob)

    # -- behaviour cloning and composition ------------------------------------------------------
    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Conditional flow matching on the sampler's own path, a scalar:

            z ~ N(0, I),  t ~ U[0, 1),  x_t = (1 - t) z + t a,
            loss = mean over batch and action dims of (v_theta(x_t, t | s) - (a - z))^2,

        whose minimiser transports N(0, I) to the demonstrated actions, so the flow output
        phi_1(z; s) of ``act`` (``record.phi1``) reproduces their distribution. Only the velocity
        is trained: sigma is an exploration device, not part of the cloned distribution, and
        stochastic ``act`` adds n ~ N(0, sigma^2) on top (set ``sigma_init`` small, e.g. 0.01, to
        act like the demonstrations). ``act(deterministic=True)`` maps the source mean z = 0:
        one action per observation (a central one; for multimodal demonstrations act
        stochastically).
        """
        self.check_bc_batch(obs, actions)
        return flow_bc_loss(self.velocity, obs, actions, generator)

    def denoiser(self) -> VelocityDenoiser:
        """This policy as a rectified-flow velocity parent for test-time composition."""
        degenerate = self.config.degenerate_to_gaussian

        def start(shape: tuple[int, int], deterministic: bool, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
            if deterministic or degenerate:
                return torch.zeros(shape, dtype=dtype, device=device)
            return torch.randn(shape, generator=generator, dtype=dtype, device=device)

        return VelocityDenoiser(
            family=self.family,
            obs_dim=self.obs_dim,
            action_dim=self.action_dim,
            velocity=self.velocity,
            n_steps=self.config.n_steps,
            method=self.config.method,
            start_fn=start,
            terminal_std=self.clamped_log_std().detach().exp(),
        )

    # -- the update -----------------------------------------------------------------------------
    def begin_update(self) -> None:
        """Synchronise the frozen v_old with the current (= rollout) velocity net."""
        if not self._frozen:  # deep-copied once; every later update only copies the weights
            frozen = copy.deepcopy(self.velocity).requires_grad_(False)
            for p in frozen.parameters():
                p.grad = None
            self._frozen.append(frozen)
        else:
            self._frozen[0].load_state_dict(self.velocity.state_dict())

    def sample_t(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One t per sample, shape (B,), from ``generator`` (the algorithm's, checkpointed with the
        run), or torch's global CPU RNG when None."""
        b = obs.shape[0]
        device = generator.device if generator is not None else torch.device("cpu")
        if self.config.t_sampling == "continuous":
            t = torch.rand(b, dtype=torch.float64, generator=generator, device=device)
        else:
            grid = self.t_grid().to(device)
            t = grid[torch.randint(0, grid.numel(), (b,), generator=generator, device=device)]
        return t.to(device=obs.device, dtype=obs.dtype)

    def _path_point(self, obs: Tensor, record: PolicyFlowRecord, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """x_t = (1 - t) z + t phi1 (B, A) and v_old(x_t, t | s) (None before any begin_update)."""
        tt = t.reshape(-1, 1)
        x_t = (1.0 - tt) * record.z + tt * record.phi1
        v_old = None
        if self._frozen:
            with torch.no_grad():
                v_old = self._frozen[0](x_t, t, obs)
        return x_t, v_old

    def velocity_variation(self, obs: Tensor, record: PolicyFlowRecord, t: Tensor) -> Tensor:
        """dv_t = v_theta(x_t, t | s) - v_old(x_t, t | s) at t (B,), shape (B, A)."""
        x_t, v_old = self._path_point(obs, record, t)
        v_new = self.velocity(x_t, t, obs)
        return v_new - (v_new.detach() if v_old is None else v_old)

    def log_ratio_at(self, obs: Tensor, record: PolicyFlowRecord, t: Tensor) -> Tensor:
        """sum_d log N(n_d; dv_{t,d}, sigma_d^2) - log N(n; 0, sigma_old^2) at given t (B,), shape (B,)."""
        dv = self.velocity_variation(obs, record, t)
        return diag_gaussian_log_prob(record.noise, dv, self.clamped_log_std()) - record.log_prob

    def log_ratio(self, obs: Tensor, record: PolicyFlowRecord) -> Tensor:
        """PolicyFlow's single-t log-ratio estimate, shape (B,); exactly 0 at unchanged parameters."""
        check_detached(record)
        self.check_obs(obs)
        return self.log_ratio_at(obs, record, self.sample_t(obs))

    def regularizer(self, obs: Tensor, record: PolicyFlowRecord) -> Tensor:
        """Entropy of the action noise, sum_d 1/2 log(2 pi e sigma_d^2), shape (B,)."""
        entropy = (self.clamped_log_std() + LOG_SQRT_2PI + 0.5).sum(-1)
        return entropy.expand(obs.shape[0])

    def _brownian(self, obs: Tensor, x_t: Tensor, t: Tensor, v_old: Tensor | None) -> Tensor:
        """mean over B and A of eta_t^2 at the path point (x_t, t), with v_theta (Algorithm 1)."""
        v_new = self.velocity(x_t, t, obs)
        v_hat = v_new.detach() if v_old is None else v_old
        return brownian_residual(v_new, v_hat, x_t, t).square().mean()

    def evaluate(self, obs: Tensor, record: PolicyFlowRecord, returns: Tensor, *, regularize: bool = True, generator: torch.Generator | None = None) -> Terms:
        """The ratio and the Brownian regulariser at **one** path point per sample (Algorithm 1:
        the same (t, x_t) for both), the Gaussian entropy, and their statistics."""
        check_detached(record)
        self.check_obs(obs)
        t = self.sample_t(obs, generator)
        x_t, v_old = self._path_point(obs, record, t)
        v_new = self.velocity(x_t, t, obs)
        dv = v_new - (v_new.detach() if v_old is None else v_old)
        log_ratio = diag_gaussian_log_prob(record.noise, dv, self.clamped_log_std()) - record.log_prob
        reg = self.regularizer(obs, record) if regularize else None
        brownian = self._brownian(obs, x_t, t, v_old)
        stats = {"policyflow/brownian": brownian.detach(), "policyflow/sigma_mean": self.clamped_log_std().detach().exp().mean()}
        return Terms(log_ratio, reg, self.config.brownian_coef * brownian, stats)

    def auxiliary_loss(self, obs: Tensor, record: PolicyFlowRecord, returns: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """brownian_coef * the Brownian loss at a fresh t, and its statistics (``evaluate`` uses
        the ratio's t instead; ``returns`` is unused)."""
        terms = self.evaluate(obs, record, returns, regularize=False, generator=generator)
        assert terms.aux_loss is not None
        return terms.aux_loss, terms.stats


__all__ = ["PolicyFlowConfig", "PolicyFlowPolicy", "PolicyFlowRecord", "brownian_residual"]

"""Flow Policy Optimization (FPO; McAllister et al., arXiv 2507.21053) in genrl's flow convention.

A flow policy a = Phi_theta(z | s), z ~ N(0, I), integrated with Euler steps of a velocity field
v_theta(x_t, t | s) (convention B of ``policies.flow``: t = 0 noise, t = 1 action,
x_t = (1 - t) z + t a, target velocity a - z). FPO never computes a likelihood: at rollout it draws
``n_mc`` Monte-Carlo pairs (z_j, t_j) per action, stores them with the per-pair conditional
flow-matching (CFM) losses l_old,j, and replaces PPO's log-ratio by a CFM-loss difference

* ``"average"`` (official default): log rho = mean_j l_old,j - mean_j l_theta,j, shape (B,);
* ``"per_pair"``: log rho_j = clamp(l_old,j - l_theta,j, -c, c), shape (B, n_mc): the PPO loss
  clips each pair's ratio and averages the surrogate over pairs (not a chain: ``Terms.chain`` is
  False, so the algorithm's single clip coefficient applies and the advantage is broadcast unweighted).

A lower CFM loss on an action is a higher ELBO, so a positive-advantage action gets rho > 1 once the
flow moves towards it. The same (z_j, t_j) are used for every epoch; rho is exactly 1 at the
rollout parameters. FPO has no entropy term: ``regularizer`` is None.

Choices (official code ``akanazawa/fpo``, ``playground/src/flow_policy/fpo.py``, differs where noted):

* ``loss_weighting="eps"`` is the official ``u_but_supervise_as_eps`` (its default): the network
  still outputs a velocity but the loss supervises the reconstructed noise; in convention B that is
  t^2 times the plain CFM loss (derivation at ``pair_losses``).
* ``t_sampling="grid"`` (the official default, ``discretize_t_for_training=True``) draws t_j from
  the Euler evaluation times {k / n_steps}; ``"uniform"`` draws t ~ U[0, 1) (the official
  alternative).
* ``loss_reduction="sum"`` sums the squared error over action dims (genrl's ``cfm_loss``, like a
  Gaussian log-prob); the official code averages (``"mean"``): the log-ratio is then A times smaller.
* ``loss_weighting="velocity"`` and genrl's ``VelocityNet`` (256 x 256, zero last layer) are genrl's
  defaults; ``--preset fpo`` sets the official eps supervision, mean reduction, a 4 x 32 SiLU
  network, an 8-wide time embedding and the official ``output_scale`` 0.25.
* Exploration: ``exploration_noise`` adds the Euler-Maruyama "feather" noise of ``flow.integrate``
  after each step (total variance sigma^2 for a state-independent field); the official code adds
  it once to the final action. ``act(deterministic=True)`` drops it, but, like FPO's evaluation,
  still integrates from a *random* z unless ``deterministic_zero_noise`` (then z = 0).
* Behaviour cloning (``bc_loss``) is plain conditional flow matching; ``denoiser`` exposes the
  velocity and sampler to test-time composition (``policies.compose``).
* No silent clamps: the only clamp is the per-pair one, a named field (None disables it); how often
  it fires is reported by ``evaluate`` as the stat ``fpo/pair_clamp_fraction``.

Shapes: B batch, O obs dim, A action dim, M Monte-Carlo pairs per action (``n_mc``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from genrl_policies.base import PolicyModule, Terms, check_detached
from genrl_policies.denoisers import VelocityDenoiser
from genrl_policies.flow import VelocityNet, cfm_loss, flow_bc_loss, integrate
from genrl_policies.nets import ACTIVATIONS

RATIO_MODES = ("average", "per_pair")
LOSS_WEIGHTINGS = ("velocity", "eps")
LOSS_REDUCTIONS = ("sum", "mean")
T_SAMPLINGS = ("grid", "uniform")


@dataclass(frozen=True)
class FPOConfig:
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden widths of the velocity MLP (``flow.VelocityNet``, zero last layer: a = z at init)."""
    activation: str = "silu"
    embed_dim: int = 64
    """Width of the Fourier time embedding (even)."""
    n_steps: int = 10
    """Euler steps from z (t = 0) to the action (t = 1)."""
    n_mc: int = 8
    """Monte-Carlo (z, t) pairs per action, drawn at rollout and fixed for the whole update."""
    t_sampling: str = "grid"
    """"grid": t ~ U{0, 1/n_steps, ..., (n_steps-1)/n_steps}; "uniform": t ~ U[0, 1)."""
    ratio_mode: str = "average"
    """"average": rho = exp(mean_j l_old - mean_j l_new), (B,); "per_pair": (B, n_mc) clamped."""
    per_pair_clamp: float | None = 3.0
    """c of the per-pair log-ratio clamp [-c, c] (official: 3); None: no clamp."""
    loss_weighting: str = "velocity"
    """"velocity": ||v - (a - z)||^2; "eps": ||z - (x_t - t v)||^2 = t^2 ||v - (a - z)||^2."""
    loss_reduction: str = "sum"
    """Over action dims: "sum" (genrl) or "mean" (official FPO)."""
    exploration_noise: float = 0.0
    """Std of the per-step feather noise while sampling (0: the plain ODE map)."""
    deterministic_zero_noise: bool = False
    """``act(deterministic=True)`` integrates from z = 0 instead of a random z (FPO: random)."""
    output_scale: float = 1.0
    """Multiplies the velocity network's output (official ``policy_mlp_output_scale``: 0.25)."""

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(int(h) != h or h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{self.activation}'; valid: {sorted(ACTIVATIONS)}")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be an even integer >= 2, got {self.embed_dim!r}")
        for name in ("n_steps", "n_mc"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value, valid in (
            ("t_sampling", self.t_sampling, T_SAMPLINGS),
            ("ratio_mode", self.ratio_mode, RATIO_MODES),
            ("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS),
            ("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
        c = self.per_pair_clamp
        if c is not None and not (math.isfinite(c) and c > 0):
            raise ValueError(f"per_pair_clamp must be a finite number > 0 or None, got {c}")
        if not (math.isfinite(self.output_scale) and self.output_scale > 0):
            raise ValueError(f"output_scale must be a finite number > 0, got {self.output_scale}")
        if not (math.isfinite(self.exploration_noise) and self.exploration_noise >= 0):
            raise ValueError(f"exploration_noise must be a finite number >= 0, got {self.exploration_noise}")


@dataclass(frozen=True)
class FPORecord:
    action: Tensor  # (B, A) the sampled action, before any clipping by the env
    eps: Tensor  # (B, M, A) the noise z_j of each Monte-Carlo pair
    t: Tensor  # (B, M) the time t_j of each pair
    cfm_loss: Tensor  # (B, M) l_old,j: per-pair CFM losses under the rollout parameters


class FPOPolicy(PolicyModule):
    """Flow policy trained by FPO's CFM-loss-difference ratio; no entropy regulariser."""

    family = "fpo"
    config_class = FPOConfig

    def __init__(self, obs_dim: int, action_dim: int, config: FPOConfig | None = None) -> None:
        super().__init__(obs_dim, action_dim, config or FPOConfig())
        cfg = self.config
        hidden = tuple(int(h) for h in cfg.hidden_sizes)
        self.velocity = VelocityNet(obs_dim, action_dim, hidden, cfg.activation, cfg.embed_dim, cfg.output_scale)

    # -- the per-pair loss ----------------------------------------------------------------------
    def pair_losses(self, obs: Tensor, action: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Per-pair CFM losses l_j: obs (B, O), action (B, A), eps (B, M, A), t (B, M) -> (B, M).

        "eps" weighting (FPO's ``u_but_supervise_as_eps``) in convention B: the noise implied by a
        velocity v at x_t = (1 - t) z + t a is z_hat = x_t - t v (step back to t = 0), and
            z - z_hat = z - (1 - t) z - t a + t v = -t ((a - z) - v),
        so ||z - z_hat||^2 = t^2 ||v - (a - z)||^2: t^2 times the plain CFM loss. (The official
        convention A has x_t = t eps + (1 - t) a, hence its (1 - t)^2 = t_B^2 with t_B = 1 - t_A.)
        """
        B, M, A = eps.shape
        flat_obs = obs.unsqueeze(1).expand(B, M, obs.shape[-1]).reshape(B * M, -1)
        flat_act = action.unsqueeze(1).expand(B, M, A).reshape(B * M, A)
        flat_t = t.reshape(B * M)
        loss = cfm_loss(self.velocity, flat_act, eps.reshape(B * M, A), flat_t, flat_obs)  # (B*M,)
        if self.config.loss_weighting == "eps":
            loss = flat_t.square() * loss
        if self.config.loss_reduction == "mean":
            loss = loss / A
        return loss.view(B, M)

    def _draw_pairs(self, like: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(eps (B, M, A), t (B, M)) for ``like`` of shape (B, A)."""
        cfg, (B, A) = self.config, like.shape
        kw = dict(generator=generator, dtype=like.dtype, device=like.device)
        eps = torch.randn(B, cfg.n_mc, A, **kw)
        if cfg.t_sampling == "grid":
            k = torch.randint(0, cfg.n_steps, (B, cfg.n_mc), generator=generator, device=like.device)
            t = k.to(like.dtype) / cfg.n_steps
        else:
            t = torch.rand(B, cfg.n_mc, **kw)
        return eps, t

    # -- behaviour cloning and composition ------------------------------------------------------
    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Conditional flow matching on the sampler's path, a scalar:

            z ~ N(0, I),  t ~ U[0, 1),  x_t = (1 - t) z + t a,
            loss = mean over batch and action dims of (v_theta(x_t, t | s) - (a - z))^2,

        whose minimiser transports N(0, I) to the demonstrated actions: ``act(deterministic=True)``
        (random z, no feather noise) then samples their distribution. The plain velocity loss
        whatever ``loss_weighting`` says (FPO's "eps" weight t^2 is a ratio choice and would
        starve the early steps) and, like Diffusion Policy, a mean over action dims. Stochastic
        ``act`` adds the feather noise ``exploration_noise`` on top.
        """
        self.check_bc_batch(obs, actions)
        return flow_bc_loss(self.velocity, obs, actions, generator)

    def denoiser(self) -> VelocityDenoiser:
        """This policy as a rectified-flow velocity parent for test-time composition."""
        zero_start = self.config.deterministic_zero_noise

        def start(shape: tuple[int, int], deterministic: bool, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
            z = torch.randn(shape, generator=generator, dtype=dtype, device=device)  # drawn even when replaced, as in act
            return torch.zeros_like(z) if deterministic and zero_start else z

        return VelocityDenoiser(
            family=self.family,
            obs_dim=self.obs_dim,
            action_dim=self.action_dim,
            velocity=self.velocity,
            n_steps=self.config.n_steps,
            method="euler",
            start_fn=start,
            feather_std=self.config.exploration_noise,
        )

    # -- the contract ---------------------------------------------------------------------------
    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, FPORecord]:
        """a = Euler-integrate v from z ~ N(0, I); then draw the M pairs and their old losses.

        ``deterministic`` drops the feather noise only; z stays random (as in FPO's evaluation)
        unless ``deterministic_zero_noise``. The record is complete in both modes.
        """
        self.check_obs(obs)
        cfg, B = self.config, obs.shape[0]
        with torch.no_grad():
            z = torch.randn(B, self.action_dim, generator=generator, dtype=obs.dtype, device=obs.device)
            if deterministic and cfg.deterministic_zero_noise:
                z = torch.zeros_like(z)
            noise = 0.0 if deterministic else cfg.exploration_noise
            action = integrate(self.velocity, z, obs, cfg.n_steps, "euler", noise_scale=noise, generator=generator)
            eps, t = self._draw_pairs(action, generator)
            old = self.pair_losses(obs, action, eps, t)
        return action, FPORecord(action, eps, t, old)

    def log_ratio(self, obs: Tensor, record: FPORecord) -> Tensor:
        """ "average": (B,) mean_j l_old - mean_j l_new; "per_pair": (B, M) clamp(l_old - l_new)."""
        check_detached(record)
        self.check_obs(obs)
        new = self.pair_losses(obs, record.action, record.eps, record.t)  # (B, M)
        if self.config.ratio_mode == "average":
            return record.cfm_loss.mean(-1) - new.mean(-1)
        diff = record.cfm_loss - new
        c = self.config.per_pair_clamp
        return diff if c is None else diff.clamp(-c, c)

    def evaluate(self, obs: Tensor, record: FPORecord, returns: Tensor, *, regularize: bool = True, generator: torch.Generator | None = None) -> Terms:
        """The log-ratio (no regulariser, no loss of its own) and, with a clamped per-pair ratio,
        the statistic ``fpo/pair_clamp_fraction``: the share of pairs whose |l_old - l_new|
        exceeded the clamp."""
        log_ratio = self.log_ratio(obs, record)
        c = self.config.per_pair_clamp
        if self.config.ratio_mode != "per_pair" or c is None:
            return Terms(log_ratio)
        with torch.no_grad():  # |clamped| == c exactly where the raw difference reached the clamp
            fraction = (log_ratio.abs() >= c).to(log_ratio.dtype).mean()
        return Terms(log_ratio, stats={"fpo/pair_clamp_fraction": fraction})

    def regularizer(self, obs: Tensor, record: FPORecord) -> None:
        """FPO has no entropy (or other) regulariser."""
        return None

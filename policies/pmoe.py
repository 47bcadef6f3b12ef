"""Probabilistic Mixture-of-Experts policy (PMOE; Ren et al., arXiv 2104.09122) for PPO and SAC.

pi(a|s) = sum_k alpha_k(s) N(a; mu_k(s), diag(sigma_k^2)): one shared trunk gives M expert means,
each expert has its own state-independent log sigma, and a softmax mixing head gives alpha(s).
Acting samples k ~ Cat(alpha(s)) and then a ~ N(mu_k, sigma_k). PPO's ratio uses the full mixture
log-likelihood (logsumexp), so the clipped loss also trains alpha. Sampling k is not
differentiable; ``auxiliary_loss`` trains alpha with one of three estimators, scored by an
auxiliary Q(s, a) network regressed on the PPO return targets:

* ``"pmoe"`` (frequency approximate gradient, default): draw one reparameterised action from
  every expert, k* = argmax_k Q(s, a_k), minimise mean_k (alpha_k - onehot(k*)_k)^2 (the
  references' ``F.mse_loss``: a mean over experts as well as states). In expectation
  alpha_k(s) -> P(expert k wins at s).
* ``"gumbel"``: a = sum_k y_k a_k with y a Gumbel-Softmax sample of alpha; minimise -Q(s, a).
* ``"score"``: REINFORCE, -log alpha_k (Q(s, a_k) - sum_j alpha_j Q(s, a_j)) with k ~ Cat(alpha).

Only alpha learns from the mixing loss: expert samples are detached and Q's parameters are frozen
there (Q learns only from its regression loss). Keep Q out of the policy's grad-norm clipping
(``q_parameters``) if PPO gradients must match a Gaussian policy exactly at K = 1.

SAC (``genrl.algos.pmoe_sac``, the official rlkit-pmoe ``TanhPMOEGaussianPolicy``) uses
``squash = "tanh"``: expert k's action is tanh(u) rescaled to the action box (``set_action_box``)
with u ~ N(mu_k, sigma_k^2), log sigma a state-dependent head on the trunk's last hidden layer
(``state_dependent_std``) clamped to [-20, 2], alpha on the detached features
(``mixing_input = "features"``). Log-densities are those of tanh(u) in [-1, 1]^A, as the Gaussian
family's: each expert's density carries the tanh Jacobian before the mixture's logsumexp.
``rsample_experts`` draws one reparameterised action per expert with each expert's *own*
log-density (the PMOE estimator scores them all); ``rsample`` draws k ~ Cat(alpha), then expert
k's reparameterised action, and returns expert k's own log-density (not the mixture's: what the
official critic target uses); ``rsample_relaxed`` blends the experts with Gumbel-Softmax weights
(the Gumbel baseline) and returns the mixture's log-density of the blend. SAC does not use the
auxiliary Q (its twin critic scores the experts) and does not train it.

Shapes: B batch, A action dim, M experts (``n_experts``, K in the paper), D obs dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from genrl_policies.base import PolicyModule, check_detached
from genrl_policies.gaussian import LOG_STD_MAX, LOG_STD_MIN, SQUASHES, GaussianPolicy, tanh_log_det_jacobian
from genrl_policies.nets import ACTIVATIONS, LOG_SQRT_2PI, MLP, diag_gaussian_log_prob, mlp

ESTIMATORS = ("pmoe", "gumbel", "score")
MIXING_INPUTS = ("obs", "features")
DETERMINISTIC_EXPERTS = ("sample", "argmax")


@dataclass(frozen=True)
class PMOEConfig:
    n_experts: int = 5
    """Number of Gaussian experts M (5 in the co-author PPO script, 4 in the official SAC code)."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the shared actor trunk."""
    activation: str = "tanh"
    log_std_init: float = 0.0
    """Initial log sigma of every expert and action dimension (the bias of the head if state-dependent)."""
    squash: str = "none"
    """"none": unbounded experts (PPO; the env clips); "tanh": every expert's sample squashed by tanh
    and rescaled to the action box, log-probs with the tanh Jacobian, log sigma in [-20, 2] (SAC)."""
    state_dependent_std: bool = False
    """If true, every expert's log sigma is a head on the trunk's last hidden layer (official
    PMOE-SAC code) instead of a free parameter."""
    estimator: str = "pmoe"
    """Mixing-weight gradient estimator: "pmoe" | "gumbel" | "score" (PPO's auxiliary loss here;
    under --algo sac the whole actor loss, ``genrl.algos.pmoe_sac``)."""
    gumbel_tau: float = 1.0
    gumbel_hard: bool = False
    """Straight-through Gumbel-Softmax: exact one-hot forward, relaxed backward."""
    q_hidden_sizes: tuple[int, ...] = (64, 64, 64)
    """Hidden widths (ReLU) of the auxiliary Q(s, a) network."""
    mixing_input: str = "obs"
    """"obs": linear head on raw obs (co-author PPO); "features": on the detached last hidden layer (official)."""
    deterministic_expert: str = "sample"
    """Expert used by ``act(deterministic=True)``: "sample" k ~ alpha (official code) or "argmax"."""
    mixing_coef: float = 1.0
    q_coef: float = 1.0

    def __post_init__(self) -> None:
        if int(self.n_experts) != self.n_experts or self.n_experts < 1:
            raise ValueError(f"n_experts must be an integer >= 1, got {self.n_experts}")
        if not self.hidden_sizes or any(int(h) <= 0 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")
        if any(int(h) <= 0 for h in self.q_hidden_sizes):
            raise ValueError(f"q_hidden_sizes must be positive integers, got {self.q_hidden_sizes}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{self.activation}'; valid: {sorted(ACTIVATIONS)}")
        if not math.isfinite(self.log_std_init):
            raise ValueError(f"log_std_init must be finite, got {self.log_std_init}")
        for name, value, valid in (
            ("estimator", self.estimator, ESTIMATORS),
            ("squash", self.squash, SQUASHES),
            ("mixing_input", self.mixing_input, MIXING_INPUTS),
            ("deterministic_expert", self.deterministic_expert, DETERMINISTIC_EXPERTS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
        if not (math.isfinite(self.gumbel_tau) and self.gumbel_tau > 0):
            raise ValueError(f"gumbel_tau must be a finite number > 0, got {self.gumbel_tau}")
        for name in ("mixing_coef", "q_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class PMOERecord:
    action: Tensor  # (B, A) the sampled action, before any clipping by the env
    log_prob: Tensor  # (B,) mixture log pi_old(action | obs)


def gumbel_softmax_weights(logits: Tensor, tau: float, hard: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """y = softmax((logits + g) / tau), g ~ Gumbel(0, 1): (..., M) -> (..., M).

    With ``hard`` the forward value is exactly onehot(argmax y) and the gradient is that of y
    (straight-through).
    """
    expo = torch.empty_like(logits).exponential_(generator=generator)  # -log Exp(1) ~ Gumbel(0, 1)
    y = torch.softmax((logits - expo.log()) / tau, dim=-1)
    if not hard:
        return y
    one_hot = F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
    return one_hot + (y - y.detach())  # forward: exactly one_hot


def score_function_surrogate(log_alpha: Tensor, q: Tensor, generator: torch.Generator | None = None, index: Tensor | None = None) -> Tensor:
    """Per-sample REINFORCE surrogate, (B, M), (B, M) -> (B,).

    k ~ Cat(alpha) (or the given ``index`` (B,), drawn so by the caller), returns
    log alpha_k * (q_k - b) with the baseline b = sum_j alpha_j q_j and everything but log alpha_k
    detached; its gradient is an unbiased estimate of grad sum_k alpha_k q_k.
    """
    alpha = log_alpha.detach().exp()
    k = torch.multinomial(alpha, 1, generator=generator) if index is None else index[:, None]  # (B, 1)
    baseline = (alpha * q.detach()).sum(-1)  # (B,)
    advantage = q.detach().gather(-1, k).squeeze(-1) - baseline
    return log_alpha.gather(-1, k).squeeze(-1) * advantage


class PMOEPolicy(PolicyModule):
    """Gaussian mixture policy; ``regularizer`` is an entropy upper bound, ``auxiliary_loss``
    the Q regression plus the mixing-weight loss."""

    family = "pmoe"
    config_class = PMOEConfig

    def __init__(self, obs_dim: int, action_dim: int, config: PMOEConfig | None = None) -> None:
        super().__init__(obs_dim, action_dim, config or PMOEConfig())
        cfg = self.config
        hidden, m = tuple(int(h) for h in cfg.hidden_sizes), int(cfg.n_experts)
        self.n_experts = m
        # Trunk = every layer of a Gaussian mean net but the last; mean_head = that last layer.
        trunk = mlp(obs_dim, hidden[:-1], hidden[-1], cfg.activation, out_gain=math.sqrt(2.0))
        self.trunk = MLP(*trunk, ACTIVATIONS[cfg.activation]())
        self.mean_head = mlp(hidden[-1], (), m * action_dim, out_gain=0.01)[0]
        if cfg.state_dependent_std:  # rows k*A..(k+1)*A: expert k, as the mean head's
            self.log_std_head = mlp(hidden[-1], (), m * action_dim, out_gain=0.01)[0]
            with torch.no_grad():
                self.log_std_head.bias.fill_(float(cfg.log_std_init))
        else:
            self.log_std = nn.Parameter(torch.full((m, action_dim), float(cfg.log_std_init)))
        mix_in = obs_dim if cfg.mixing_input == "obs" else hidden[-1]
        self.mixing_head = mlp(mix_in, (), m, out_gain=0.01)[0]  # near-uniform alpha at init
        self.q = mlp(obs_dim + action_dim, tuple(int(h) for h in cfg.q_hidden_sizes), 1, "relu")
        self.squashed = cfg.squash == "tanh"
        if self.squashed:  # a = tanh(u) * action_scale + action_offset; [-1, 1] until set_action_box
            self.register_buffer("action_scale", torch.ones(action_dim))
            self.register_buffer("action_offset", torch.zeros(action_dim))

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """The auxiliary Q-network: kept out of the policy's gradient-norm clipping (§9.6)."""
        return list(self.q.parameters())

    def q_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the auxiliary Q network (not part of pi)."""
        return self.q.parameters()

    def set_action_box(self, low: Any, high: Any) -> None:
        """Squash into the box [low, high] ((A,) arrays or tensors, finite); saved with the weights."""
        if not self.squashed:
            raise ValueError("set_action_box needs squash = 'tanh'")
        GaussianPolicy.set_action_box(self, low, high)  # type: ignore[arg-type]  # the same checks and buffers

    def squash(self, u: Tensor) -> Tensor:
        """tanh(u) rescaled to the action box."""
        return torch.tanh(u) * self.action_scale + self.action_offset

    def mixture(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log alpha (B, M), means (B, M, A), log_std (M, A), or (B, M, A) if state-dependent);
        under the squash: of u, log sigma clamped to [-20, 2]."""
        features = self.trunk(obs)  # (B, H)
        means = self.mean_head(features).view(obs.shape[0], self.n_experts, self.action_dim)
        if self.config.state_dependent_std:
            log_std = self.log_std_head(features).view(obs.shape[0], self.n_experts, self.action_dim)
        else:
            log_std = self.log_std
        if self.squashed:
            log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        mix_in = obs if self.config.mixing_input == "obs" else features.detach()
        return torch.log_softmax(self.mixing_head(mix_in), dim=-1), means, log_std

    def q_value(self, obs: Tensor, action: Tensor, *, frozen: bool = False) -> Tensor:
        """Q(s, a): obs (B, D), action (B, A) -> (B,) or (B, M, A) -> (B, M).

        ``frozen`` evaluates Q with detached parameters: gradients reach the action, not Q.
        """
        if action.ndim == obs.ndim + 1:
            obs = obs.unsqueeze(-2).expand(*action.shape[:-1], obs.shape[-1])
        x = torch.cat([obs, action], dim=-1)
        if frozen:
            params = {n: p.detach() for n, p in self.q.named_parameters()}
            return torch.func.functional_call(self.q, params, (x,)).squeeze(-1)
        return self.q(x).squeeze(-1)

    def sample_expert(self, log_alpha: Tensor, generator: torch.Generator | None) -> Tensor:
        """k ~ Cat(alpha), (B,); nothing drawn for M = 1 (the same random stream as a Gaussian)."""
        if self.n_experts == 1:
            return torch.zeros(log_alpha.shape[0], dtype=torch.long, device=log_alpha.device)
        return torch.multinomial(log_alpha.exp(), 1, generator=generator).squeeze(-1)

    @staticmethod
    def _expert_log_std(log_std: Tensor, k: Tensor) -> Tensor:
        """Expert k's log sigma per row, (B, A), from (M, A) or (B, M, A)."""
        return log_std[k] if log_std.ndim == 2 else log_std[torch.arange(k.shape[0], device=k.device), k]

    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, PMOERecord]:
        """k ~ Cat(alpha(s)), a ~ N(mu_k, sigma_k). ``deterministic`` gives a = mu_k, with k still
        *sampled* from alpha (official code) unless ``deterministic_expert="argmax"``. Under the
        squash the env gets the squashed action and the record keeps u, before it."""
        self.check_obs(obs)
        log_alpha, means, log_std = self.mixture(obs)
        if deterministic and self.config.deterministic_expert == "argmax" and self.n_experts > 1:
            k = log_alpha.argmax(-1)
        else:
            k = self.sample_expert(log_alpha, generator)  # (B,)
        mean = means[torch.arange(obs.shape[0], device=obs.device), k]  # (B, A)
        if deterministic:
            action = mean
        else:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            action = mean + noise * self._expert_log_std(log_std, k).exp()
        log_prob = self._mixture_log_prob(action, log_alpha, means, log_std)
        out = self.squash(action) if self.squashed else action
        return out.detach(), PMOERecord(action.detach(), log_prob.detach())

    def _mixture_log_prob(self, action: Tensor, log_alpha: Tensor, means: Tensor, log_std: Tensor) -> Tensor:
        """log sum_k alpha_k pi_k(action) via logsumexp, (B,); under the squash ``action`` is u and
        every expert's density carries the tanh Jacobian (that of tanh(u)) before the logsumexp."""
        per_expert = diag_gaussian_log_prob(action.unsqueeze(-2), means, log_std)  # (B, M)
        if self.squashed:
            per_expert = per_expert - tanh_log_det_jacobian(action).sum(-1, keepdim=True)
        return torch.logsumexp(log_alpha + per_expert, dim=-1)  # (B,)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """log sum_k alpha_k pi_k(a|s) via logsumexp, shape (B,), of an action as ``act`` returns it
        (in the box under the squash: inverted, actions on the edge pulled just inside)."""
        if self.squashed:
            eps = torch.finfo(action.dtype).eps
            action = torch.atanh(((action - self.action_offset) / self.action_scale).clamp(-1.0 + eps, 1.0 - eps))
        return self._mixture_log_prob(action, *self.mixture(obs))

    def log_ratio(self, obs: Tensor, record: PMOERecord) -> Tensor:
        check_detached(record)
        self.check_obs(obs)
        if self.squashed:
            return self._mixture_log_prob(record.action, *self.mixture(obs)) - record.log_prob
        return self.log_prob(obs, record.action) - record.log_prob

    # -- reparameterised samples (SAC) -----------------------------------------------------------
    def rsample_experts(self, obs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One reparameterised action per expert: (action (B, M, A), each expert's own log-density
        of its action (B, M), log alpha (B, M)), differentiable in the parameters."""
        self.check_obs(obs)
        log_alpha, means, log_std = self.mixture(obs)
        noise = torch.randn(means.shape, generator=generator, dtype=means.dtype, device=means.device)
        u = means + noise * log_std.exp()
        log_prob = (-0.5 * noise.square() - log_std - LOG_SQRT_2PI).sum(-1)  # log N(u; mu_k, sigma_k), (B, M)
        if not self.squashed:
            return u, log_prob, log_alpha
        return self.squash(u), log_prob - tanh_log_det_jacobian(u).sum(-1), log_alpha

    def rsample(self, obs: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """k ~ Cat(alpha(s)), then expert k's reparameterised action: (action (B, A), log pi_k(a|s)
        (B,)), expert k's *own* log-density (the official critic target's), not the mixture's."""
        self.check_obs(obs)
        log_alpha, means, log_std = self.mixture(obs)
        k = self.sample_expert(log_alpha, generator)
        mean, expert_log_std = means[torch.arange(obs.shape[0], device=obs.device), k], self._expert_log_std(log_std, k)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        u = mean + noise * expert_log_std.exp()
        log_prob = (-0.5 * noise.square() - expert_log_std - LOG_SQRT_2PI).sum(-1)
        if not self.squashed:
            return u, log_prob
        return self.squash(u), log_prob - tanh_log_det_jacobian(u).sum(-1)

    def rsample_relaxed(self, obs: Tensor, tau: float, hard: bool, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Gumbel-Softmax blend of one reparameterised u_k per expert: u = sum_k y_k u_k with
        y = ``gumbel_softmax_weights(log alpha, tau, hard)``, a = squash(u) (the blend is taken
        before the squash, so a = sum_k y_k a_k whenever y is one-hot). Returns (a (B, A), the
        mixture's log-density log pi(a|s) (B,), log alpha (B, M)), all differentiable."""
        self.check_obs(obs)
        log_alpha, means, log_std = self.mixture(obs)
        noise = torch.randn(means.shape, generator=generator, dtype=means.dtype, device=means.device)
        y = gumbel_softmax_weights(log_alpha, tau, hard, generator)  # (B, M)
        u = (y.unsqueeze(-1) * (means + noise * log_std.exp())).sum(-2)  # (B, A)
        log_prob = self._mixture_log_prob(u, log_alpha, means, log_std)
        return (self.squash(u) if self.squashed else u), log_prob, log_alpha

    def regularizer(self, obs: Tensor, record: PMOERecord) -> Tensor:
        """Entropy upper bound H(alpha) + sum_k alpha_k H(N_k), shape (B,).

        A mixture has no closed-form entropy; this bound (H[a] <= H[a, k]) is differentiable and
        noise-free, unlike -log pi(a|s) at one sample, and is exact for M = 1 (under the squash:
        of u, before it).
        """
        log_alpha, _, log_std = self.mixture(obs)
        expert_entropy = (log_std + LOG_SQRT_2PI + 0.5).sum(-1)  # (M,) or (B, M)
        alpha = log_alpha.exp()
        return -(alpha * log_alpha).sum(-1) + (alpha * expert_entropy).sum(-1)

    def mixing_loss(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The configured estimator's loss for alpha (scalar); experts and Q get no gradient."""
        log_alpha, means, log_std = self.mixture(obs)
        noise = torch.randn(means.shape, generator=generator, dtype=means.dtype, device=means.device)
        samples = means + noise * log_std.exp()
        samples = (self.squash(samples) if self.squashed else samples).detach()  # (B, M, A) one per expert
        estimator = self.config.estimator
        if estimator == "gumbel":
            y = gumbel_softmax_weights(log_alpha, self.config.gumbel_tau, self.config.gumbel_hard, generator)
            action = (y.unsqueeze(-1) * samples).sum(-2)  # (B, A)
            return -self.q_value(obs, action, frozen=True).mean()
        with torch.no_grad():
            q = self.q_value(obs, samples)  # (B, M)
        if estimator == "pmoe":
            best = F.one_hot(q.argmax(-1), self.n_experts).to(log_alpha.dtype)
            return F.mse_loss(log_alpha.exp(), best)  # mean over experts and batch, as both reference codes
        return -score_function_surrogate(log_alpha, q, generator).mean()

    def auxiliary_loss(self, obs: Tensor, record: PMOERecord, returns: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """q_coef * MSE(Q(s, a_stored), returns) + mixing_coef * mixing_loss(obs)."""
        if returns.shape != (obs.shape[0],):
            raise ValueError(f"returns has shape {tuple(returns.shape)}, expected ({obs.shape[0]},)")
        q_loss = F.mse_loss(self.q_value(obs, record.action), returns)
        mix = self.mixing_loss(obs, generator)
        loss = self.config.q_coef * q_loss + self.config.mixing_coef * mix
        with torch.no_grad():
            log_alpha = self.mixture(obs)[0]
            alpha = log_alpha.exp()
            stats = {
                "pmoe/q_loss": q_loss.detach(),
                "pmoe/mixing_loss": mix.detach(),
                "pmoe/alpha_entropy": -(alpha * log_alpha).sum(-1).mean(),
                "pmoe/alpha_max": alpha.max(-1).values.mean(),
            }
        return loss, stats

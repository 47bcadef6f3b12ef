"""PMOE-SAC (``--algo sac --policy pmoe``): SAC with a probabilistic mixture-of-experts actor
(Ren et al., arXiv 2104.09122) as the official code defines it (JieRen98/rlkit-pmoe
``PMOEsac.py`` + ``TanhPMOEGaussianPolicy``; design notes: algorithms.md 6.2).

Shape legend: B batch, O obs dim, A action dim, K experts (``n_experts``).

The actor is ``genrl_policies.pmoe.PMOEPolicy`` with ``squash = "tanh"``: K tanh-squashed
Gaussian experts from one shared trunk, each with a state-dependent log sigma (clamped to
[-20, 2]), and softmax mixing weights alpha(s) from a linear head on the trunk's **detached**
last hidden layer (``mixing_input = "features"``), so no mixing loss ever shapes the trunk:

    pi(a|s) = sum_k alpha_k(s) pi_k(a|s),   pi_k: a = tanh(mu_k(s) + sigma_k(s) xi) (in the box)

log pi_k is expert k's own log-density of tanh(u) in [-1, 1]^A (the Gaussian SAC convention).
Everything else is ``genrl.algos.sac`` unchanged: the twin critic, its loss, the temperature
update, the Polyak targets, the delayed actor, the replay buffer and the run loop. PMOE changes
two things, picked by SAC from the policy family:

    critic target  k' ~ Cat(alpha(s')) (sampled, not the best), a' ~ pi_k'(.|s') reparameterised,
                   y = R_n + gamma^n (1 - d) (min_j Qbar_j(s', a') - alpha_ent log pi_k'(a'|s'))
                   (``PMOEPolicy.rsample``: expert k''s own log-density, not the mixture's)
    actor loss     one of three estimators (``policy_config.estimator``):

"pmoe" (frequency approximate gradient, the paper's method; default). For every state draw one
reparameterised action from every expert, a_k ~ pi_k(.|s), score it q_k = min_j Q_j(s, a_k),
k* = argmax_k q_k:

    L_pi  = mean_s (alpha_ent log pi_k*(a_k*|s) - q_k*)     only the best expert gets gradient,
                                                            with its own log-density
    L_mix = mean_{s,k} (alpha_k(s) - onehot(k*)_k)^2        F.mse_loss, as the reference
    L     = L_pi + mixing_coef L_mix                        one Adam step (mixing_coef 1: official)

In expectation alpha_k(s) -> P(expert k wins at s). The temperature step uses log pi_k*.

"gumbel" (Gumbel-Softmax reparameterisation, a baseline of the paper). One reparameterised
pre-squash sample u_k per expert, y = gumbel_softmax_weights(log alpha, gumbel_tau, gumbel_hard),
a = squash(sum_k y_k u_k) (the blend is taken before the tanh, so a = sum_k y_k a_k whenever y is
one-hot, e.g. ``gumbel_hard``, and log pi(a|s) needs no inverse tanh):

    L = mean_s (alpha_ent log pi(a|s) - min_j Q_j(s, a)),   log pi(a|s) = logsumexp_k(log alpha_k + log pi_k(a|s))

the *mixture's* log-density of the blended action (the policy's density: with one-hot y the
action is an exact sample of pi), differentiable in alpha through y and through log alpha. No
mixing loss; the temperature step uses this log pi.

"score" (score-ratio / REINFORCE, a baseline of the paper). One reparameterised action per
expert scored as above (q_k), an expert k ~ Cat(alpha(s)) sampled:

    L_pi  = mean_s (alpha_ent log pi_k(a_k|s) - q_k)        the sampled expert, its own log-density
    L_mix = -mean_s log alpha_k(s) (q_k - sum_j alpha_j q_j)   ``score_function_surrogate``, q detached
    L     = L_pi + mixing_coef L_mix

an unbiased estimate of grad_alpha sum_k alpha_k q_k with the expected-Q baseline. The
temperature step uses log pi_k.

All estimators share the critic target above, and every draw uses SAC's generator (exact resume).
The policy's auxiliary Q of PMOE-PPO is not used: SAC leaves it out of its actor optimizer (its
weights stay at their initialisation in the saved policy; no gradient would reach them anyway).
With K = 1 every estimator is Gaussian SAC (alpha = 1, the mixing losses vanish).

Metrics (per actor step, averaged over the iteration): ``train/mixing_loss``,
``train/mixing_entropy`` (mean H(alpha(s))), and for "pmoe"/"score" ``train/win_freq_<k>``, the
fraction of states where expert k's action has the highest min-Q.

Settings of the official example (``SAC_DEFAULTS["policy_config_for"]["pmoe"]``): K = 4, two
hidden layers of 256 ReLU; its algorithm settings differ from genrl's SAC defaults (CleanRL's) in
``policy_frequency`` (1), ``q_lr`` (3e-4) and ``learning_starts`` (1000): set them with ``--set``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genrl.errors import ConfigError
from genrl_policies.pmoe import PMOEPolicy, score_function_surrogate

#: what SAC sets on a PMOE policy whose config left squash / state_dependent_std at PPO's defaults
SAC_SETTINGS = {"squash": "tanh", "state_dependent_std": True, "mixing_input": "features"}


def squashed_pmoe(policy: PMOEPolicy) -> PMOEPolicy:
    """The PMOE policy SAC trains: ``SAC_SETTINGS`` when both squash and state_dependent_std are at
    the family's PPO defaults (rebuilt), the policy itself when they are already SAC's (its
    mixing_input as configured); a mix is refused."""
    cfg = policy.config
    if (cfg.squash, cfg.state_dependent_std) == ("none", False):
        return PMOEPolicy(policy.obs_dim, policy.action_dim, dataclasses.replace(cfg, **SAC_SETTINGS))
    if (cfg.squash, cfg.state_dependent_std) != ("tanh", True):
        raise ConfigError("--algo sac --policy pmoe needs policy_config.squash = 'tanh' with policy_config.state_dependent_std = true (or both left unset)")
    return policy


def expert_q(critic: nn.Module, obs: Tensor, action: Tensor) -> Tensor:
    """min_j Q_j(s, a_k) of every expert's action: obs (B, O), action (B, K, A) -> (B, K)."""
    b, k, a = action.shape
    q1, q2 = critic(obs.unsqueeze(1).expand(b, k, obs.shape[-1]).reshape(b * k, -1), action.reshape(b * k, a))
    return torch.minimum(q1, q2).view(b, k)


def _picked(values: Tensor, index: Tensor) -> Tensor:
    """values[b, index[b]]: (B, K), (B,) -> (B,)."""
    return values.gather(-1, index[:, None]).squeeze(-1)


def _mixing_stats(log_alpha: Tensor) -> dict[str, Tensor]:
    return {"mixing_entropy": -(log_alpha.exp() * log_alpha).sum(-1).mean().detach()}


def _win_stats(q: Tensor) -> dict[str, Tensor]:
    freq = F.one_hot(q.detach().argmax(-1), q.shape[-1]).to(q.dtype).mean(0)
    return {f"win_freq_{k}": freq[k] for k in range(q.shape[-1])}


def frequency_loss(policy: PMOEPolicy, critic: nn.Module, obs: Tensor, alpha: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The "pmoe" estimator: (L_pi + mixing_coef L_mix, log pi_k*(a_k*|s) (B,), metrics)."""
    action, log_prob, log_alpha = policy.rsample_experts(obs, generator)  # (B, K, A), (B, K), (B, K)
    q = expert_q(critic, obs, action)
    best = q.detach().argmax(-1)  # (B,)
    best_log_prob = _picked(log_prob, best)
    policy_loss = (alpha * best_log_prob - _picked(q, best)).mean()
    mixing = F.mse_loss(log_alpha.exp(), F.one_hot(best, policy.n_experts).to(log_alpha.dtype))
    loss = policy_loss + policy.config.mixing_coef * mixing
    return loss, best_log_prob, {"mixing_loss": mixing.detach(), **_mixing_stats(log_alpha), **_win_stats(q)}


def gumbel_loss(policy: PMOEPolicy, critic: nn.Module, obs: Tensor, alpha: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The "gumbel" estimator: (mean(alpha log pi(a|s) - min Q(s, a)), log pi(a|s) (B,), metrics)
    with a the Gumbel-Softmax blend and log pi the mixture's log-density."""
    cfg = policy.config
    action, log_prob, log_alpha = policy.rsample_relaxed(obs, cfg.gumbel_tau, cfg.gumbel_hard, generator)
    q1, q2 = critic(obs, action)
    loss = (alpha * log_prob - torch.minimum(q1, q2)).mean()
    return loss, log_prob, {"mixing_loss": torch.zeros((), device=obs.device), **_mixing_stats(log_alpha)}


def score_loss(policy: PMOEPolicy, critic: nn.Module, obs: Tensor, alpha: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The "score" estimator: (L_pi + mixing_coef L_mix, log pi_k(a_k|s) (B,), metrics) with
    k ~ Cat(alpha(s))."""
    action, log_prob, log_alpha = policy.rsample_experts(obs, generator)
    q = expert_q(critic, obs, action)
    k = policy.sample_expert(log_alpha.detach(), generator)  # (B,)
    picked_log_prob = _picked(log_prob, k)
    policy_loss = (alpha * picked_log_prob - _picked(q, k)).mean()
    mixing = -score_function_surrogate(log_alpha, q, index=k).mean()
    loss = policy_loss + policy.config.mixing_coef * mixing
    return loss, picked_log_prob, {"mixing_loss": mixing.detach(), **_mixing_stats(log_alpha), **_win_stats(q)}


ESTIMATORS = {"pmoe": frequency_loss, "gumbel": gumbel_loss, "score": score_loss}


def actor_loss(policy: PMOEPolicy, critic: nn.Module, obs: Tensor, alpha: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """PMOE-SAC's actor loss with the policy's estimator: (loss, the log-prob the temperature step
    uses (B,), metrics)."""
    estimator = ESTIMATORS.get(policy.config.estimator)
    if estimator is None:  # PMOEConfig refuses other names first
        raise ConfigError(f"unknown policy_config.estimator '{policy.config.estimator}' for --algo sac; valid: {', '.join(ESTIMATORS)}")
    return estimator(policy, critic, obs, alpha, generator)


__all__ = ["ESTIMATORS", "SAC_SETTINGS", "actor_loss", "expert_q", "frequency_loss", "gumbel_loss", "score_loss", "squashed_pmoe"]

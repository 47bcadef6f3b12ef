"""DPPO-style diffusion policy (Diffusion Policy Policy Optimization; Ren et al., arXiv 2409.00588).

A DDPM over actions conditioned on the observation, with K denoising steps k = K-1, ..., 0. The
network predicts the noise eps_theta(x_k, k, s); each step is a Gaussian "action" of a two-layer MDP

    x_hat_0 = sqrt(1/abar_k) x_k - sqrt(1/abar_k - 1) eps_theta       (clipped to +-denoised_clip)
    mu_k    = c1_k x_hat_0 + c2_k x_k,     x_{k-1} ~ N(mu_k, sigma_k^2 I)

with the DDPM posterior coefficients c1, c2 and variance sigma_k^2 = beta_k (1 - abar_{k-1}) /
(1 - abar_k) of DPPO's cosine beta schedule (Nichol & Dhariwal). sigma_k is clipped below at
``min_sampling_std`` when sampling and at ``min_logprob_std`` when scoring (DPPO's exploration and
stability floors; the stored log-probs use the scoring std, as DPPO's ``get_logprobs`` does).

Only the last K' = ``ft_denoising_steps`` steps (k = K'-1, ..., 0) are fine-tuned: the record keeps
that part of the chain and its per-step log-probs, and ``log_ratio`` is per step (B, K'). DPPO's
denoising discount gamma^(K'-1-i) (later, cleaner steps weigh more) and its per-step clip schedule
are the algorithm's settings (``ppo.denoising_gamma``, ``ppo.clip_coef`` -> ``ppo.clip_coef_final``
at ``ppo.clip_rate``), applied to any per-step log-ratio. With K' < K the first K - K' steps use a frozen copy of the network taken at
construction: stored as *buffers* (``base_net``), so it is outside ``parameters()`` and the
optimizer, but in the state dict, so a saved / resumed policy keeps its own base exactly (DPPO's
frozen ``actor`` is also part of its checkpoints).

Choices (official code ``irom-lab/dppo``, ``model/diffusion/diffusion_{vpg,ppo}.py``):

* Defaults follow DPPO's gym configs (denoised clip 1, noise clamp 3, std floors 0.1; PPO's
  gamma 0.99 and clip rate 3) except the clip coefficients: PPO's 0.2 at every step here, for
  training from scratch, where DPPO's fine-tuning value 0.01 barely moves a fresh network
  (measured on InvertedPendulum, README); ``--preset paper`` sets DPPO's values. The network is genrl's
  ``flow.VelocityNet`` layout (it outputs eps here), zero last layer, so eps = 0 at init; with
  ``denoised_clip=1`` that samples actions in about [-1.3, 1.3] (widen it for larger action boxes;
  None removes it).
* ``logprob_reduction="sum"`` over action dims (Gaussian-PPO convention); DPPO uses "mean".
  ``logprob_clamp`` (DPPO: (-5, 2), per element, before reducing) is off by default: a clamped
  log-prob silently stops the gradient; it is applied identically to old and new log-probs.
* ``final_action_clip`` (DPPO ``clamp_action``) is off by default; the env clips actions.
* ``act(deterministic=True)`` is noise-free: it starts from x_K = 0 and follows the means (DPPO's
  DDPM "deterministic" keeps a random x_K and a 1e-3 std floor). It still returns a record.
* ``regularizer`` is None: DPPO's "entropy" for DDPM is a constant (the std is fixed by the
  schedule), so it has no gradient; ent_coef is 0 in its configs.
* Behaviour cloning (``bc_loss``) is Diffusion Policy's / DPPO's eps-matching pretraining loss;
  ``finish_bc`` then refreshes the frozen base. ``denoiser`` exposes the network and sampler to
  test-time composition (``policies.compose``).

Shapes: B batch, O obs dim, A action dim, K denoising steps, K' fine-tuned steps (``n_ft``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genrl_policies.base import PolicyModule, check_detached
from genrl_policies.denoisers import EpsDenoiser
from genrl_policies.flow import VelocityNet
from genrl_policies.nets import ACTIVATIONS, LOG_SQRT_2PI

LOGPROB_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class DiffusionConfig:
    hidden_sizes: tuple[int, ...] = (256, 256, 256)
    activation: str = "silu"
    embed_dim: int = 64
    """Width of the Fourier embedding of k / K (even)."""
    n_denoising_steps: int = 10
    """K: DDPM steps (cosine beta schedule)."""
    ft_denoising_steps: int | None = None
    """K': fine-tuned last steps (None: all K). Earlier steps use the frozen base network."""
    min_sampling_std: float = 0.1
    min_logprob_std: float = 0.1
    noise_clamp: float | None = 3.0
    """Sampling noise clamped to [-c, c] (DPPO ``randn_clip_value``); None: no clamp."""
    denoised_clip: float | None = 1.0
    """Clip of the predicted x_0 to [-c, c] (DPPO ``denoised_clip_value``); None: no clip."""
    final_action_clip: float | None = None
    """Clip of the final action x_0 to [-c, c] (DPPO ``clamp_action``); None: no clip."""
    logprob_clamp: tuple[float, float] | None = None
    """(low, high) clamp of per-element log-probs (DPPO: (-5, 2)); None: off."""
    logprob_reduction: str = "sum"
    """Per-step log-prob over action dims: "sum" (Gaussian PPO) or "mean" (DPPO)."""

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(int(h) != h or h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{self.activation}'; valid: {sorted(ACTIVATIONS)}")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be an even integer >= 2, got {self.embed_dim!r}")
        K, ft = self.n_denoising_steps, self.ft_denoising_steps
        if not isinstance(K, int) or isinstance(K, bool) or K < 1:
            raise ValueError(f"n_denoising_steps must be an integer >= 1, got {K!r}")
        if ft is not None and (not isinstance(ft, int) or isinstance(ft, bool) or not 1 <= ft <= K):
            raise ValueError(f"ft_denoising_steps must be an integer in [1, {K}] or None, got {ft!r}")
        positive = {
            "min_sampling_std": self.min_sampling_std,
            "min_logprob_std": self.min_logprob_std,
        }
        optional = {"noise_clamp": self.noise_clamp, "denoised_clip": self.denoised_clip, "final_action_clip": self.final_action_clip}
        for name, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if self.logprob_reduction not in LOGPROB_REDUCTIONS:
            raise ValueError(f"unknown logprob_reduction '{self.logprob_reduction}'; valid: sum, mean")
        if self.logprob_clamp is not None:
            lo_hi = tuple(float(v) for v in self.logprob_clamp)
            if len(lo_hi) != 2 or not (math.isfinite(lo_hi[0]) and math.isfinite(lo_hi[1]) and lo_hi[0] < lo_hi[1]):
                raise ValueError(f"logprob_clamp must be (low, high) with low < high, got {self.logprob_clamp}")
            object.__setattr__(self, "logprob_clamp", lo_hi)  # a JSON list becomes the tuple again


@dataclass(frozen=True)
class DiffusionRecord:
    chain: Tensor  # (B, K'+1, A) x at the start of each fine-tuned step, then the final action
    log_prob: Tensor  # (B, K') per-step log-probs of the stored transitions (behaviour params)


def cosine_beta_schedule(n_steps: int, s: float = 0.008) -> Tensor:
    """DDPM betas (K,) of the cosine schedule (Nichol & Dhariwal 2021), clipped to [0, 0.999]."""
    x = torch.linspace(0, n_steps + 1, n_steps + 1, dtype=torch.float64)
    abar = torch.cos((x / (n_steps + 1) + s) / (1 + s) * math.pi * 0.5) ** 2
    abar = abar / abar[0]
    return (1 - abar[1:] / abar[:-1]).clamp(0.0, 0.999)


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are (persistent) buffers: same forward, nothing to train."""
    frozen = copy.deepcopy(module)
    for sub in frozen.modules():
        for name, p in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, p.detach().clone())
    return frozen


class DiffusionPolicy(PolicyModule):
    """DDPM action policy with per-step ratios for DPPO; no regulariser."""

    family = "diffusion"
    config_class = DiffusionConfig
    chain_ratio = True
    retired_config_keys = frozenset({"gamma_denoising", "clip_coef_base", "clip_coef_final", "clip_rate"})  # now PPO's settings

    def __init__(self, obs_dim: int, action_dim: int, config: DiffusionConfig | None = None) -> None:
        super().__init__(obs_dim, action_dim, config or DiffusionConfig())
        cfg = self.config
        K = cfg.n_denoising_steps
        self.n_ft = K if cfg.ft_denoising_steps is None else cfg.ft_denoising_steps
        hidden = tuple(int(h) for h in cfg.hidden_sizes)
        self.net = VelocityNet(obs_dim, action_dim, hidden, cfg.activation, cfg.embed_dim)  # eps_theta
        self.base_net = _frozen_copy(self.net) if self.n_ft < K else None
        betas = cosine_beta_schedule(K)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        var = betas * (1 - abar_prev) / (1 - abar)
        std = var.clamp(min=1e-20).sqrt()  # DPPO's log-variance floor
        dtype = torch.get_default_dtype()
        buffers = {  # (K,) indexed by the step k; derived from the config, so not saved
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1 - abar).sqrt(),
            "sqrt_recip_abar": (1 / abar).sqrt(),
            "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
            "mu_coef_x0": betas * abar_prev.sqrt() / (1 - abar),
            "mu_coef_xt": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
            "sampling_std": std.clamp(min=cfg.min_sampling_std),
            "logprob_std": std.clamp(min=cfg.min_logprob_std),
            "ft_steps": torch.arange(self.n_ft - 1, -1, -1),  # (K',) k of each fine-tuned step
        }
        for name, value in buffers.items():
            self.register_buffer(name, value if name == "ft_steps" else value.to(dtype), persistent=False)

    # -- one denoising step ---------------------------------------------------------------------
    def predict_eps(self, x: Tensor, k: Tensor, obs: Tensor, *, frozen: bool = False) -> Tensor:
        """eps_theta(x_k, k, s): x (N, A), k (N,) long, obs (N, O) -> (N, A); ``frozen``: the base net."""
        net = self.base_net if frozen else self.net
        assert net is not None, "no frozen base: every step is fine-tuned"
        return net(x, k.to(x.dtype) / self.config.n_denoising_steps, obs)

    def step_mean(self, x: Tensor, k: Tensor, obs: Tensor, *, frozen: bool = False) -> Tensor:
        """mu_k(x_k, s): x (N, A), k (N,) long, obs (N, O) -> (N, A); ``frozen``: the base net."""
        return self.mean_from_eps(x, k, self.predict_eps(x, k, obs, frozen=frozen))

    def mean_from_eps(self, x: Tensor, k: Tensor, eps: Tensor) -> Tensor:
        """The DDPM posterior mean mu_k from a noise prediction (x_hat_0 clipped as configured).

        Elementwise in the action dims, so it serves any action length (GPC's composed sampler).
        """
        x0 = self.sqrt_recip_abar[k, None] * x - self.sqrt_recipm1_abar[k, None] * eps
        if self.config.denoised_clip is not None:
            x0 = x0.clamp(-self.config.denoised_clip, self.config.denoised_clip)
        return self.mu_coef_x0[k, None] * x0 + self.mu_coef_xt[k, None] * x

    def step_log_probs(self, obs: Tensor, chain: Tensor) -> Tensor:
        """Per-step log N(x_{k-1}; mu_k(x_k), std_k^2) of a fine-tuned chain (B, K'+1, A) -> (B, K'),
        with std_k floored at ``min_logprob_std``, then clamped / reduced over A as configured."""
        B, n, A = chain.shape
        if n != self.n_ft + 1 or A != self.action_dim:
            raise ValueError(f"chain has shape {tuple(chain.shape)}, expected (B, {self.n_ft + 1}, {self.action_dim})")
        k = self.ft_steps.repeat(B)  # (B*K',) K'-1, ..., 0 per sample
        flat_obs = obs.repeat_interleave(self.n_ft, dim=0)  # (B*K', O)
        mean = self.step_mean(chain[:, :-1].reshape(B * self.n_ft, A), k, flat_obs).view(B, self.n_ft, A)
        std = self.logprob_std[self.ft_steps].view(1, self.n_ft, 1)
        elem = -0.5 * ((chain[:, 1:] - mean) / std).square() - std.log() - LOG_SQRT_2PI  # (B, K', A)
        if self.config.logprob_clamp is not None:
            elem = elem.clamp(*self.config.logprob_clamp)
        return elem.sum(-1) if self.config.logprob_reduction == "sum" else elem.mean(-1)

    # -- the contract ---------------------------------------------------------------------------
    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, DiffusionRecord]:
        """Sample the chain x_K ~ N(0, I) -> x_0; ``deterministic``: x_K = 0 and no step noise."""
        self.check_obs(obs)
        cfg, B, K = self.config, obs.shape[0], self.config.n_denoising_steps
        kw = dict(dtype=obs.dtype, device=obs.device)
        with torch.no_grad():
            if deterministic:
                x = torch.zeros(B, self.action_dim, **kw)
            else:
                x = torch.randn(B, self.action_dim, generator=generator, **kw)
            chain = [x] if self.n_ft == K else []
            for k in range(K - 1, -1, -1):
                k_b = torch.full((B,), k, dtype=torch.long, device=obs.device)
                x = self.step_mean(x, k_b, obs, frozen=k >= self.n_ft)
                if not deterministic:
                    noise = torch.randn(x.shape, generator=generator, **kw)
                    if cfg.noise_clamp is not None:
                        noise = noise.clamp(-cfg.noise_clamp, cfg.noise_clamp)
                    x = x + self.sampling_std[k] * noise
                if k == 0 and cfg.final_action_clip is not None:
                    x = x.clamp(-cfg.final_action_clip, cfg.final_action_clip)
                if k <= self.n_ft:  # output of step k = input of fine-tuned step k - 1
                    chain.append(x)
            chain_t = torch.stack(chain, dim=1)  # (B, K'+1, A)
            log_prob = self.step_log_probs(obs, chain_t)
        return x, DiffusionRecord(chain_t, log_prob)

    def chain_log_prob(self, obs: Tensor, record: DiffusionRecord) -> Tensor:
        """Log-prob of the fine-tuned part of the chain under the current parameters, (B,)."""
        self.check_obs(obs)
        return self.step_log_probs(obs, record.chain).sum(-1)

    def log_ratio(self, obs: Tensor, record: DiffusionRecord) -> Tensor:
        """Per-step log pi_theta - log pi_old of the stored transitions, (B, K')."""
        check_detached(record)
        self.check_obs(obs)
        return self.step_log_probs(obs, record.chain) - record.log_prob

    def regularizer(self, obs: Tensor, record: DiffusionRecord) -> None:
        """None: the per-step Gaussian entropy is fixed by the schedule (no gradient)."""
        return None

    # -- behaviour cloning and composition ------------------------------------------------------
    def bc_loss(self, obs: Tensor, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion Policy / DPPO pretraining loss, a scalar:

            k ~ U{0, ..., K-1},  eps ~ N(0, I),  x_k = sqrt(abar_k) a + sqrt(1 - abar_k) eps,
            loss = mean over batch and action dims of (eps_theta(x_k, k, s) - eps)^2,

        the eps-matching objective of the K-step cosine schedule that ``act`` reverses. It trains
        ``net`` at all K levels. With K' < K the first K - K' sampling steps use the frozen
        ``base_net``, which this loss does not touch: call ``finish_bc()`` (``sync_base()``) once
        after cloning, so the base equals the cloned network (DPPO fine-tunes from such a base).

        Actions beyond +-``denoised_clip`` (or ``final_action_clip``) are refused: the sampler
        clips there, so it could never produce them. Stochastic ``act`` keeps DPPO's per-step std
        floor ``min_sampling_std`` on top of the cloned distribution (lower it to sample the
        demonstrations closely); ``act(deterministic=True)`` follows the means from x_K = 0.
        """
        self.check_bc_batch(obs, actions)
        cfg, (B, A), K = self.config, actions.shape, self.config.n_denoising_steps
        clips = {name: getattr(cfg, name) for name in ("denoised_clip", "final_action_clip") if getattr(cfg, name) is not None}
        reach = float(actions.abs().max()) if clips else 0.0
        for name, bound in clips.items():
            if reach > bound:
                raise ValueError(f"actions reach {reach:.4g}, beyond {name}={bound}: normalise them or widen the clip")
        k = torch.randint(0, K, (B,), generator=generator, device=obs.device)
        eps = torch.randn(B, A, generator=generator, dtype=actions.dtype, device=actions.device)
        x_k = self.sqrt_abar[k, None] * actions + self.sqrt_one_minus_abar[k, None] * eps
        return (self.net(x_k, k.to(actions.dtype) / K, obs) - eps).square().mean()

    def sync_base(self) -> None:
        """Copy the trained network into the frozen base of the first K - K' steps (no-op if K' = K)."""
        if self.base_net is not None:
            self.base_net.load_state_dict(self.net.state_dict())

    def finish_bc(self) -> None:
        """After behaviour cloning: the frozen base becomes the cloned network."""
        self.sync_base()

    def denoiser(self) -> EpsDenoiser:
        """This policy as a DDPM eps-prediction parent for test-time composition."""
        cfg, K = self.config, self.config.n_denoising_steps

        def step(k: int, x: Tensor) -> Tensor:
            return torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)

        settings = {name: getattr(cfg, name) for name in ("n_denoising_steps", "min_sampling_std", "noise_clamp", "denoised_clip", "final_action_clip")}
        return EpsDenoiser(
            family=self.family,
            obs_dim=self.obs_dim,
            action_dim=self.action_dim,
            alphas_cumprod=torch.cumprod(1 - cosine_beta_schedule(K), 0),
            predict_fn=lambda x, k, obs: self.predict_eps(x, step(k, x), obs, frozen=k >= self.n_ft),
            mean_fn=lambda x, k, eps: self.mean_from_eps(x, step(k, x), eps),
            sampling_std=self.sampling_std,
            noise_clamp=cfg.noise_clamp,
            final_action_clip=cfg.final_action_clip,
            sampler_settings={"schedule": "cosine", **settings},
        )

"""GoRL: a latent Gaussian policy (the *encoder*) pushed through a deterministic generative decoder.

GoRL (Zhang et al., "GoRL: An Algorithm-Agnostic Framework for Online Reinforcement Learning with
Generative Policies", arXiv 2512.02581) factorises pi(a|s) = int pi_theta(eps|s) pi_phi(a|s, eps)
d eps with

* the **encoder** pi_theta(eps|s) = N(mu_theta(s), diag sigma^2): a diagonal Gaussian over a latent
  of the action's size (Z = A); it is the only part an RL update (PPO here) touches: the stored
  "action" of the ratio is the latent eps, the log-prob is log N(eps; mu, sigma) summed over latent
  dims, and no gradient ever flows through the decoder;
* the **decoder** g_phi(s, eps), **deterministic** given (s, eps) (no SDE / feather noise: all
  exploration comes from the encoder): ``decoder="flow"`` (GoRL-FM), a conditional flow-matching
  velocity field (``flow.VelocityNet``, convention B: t = 0 noise, t = 1 action) integrated with
  ``decoder_steps`` Euler steps from x_0 = eps; ``decoder="diffusion"`` (GoRL-Diff), a DDIM
  (tau = eta = 0) sampler with T = ``decoder_steps`` steps from the terminal noise x_T = eps to the
  pre-tanh action, driven by an eps-prediction net (the same ``VelocityNet`` layout, fed t = k / T;
  see "GoRL-Diff" below). It is trained only by supervised refinement (``decoder_loss``) on (s, pre-tanh action)
  pairs with *fresh* source noise eps ~ N(0, I), never the encoder's latents (the paper's
  "fixed-prior anchor"; the algorithm lives in ``genrl.algos.gorl``);
* the executed action tanh(g_phi(s, eps)) (``squash="tanh"``, the paper's; ``"none"`` leaves the
  env to clip). tanh bounds actions to [-1, 1], the box of the DeepMind Control / most MuJoCo tasks.

Stage 0 starts from an **exactly** zero decoder (every parameter 0, the official code's choice):
the velocity is identically 0, so g(s, eps) = eps bitwise and GoRL stage 0 *is* Gaussian PPO on the
pre-tanh action (tested; for the diffusion decoder it is the near identity 1.0519 eps, see below). A refinement re-creates the decoder from scratch (``reset_decoder``, the
code retrains from scratch each time) with ``VelocityNet``'s trainable init (Xavier, zero last layer:
still the identity at t = 0 of training, but with live hidden units; an all-zero net would have no
gradient through its hidden layers).

The decoder's parameters are kept at ``requires_grad=False`` outside refinement
(``decoder_training()`` turns them on): a PPO update can never move them, even though they sit in
``parameters()`` (and so in the PPO optimiser, which skips parameters without gradients).

Choices (paper v3 / official code ``bennidict23/GoRL`` differ where noted):

* Encoder: a ``(64, 64)`` tanh MLP with a 0.01-gain mean head and a state-independent log-std
  initialised at 0, i.e. genrl's Gaussian-PPO MuJoCo default (paper: 4 x 32 SiLU with a
  state-dependent softplus std). The small head and log-std 0 make the initial encoder ~ N(0, I),
  the prior the paper re-initialises to at each stage; ``state_dependent_std`` switches to a
  second head (as ``GaussianConfig`` does, raw log-std, no softplus).
* ``encoder_squash="tanh"`` (GoRL over SAC, ``genrl.algos.gorl_sac``): the encoder is SAC's
  tanh-squashed Gaussian over the latent, eps = L tanh(u), u ~ N(mu, sigma^2), in the latent box
  [-L, L]^Z (L = ``latent_bound``, 3 as ``genrl.sb3``'s wrapper: 99.7 % of an N(0, 1) latent
  inside); log-probs are those of tanh(u) (``GaussianPolicy``'s squash), the box is saved with the
  weights. The default "none" keeps the unbounded latent of GoRL-PPO (bitwise as before).
* ``latent_reg="kl"`` (default): KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum_z (mu^2 + sigma^2 - 1 -
  log sigma^2) per sample (paper v1's "KL penalty toward N(0, I)"); ``"l2_params"`` is the code's
  mean(mu^2) + mean(sigma^2) (pulls sigma to 0, not 1); ``"none"`` turns it off. Weighted by
  ``latent_reg_coef`` and *minimised* through ``auxiliary_loss``.
* ``regularizer`` is the latent Gaussian's entropy (PPO maximises it with ``ppo.ent_coef``).

GoRL-Diff (``decoder="diffusion"``): T noise levels abar_0 > ... > abar_{T-1} (abar_{-1} := 1, the
clean action); the decoder runs the deterministic DDIM update for k = T-1, ..., 0 from x = eps,

    e = eps_phi(x, k / T | s),   x <- sqrt(abar_{k-1}) (x - sqrt(1 - abar_k) e) / sqrt(abar_k)
                                      + sqrt(1 - abar_{k-1}) e,

and is trained by the DDPM eps-prediction loss ||xi - eps_phi(a_k, k / T | s)||^2, a_k = sqrt(abar_k) a
+ sqrt(1 - abar_k) xi, xi ~ N(0, I) fresh, k uniform on {0, ..., T-1}. Two beta schedules; which one
is active is the persistent buffer ``decoder_schedule`` (0 linear, 1 cosine), so save / load and exact
resume keep it:

* **linear** (the stage-0 decoder; the design notes' account of the official code): betas = linspace(1e-4, 0.02, T) (DDPM's
  endpoints). With the all-zero eps-net every DDIM step is x <- sqrt(abar_{k-1} / abar_k) x, so
  g(s, eps) = eps / sqrt(abar_{T-1}): for T = 10, abar_9 = 0.9037394161512371 and the factor is
  1 / sqrt(abar_9) = 1.051909525569616 (the design notes' "~1.05x"), a near identity: stage 0 of
  GoRL-Diff is Gaussian PPO on 1.0519 eps, not bitwise Gaussian PPO (GoRL-FM's zero decoder is).
* **cosine** (every decoder ``reset_decoder`` creates for refinement): the first T betas of
  ``diffusion.cosine_beta_schedule(T + 1)``, i.e. its levels f(k / (T + 1)), k = 1..T. The last
  level of ``cosine_beta_schedule(T)`` is clipped to beta = 0.999 (abar_{T-1} ~ 2e-5, zero SNR: the
  first DDIM step would amplify eps-prediction errors ~200x); dropping it keeps a terminal
  abar_{T-1} ~ 0.02 (T = 10), close to the official code's 0.024 (its cosine grid of 10 levels, the
  first being abar = 1, sampled with 9 DDIM updates). A freshly reset (zero last layer) diffusion
  decoder is therefore eps / sqrt(abar_{T-1}) (~7x) until it is trained; refinement trains it at once.
* The official code (``bennidict23/GoRL``, ``decoders.py``) by default uses an "epsilon_delta"
  parameterisation on an abar linear in t (1 -> 1e-3) that keeps a zero net exactly the identity;
  the direct eps-prediction DDIM with linear-beta stage 0 and cosine refinements here is the variant
  the paper and the design notes (section 2.4) describe.

Shapes: B batch, O obs dim, A action dim, Z = A latent dim, P ``decoder_pairs``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genrl_policies.base import PolicyModule, check_detached
from genrl_policies.diffusion import cosine_beta_schedule
from genrl_policies.flow import VelocityNet, cfm_loss, integrate
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy
from genrl_policies.nets import ACTIVATIONS, LOG_SQRT_2PI, diag_gaussian_log_prob

LATENT_REGS = ("kl", "l2_params", "none")
DECODERS = ("flow", "diffusion")
SQUASHES = ("tanh", "none")
DIFFUSION_SCHEDULES = ("linear", "cosine")  # index = value of the ``decoder_schedule`` buffer


@dataclass(frozen=True)
class GoRLConfig:
    encoder_hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the encoder's mean MLP (paper: 4 x 32; genrl's MuJoCo PPO default here)."""
    encoder_activation: str = "tanh"
    """Encoder activation (paper: SiLU)."""
    log_std_init: float = 0.0
    """Initial latent log sigma (0: sigma = 1, the N(0, I) prior)."""
    state_dependent_std: bool = False
    """Latent log sigma from a second head of the encoder instead of a free parameter."""
    latent_reg: str = "kl"
    """"kl": exact KL(N(mu, sigma^2) || N(0, I)); "l2_params": mean(mu^2) + mean(sigma^2) (code); "none"."""
    latent_reg_coef: float = 1e-3
    """Weight of the latent regulariser in the minimised loss (code: 5e-4 stage 0, 1e-3 later)."""
    decoder: str = "flow"
    """"flow" (GoRL-FM, Euler-integrated flow matching) or "diffusion" (GoRL-Diff, DDIM tau = 0)."""
    decoder_hidden: tuple[int, ...] = (64, 64, 64, 64)
    """Hidden widths of the decoder's velocity / eps-prediction MLP (code's run script: 4 x 64)."""
    decoder_activation: str = "silu"
    decoder_embed_dim: int = 64
    """Width of the decoder's Fourier time embedding and observation projection (even)."""
    decoder_steps: int = 10
    """Euler steps of the decoder ODE from eps (t = 0) to the pre-tanh action (t = 1); for
    "diffusion", T: the noise levels of training and the DDIM steps of sampling (paper: 10)."""
    decoder_pairs: int = 8
    """Fresh (eps, tau) (flow) or (xi, k) (diffusion) pairs per (s, a) sample in ``decoder_loss`` (code: 8)."""
    squash: str = "tanh"
    """"tanh": env action = tanh(g(s, eps)) (paper); "none": env action = g(s, eps) (env clips)."""
    encoder_squash: str = "none"
    """"none": eps ~ N(mu, sigma^2) unbounded (PPO); "tanh": eps = latent_bound tanh(u), u ~ N(mu,
    sigma^2), SAC's squashed Gaussian in the latent box (``--algo sac``)."""
    latent_bound: float = 3.0
    """L of the latent box [-L, L]^Z under ``encoder_squash = "tanh"`` (genrl.sb3's wrapper box)."""

    def __post_init__(self) -> None:
        for name in ("encoder_hidden", "decoder_hidden"):
            hidden = getattr(self, name)
            if not hidden or any(isinstance(h, bool) or int(h) != h or h <= 0 for h in hidden):
                raise ValueError(f"{name} must be a non-empty list of positive integers, got {hidden}")
        for name in ("encoder_activation", "decoder_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"unknown {name} '{getattr(self, name)}'; valid: {', '.join(sorted(ACTIVATIONS))}")
        if self.latent_reg not in LATENT_REGS:
            raise ValueError(f"unknown latent_reg '{self.latent_reg}'; valid: {', '.join(LATENT_REGS)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"unknown decoder '{self.decoder}'; valid: {', '.join(DECODERS)}")
        if self.squash not in SQUASHES:
            raise ValueError(f"unknown squash '{self.squash}'; valid: {', '.join(SQUASHES)}")
        if self.encoder_squash not in ("none", "tanh"):
            raise ValueError(f"unknown encoder_squash '{self.encoder_squash}'; valid: none, tanh")
        lb = self.latent_bound
        if isinstance(lb, bool) or not isinstance(lb, (int, float)) or not (math.isfinite(lb) and lb > 0):
            raise ValueError(f"latent_bound must be a finite number > 0, got {lb!r}")
        for name in ("latent_reg_coef", "log_std_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.latent_reg_coef < 0:
            raise ValueError(f"latent_reg_coef must be >= 0, got {self.latent_reg_coef}")
        for name in ("decoder_steps", "decoder_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        e = self.decoder_embed_dim
        if not isinstance(e, int) or isinstance(e, bool) or e < 2 or e % 2:
            raise ValueError(f"decoder_embed_dim must be an even integer >= 2, got {e!r}")


@dataclass(frozen=True)
class GoRLRecord:
    eps: Tensor  # (B, Z) the latent sample: the "action" of the encoder's PPO ratio
    log_prob: Tensor  # (B,) log N(eps; mu_old, sigma_old) summed over latent dims
    pre_action: Tensor  # (B, A) g(s, eps), the pre-tanh decoder output (refinement target)


def gaussian_kl_to_prior(mean: Tensor, log_std: Tensor) -> Tensor:
    """KL(N(mean, diag exp(log_std)^2) || N(0, I)) = 1/2 sum (mu^2 + sigma^2 - 1 - 2 log sigma): (..., Z) -> (...)."""
    return 0.5 * (mean.square() + (2.0 * log_std).exp() - 1.0 - 2.0 * log_std).sum(-1)


def diffusion_alpha_bars(n_steps: int, schedule: str) -> Tensor:
    """abar_k, k = 0..T-1 (T = ``n_steps``), float64, of GoRL-Diff's "linear" (betas =
    linspace(1e-4, 0.02, T)) or "cosine" (the first T betas of ``cosine_beta_schedule(T + 1)``)
    schedule."""
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, n_steps, dtype=torch.float64)
    elif schedule == "cosine":
        betas = cosine_beta_schedule(n_steps + 1)[:n_steps]
    else:
        raise ValueError(f"unknown diffusion schedule '{schedule}'; valid: {', '.join(DIFFUSION_SCHEDULES)}")
    return torch.cumprod(1.0 - betas, 0)


@functools.cache
def _ddim_coefficients(n_steps: int, schedule: str) -> tuple[tuple[float, ...], ...]:
    """(sqrt abar_k, sqrt(1 - abar_k), c_x_k, c_e_k) per k as Python floats (dtype/device-free), with
    the DDIM (eta = 0) step x <- c_x_k x + c_e_k e from level k to k - 1 (abar_{-1} = 1):
    c_x = sqrt(abar_{k-1} / abar_k), c_e = sqrt(1 - abar_{k-1}) - c_x sqrt(1 - abar_k)."""
    abar = diffusion_alpha_bars(n_steps, schedule)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    c_x = (prev / abar).sqrt()
    c_e = (1.0 - prev).sqrt() - c_x * (1.0 - abar).sqrt()
    return tuple(tuple(float(v) for v in x) for x in (abar.sqrt(), (1.0 - abar).sqrt(), c_x, c_e))


def encoder_config(cfg: GoRLConfig) -> GaussianConfig:
    """The encoder's own config: GoRL's encoder is a ``GaussianPolicy`` over the latent (same
    layout, so the two load each other's weights and GoRL's stage 0 reproduces Gaussian PPO)."""
    return GaussianConfig(
        hidden_sizes=tuple(int(h) for h in cfg.encoder_hidden), activation=cfg.encoder_activation,
        log_std_init=float(cfg.log_std_init), state_dependent_std=cfg.state_dependent_std, squash=cfg.encoder_squash,
    )  # fmt: skip


class GoRLPolicy(PolicyModule):
    """Latent Gaussian encoder + deterministic flow / DDIM decoder; PPO sees only the latent."""

    family = "gorl"
    config_class = GoRLConfig

    def __init__(self, obs_dim: int, action_dim: int, config: GoRLConfig | None = None) -> None:
        super().__init__(obs_dim, action_dim, config or GoRLConfig())
        cfg = self.config
        self.latent_dim = action_dim  # Z = A: eps is the ODE's initial state
        self.encoder = self._new_encoder()
        # the encoder's construction-time weights, restored by reset_encoder() (not in the state dict)
        self._encoder_init = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        self.decoder = self._new_decoder()
        with torch.no_grad():
            for p in self.decoder.parameters():
                p.zero_()  # every parameter 0: v == 0, so g(s, eps) = eps exactly (diffusion: ~1.05 eps)
        self.decoder.requires_grad_(False)
        if cfg.decoder == "diffusion":
            # the active beta schedule (index into DIFFUSION_SCHEDULES): linear for the stage-0
            # decoder, cosine once reset_decoder() re-creates it; persistent, so saved and resumed
            self.register_buffer("decoder_schedule", torch.tensor(0, dtype=torch.long))

    def _new_encoder(self) -> GaussianPolicy:
        encoder = GaussianPolicy(self.obs_dim, self.latent_dim, encoder_config(self.config))
        if encoder.squashed:  # the latent box [-L, L]^Z, a buffer of the encoder (saved, restored by resets)
            bound = torch.full((self.latent_dim,), float(self.config.latent_bound))
            encoder.set_action_box(-bound, bound)
        return encoder

    def _new_decoder(self) -> VelocityNet:
        cfg = self.config
        hidden = tuple(int(h) for h in cfg.decoder_hidden)
        return VelocityNet(self.obs_dim, self.action_dim, hidden, cfg.decoder_activation, cfg.decoder_embed_dim)

    # -- parts ----------------------------------------------------------------------------------
    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def distribution(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder at ``obs``: (mean (B, Z), log_std (B, Z) or (Z,))."""
        return self.encoder.distribution(obs)

    @property
    def diffusion_schedule(self) -> str:
        """The active GoRL-Diff beta schedule, "linear" (stage 0) or "cosine" (after a reset)."""
        if self.config.decoder != "diffusion":
            raise AttributeError("only a decoder='diffusion' GoRL policy has a diffusion schedule")
        return DIFFUSION_SCHEDULES[int(self.decoder_schedule)]

    def decode(self, obs: Tensor, eps: Tensor) -> Tensor:
        """g(s, eps), (B, O), (B, Z) -> (B, A) pre-squash: flow, Euler-integrate the decoder's velocity
        from x_0 = eps; diffusion, T DDIM (eta = 0) steps from x_{T-1} = eps. Deterministic (no noise);
        differentiable only in the decoder's parameters."""
        T = self.config.decoder_steps
        if self.config.decoder == "flow":
            return integrate(self.decoder, eps, obs, T, "euler")
        _, _, c_x, c_e = _ddim_coefficients(T, self.diffusion_schedule)
        eps_net = self.decoder.conditioned(obs, torch.arange(T, dtype=torch.float64) / T)  # t = k / T
        x = eps
        for k in range(T - 1, -1, -1):
            x = c_x[k] * x + c_e[k] * eps_net(x, k)
        return x

    def squash(self, pre_action: Tensor) -> Tensor:
        return torch.tanh(pre_action) if self.config.squash == "tanh" else pre_action

    @contextlib.contextmanager
    def decoder_training(self) -> Iterator[list[nn.Parameter]]:
        """Inside: the decoder's parameters require grad (refinement); outside they never do."""
        params = self.decoder_parameters()
        for p in params:
            p.requires_grad_(True)
        try:
            yield params
        finally:
            for p in params:
                p.requires_grad_(False)

    # -- the contract ---------------------------------------------------------------------------
    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, GoRLRecord]:
        """eps ~ N(mu(s), sigma) (eps = mu if ``deterministic``), pre = g(s, eps), action = squash(pre).
        Under ``encoder_squash = "tanh"``: eps = L tanh(u), u ~ N(mu(s), sigma) (u = mu if deterministic)."""
        self.check_obs(obs)
        if self.encoder.squashed:
            eps, rec = self.encoder.act(obs, deterministic=deterministic, generator=generator)
            log_prob = rec.log_prob
        else:
            mean, log_std = self.encoder.distribution(obs)
            if deterministic:
                eps = mean
            else:
                noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
                eps = mean + noise * log_std.exp()
            log_prob = diag_gaussian_log_prob(eps, mean, log_std)
        eps = eps.detach()
        with torch.no_grad():
            pre = self.decode(obs, eps)
            action = self.squash(pre)
        return action, GoRLRecord(eps, log_prob.detach(), pre)

    def log_prob(self, obs: Tensor, eps: Tensor) -> Tensor:
        """log pi_theta(eps | s) summed over latent dims, (B,). The decoder plays no part."""
        if self.encoder.squashed:  # of eps = L tanh(u), as GaussianPolicy's squash
            return self.encoder.log_prob(obs, eps)
        mean, log_std = self.encoder.distribution(obs)
        return diag_gaussian_log_prob(eps, mean, log_std)

    def log_ratio(self, obs: Tensor, record: GoRLRecord) -> Tensor:
        check_detached(record)
        self.check_obs(obs)
        return self.log_prob(obs, record.eps) - record.log_prob

    def regularizer(self, obs: Tensor, record: GoRLRecord) -> Tensor:
        """Entropy of the latent Gaussian: sum_z (log sigma_z + 0.5 log(2 pi e)), shape (B,)."""
        if self.encoder.squashed:  # of u, before the squash (log sigma clamped as the encoder's)
            return self.encoder.regularizer(obs, record)
        if self.config.state_dependent_std:
            _, log_std = self.encoder.distribution(obs)
        else:
            log_std = self.encoder.log_std.expand(obs.shape[0], -1)
        return (log_std + LOG_SQRT_2PI + 0.5).sum(-1)

    def latent_regularizer(self, obs: Tensor) -> Tensor:
        """The per-sample latent regulariser R (B,) of ``config.latent_reg`` (zeros for "none").

        "kl": KL(N(mu, sigma^2) || N(0, I)); "l2_params": mean_z mu^2 + mean_z sigma^2, whose batch
        mean is the official code's mean(mu^2) + mean(sigma^2).
        """
        mean, log_std = self.encoder.distribution(obs)
        log_std = log_std.expand_as(mean)
        kind = self.config.latent_reg
        if kind == "kl":
            return gaussian_kl_to_prior(mean, log_std)
        if kind == "l2_params":
            return mean.square().mean(-1) + (2.0 * log_std).exp().mean(-1)
        return mean.new_zeros(mean.shape[0])

    def auxiliary_loss(self, obs: Tensor, record: GoRLRecord, returns: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]] | None:
        """latent_reg_coef * mean_B R(pi_theta(.|s)), minimised; None when off."""
        cfg = self.config
        if cfg.latent_reg == "none" or cfg.latent_reg_coef == 0:
            return None
        reg = self.latent_regularizer(obs).mean()
        return cfg.latent_reg_coef * reg, {"gorl_latent_reg": reg.detach()}

    # -- decoder refinement ---------------------------------------------------------------------
    def decoder_loss(self, obs: Tensor, pre_actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Generative loss of the decoder on (s, pre-tanh action) pairs, a scalar.

        Flow: each of the B samples gets ``decoder_pairs`` fresh pairs (eps ~ N(0, I), tau ~ U[0, 1]),
        x_tau = (1 - tau) eps + tau a, loss = mean ||v(x_tau, tau | s) - (a - eps)||^2 (summed over
        A). Diffusion: fresh pairs (xi ~ N(0, I), k uniform on {0..T-1}), a_k = sqrt(abar_k) a +
        sqrt(1 - abar_k) xi under the active schedule, loss = mean ||eps_phi(a_k, k / T | s) - xi||^2
        (summed over A). The encoder's latents never enter: the source is the fixed prior.
        """
        self.check_obs(obs)
        if pre_actions.shape != (obs.shape[0], self.action_dim):
            raise ValueError(f"pre_actions has shape {tuple(pre_actions.shape)}, expected ({obs.shape[0]}, {self.action_dim})")
        p = self.config.decoder_pairs
        o = obs.repeat_interleave(p, dim=0)
        a = pre_actions.repeat_interleave(p, dim=0)
        kw = dict(generator=generator, dtype=a.dtype, device=a.device)
        z = torch.randn(a.shape, **kw)
        if self.config.decoder == "diffusion":
            T = self.config.decoder_steps
            k = torch.randint(T, (a.shape[0],), generator=generator, device=a.device)
            sqrt_abar, sqrt_1m_abar, _, _ = _ddim_coefficients(T, self.diffusion_schedule)
            s1 = torch.tensor(sqrt_abar, dtype=a.dtype, device=a.device)[k, None]
            s2 = torch.tensor(sqrt_1m_abar, dtype=a.dtype, device=a.device)[k, None]
            pred = self.decoder(s1 * a + s2 * z, k.to(a.dtype) / T, o)
            return (pred - z).square().sum(-1).mean()
        tau = torch.rand(a.shape[0], **kw)
        return cfm_loss(self.decoder, a, z, tau, o).mean()

    def reset_encoder(self, seed: int | None = None) -> None:
        """Re-initialise the encoder in place (parameter objects kept, so optimisers still hold them).

        ``seed`` None: back to the weights it had at construction (every stage starts from the same
        encoder, as the official code's same-seed re-creation does); an int: a fresh init drawn
        under that seed (the global RNG is left untouched).
        """
        if seed is None:
            state = self._encoder_init
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                state = self._new_encoder().state_dict()
        self.encoder.load_state_dict(state)

    def reset_decoder(self, seed: int = 0) -> None:
        """Re-create the decoder from scratch (trainable init, drawn under ``seed``) in place.

        The fresh ``VelocityNet`` has Xavier hidden layers and a zero last layer: flow, still
        g = identity until trained; diffusion, the schedule switches to cosine (for good), under
        which the zero eps-net gives g = eps / sqrt(abar_{T-1}) until trained. Parameter objects are
        kept and stay ``requires_grad=False``.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = self._new_decoder().state_dict()
        self.decoder.load_state_dict(state)
        if self.config.decoder == "diffusion":
            self.decoder_schedule.fill_(DIFFUSION_SCHEDULES.index("cosine"))


__all__ = [
    "DIFFUSION_SCHEDULES",
    "GoRLConfig",
    "GoRLPolicy",
    "GoRLRecord",
    "encoder_config",
    "diffusion_alpha_bars",
    "gaussian_kl_to_prior",
]

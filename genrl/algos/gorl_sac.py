"""GoRL over SAC (``--algo sac --policy gorl``): latent-space SAC within a stage, decoder
refinement between stages (Zhang et al., arXiv 2512.02581; the paper's off-policy variant
GoRL(SAC+Diffusion), design notes algorithms.md 2.6: stages 2M / 1M / 1M, the ``gorl-sac`` preset).

Shapes: N envs, O obs dim, A action dim, Z = A latent dim.

**Within a stage** genrl's SAC (``genrl.algos.sac``, unchanged) trains the **encoder** of a
``policies.gorl.GoRLPolicy`` in the *latent MDP* (``LatentEnv``): its actions are latents eps in
the box [-L, L]^Z (L = ``policy_config.latent_bound``, 3 as ``genrl.sb3``'s ``GoRLLatentWrapper``),
and its step executes tanh(g(s, eps)), the frozen decoder's output squashed exactly as
``GoRLPolicy.act`` does, under ``no_grad`` (the decoder's parameters never require grad and are in
no optimiser; it is deterministic, all exploration is the encoder's). So

* SAC's actor is the encoder, a tanh-squashed state-dependent Gaussian over the latent
  (``policy_config.encoder_squash = "tanh"``, eps = L tanh(u), u ~ N(mu(s), sigma(s)^2); log-probs
  of tanh(u), target entropy -Z);
* the replay buffer stores (s, eps, r, s', terminated); the twin critics are Q(s, eps);
* before ``learning_starts`` the latents are uniform in the latent box (SAC's uniform actions; as
  SB3's SAC on the wrapper); the env action is still the decoder's.

At stage 0 the decoder is the all-zero (identity) one, so GoRL-SAC is SAC on tanh(eps).

**At each stage boundary** (the run's env steps split by ``gorl.stage_fractions``, counted in SAC
iterations, ``gorl.stage_boundaries``; the refinement runs after the stage's last iteration):

1. refinement data: ``gorl.refine_steps`` env steps of the **latest** encoder (stochastic) and the
   current decoder on a *separate* env instance (``gorl.collect_refinement_data``, GoRL-PPO's
   function; not counted in the run's steps; ``gorl/refinement_steps`` is cumulative);
2. the decoder is re-created and trained exactly as GoRL-PPO does (``gorl.fit_decoder``);
3. the agent is reset, as ``genrl.sb3.GoRLDecoderCallback`` resets an SB3 SAC:

   - the actor (encoder) back to its initial weights, its Adam state dropped, and the temperature
     log alpha back to its initial value with its Adam state dropped (``gorl.reset_encoder``,
     default True: the paper's encoder re-initialisation; the temperature belongs to the actor);
   - always: the twin critics **and** their targets back to their initial weights, the critic
     Adam state dropped, and the replay buffer emptied. Unlike GoRL-PPO's V(s) (kept by default:
     the refitted decoder reproduces the last stage's behaviour, so V(s) still holds), Q(s, eps) and
     the stored (s, eps) transitions describe the latent MDP of the *old* decoder: the same eps
     now executes a different action. ``gorl.reset_critic`` is PPO's switch; SAC ignores it;
   - ``learning_starts`` applies again: for ``algo_config.learning_starts`` env steps after the
     boundary the latents are uniform in the latent box and no gradient step runs (an empty
     buffer cannot feed SAC; SB3's callback instead resumes gradient steps at once). The gradient
     step count restarts at 0, so ``utd_ratio`` and the delayed actor run as in a fresh SAC. A
     stage no longer than ``learning_starts`` would never train its encoder: a ConfigError.

The decoder is deterministic (flow: Euler ODE; diffusion: DDIM eta = 0) as GoRL requires; its
observation is the one SAC sees (no running normalisation by default, ``SAC_DEFAULTS``).

Exact resume: ``state_dict`` is SAC's plus ``"gorl": {"stage", "refinement_steps"}``; the initial
actor, critic and temperature values are rebuilt from the seed, the gradient-step offset of the
current stage is derived from the stage; refinement randomness comes from seed + stage. A
checkpoint mid-stage or right after a boundary continues the run bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genrl.algos.gorl import _COLLECT_SEED, _DECODER_SEED, GoRLTrainConfig, StagedGoRL, collect_refinement_data, fit_decoder, stage_boundaries
from genrl.algos.sac import SAC, SACConfig
from genrl.errors import ConfigError
from genrl_envs.base import BatchedEnv, StepResult
from genrl_policies.gorl import GoRLPolicy


class LatentEnv:
    """The latent MDP over a batched env: actions are latents eps (N, Z) in [-L, L]^Z; ``step``
    executes ``policy.squash(policy.decode(s, eps))`` for the current observations s (no grad).
    Everything else (state, normaliser, close, ...) is the wrapped env's."""

    def __init__(self, env: BatchedEnv, policy: GoRLPolicy, device: torch.device) -> None:
        self.env, self.policy, self.device = env, policy, device
        z, bound = policy.latent_dim, float(policy.config.latent_bound)
        dtype = np.asarray(env.spec.action_low).dtype
        self.spec = dataclasses.replace(env.spec, action_dim=z, action_low=np.full(z, -bound, dtype), action_high=np.full(z, bound, dtype))
        self.obs: Tensor | None = None  # what the decoder is conditioned on at the next step

    def reset(self, seed: int | None = None) -> Tensor:
        obs = self.env.reset(seed=seed)
        self.obs = obs.to(self.device)
        return obs

    def decode(self, eps: Tensor) -> Tensor:
        """The env action tanh(g(s, eps)) (N, A) for the current observations."""
        if self.obs is None:
            raise RuntimeError("LatentEnv.step before reset()")
        with torch.no_grad():
            return self.policy.squash(self.policy.decode(self.obs, eps))

    def step(self, eps: Tensor) -> StepResult:
        out = self.env.step(self.decode(eps))
        self.obs = out.obs.to(self.device)
        return out

    def __getattr__(self, name: str) -> Any:  # state_dict, obs normaliser, restarted_obs, close, ...
        if name in ("env", "policy", "device", "spec", "obs"):
            raise AttributeError(name)
        return getattr(self.env, name)


class GoRLSAC(StagedGoRL):
    """GoRL over SAC: latent-space SAC within a stage, decoder refinement + agent reset between stages."""

    def __init__(
        self,
        policy: GoRLPolicy,
        env: BatchedEnv,
        sac_config: SACConfig,
        config: GoRLTrainConfig,
        *,
        total_steps: int,
        seed: int,
        device: str | torch.device = "cpu",
        env_factory: Callable[[], BatchedEnv] | None = None,
    ) -> None:
        if not isinstance(policy, GoRLPolicy):
            raise ConfigError(f"GoRL-SAC needs a GoRLPolicy (policy 'gorl'), got {type(policy).__name__}")
        pc = policy.config
        if (pc.encoder_squash, pc.state_dependent_std) != ("tanh", True):
            raise ConfigError("--algo sac --policy gorl needs policy_config.encoder_squash = 'tanh' with policy_config.state_dependent_std = true (or both left unset)")
        if pc.latent_reg != "none":
            raise ConfigError(f"--algo sac --policy gorl has no latent regulariser (SAC's entropy term replaces it): policy_config.latent_reg = 'none', not '{pc.latent_reg}'")
        self.cfg, self.seed, self.env_factory = config, int(seed), env_factory
        self.latent_env = LatentEnv(env, policy.to(device), torch.device(device))
        self.sac = self.inner = SAC(policy.encoder, self.latent_env, sac_config, total_steps=total_steps, seed=seed, device=str(device))
        self._policy = policy
        self.boundaries = stage_boundaries(config.stage_fractions, self.sac.n_iterations, "SAC iterations")
        edges = [0, *self.boundaries, self.sac.n_iterations]
        for k, (a, b) in enumerate(zip(edges, edges[1:])):
            if (b - a) * self.sac.steps_per_iter <= sac_config.learning_starts:
                raise ConfigError(
                    f"gorl.stage_fractions {[round(f, 6) for f in config.stage_fractions]} give stage {k} {(b - a) * self.sac.steps_per_iter} "
                    f"env steps, not more than algo_config.learning_starts = {sac_config.learning_starts} (re-applied at every stage start): "
                    "its encoder would never be trained; use more steps, fewer stages or a smaller learning_starts"
                )
        # the initial values a boundary restores (the encoder's are kept by GoRLPolicy.reset_encoder)
        self._critic_init = {k: v.detach().clone() for k, v in self.sac.critic.state_dict().items()}
        self._log_alpha_init = self.sac.log_alpha.detach().clone()
        self.stage = 0
        self.refinement_steps = 0

    # -- what the trainer reads -----------------------------------------------------------------
    @property
    def policy(self) -> GoRLPolicy:
        return self._policy

    @property
    def env(self) -> BatchedEnv:
        """The real env (its action box, state and normaliser); SAC steps ``latent_env``."""
        return self.latent_env.env

    def refine(self) -> dict[str, float]:
        """Collect data with the latest encoder, retrain the decoder, reset the agent, next stage."""
        stage = self.stage
        obs, pre, steps, stats = collect_refinement_data(
            self.policy, self.env, self.cfg.refine_steps, self.seed + _COLLECT_SEED * (stage + 1),
            device=self.device, env_factory=self.env_factory,
        )  # fmt: skip
        self.refinement_steps += steps
        stats.update(fit_decoder(self.policy, obs, pre, self.cfg, self.seed + _DECODER_SEED * (stage + 1)))
        self.stage = stage + 1
        self.reset_agent()
        return stats

    def reset_agent(self) -> None:
        """The module docstring's reset: actor + temperature (``reset_encoder``), critics, targets,
        their optimiser states, the buffer; ``learning_starts`` counts again from here."""
        sac = self.sac
        if self.cfg.reset_encoder:
            self.policy.reset_encoder()  # in place: the actor optimiser keeps the same parameters
            sac.actor_opt.state.clear()
            with torch.no_grad():
                sac.log_alpha.copy_(self._log_alpha_init)
            if sac.alpha_opt is not None:
                sac.alpha_opt.state.clear()
        sac.critic.load_state_dict(self._critic_init)
        sac.critic_target.load_state_dict(self._critic_init)
        sac.critic_opt.state.clear()
        sac.buffer.pos, sac.buffer.full = 0, False  # empty: unwritten rows are never read
        sac.learning_from, sac.n_updates = sac.global_step, 0  # learning_starts and the gradient-step count restart

    # -- exact resume ---------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        stage = self.stage
        self.sac.learning_from = self.boundaries[stage - 1] * self.sac.steps_per_iter if stage else 0  # n_updates is SAC's own
        self.latent_env.obs = self.sac.next_obs  # the decoder's condition at the next step

    def close(self) -> None:
        self.env.close()


def build(
    policy: GoRLPolicy, env: BatchedEnv, cfg: SACConfig, *, total_steps: int, seed: int, device: str = "cpu",
    gorl: GoRLTrainConfig | None = None, env_factory: Callable[[], BatchedEnv] | None = None,
) -> GoRLSAC:  # fmt: skip
    from genrl.distributed import check_supported, replica

    if replica().world_size > 1:
        check_supported("sac", "gorl")
    return GoRLSAC(policy, env, cfg, gorl or GoRLTrainConfig(), total_steps=total_steps, seed=seed, device=device, env_factory=env_factory)


__all__ = ["GoRLSAC", "LatentEnv", "build"]

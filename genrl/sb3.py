"""GoRL around any Stable-Baselines3 algorithm (PPO, SAC, ...): the latent MDP as a gymnasium wrapper.

GoRL (Zhang et al., arXiv 2512.02581) is "algorithm-agnostic": an RL algorithm optimises a latent
policy (the *encoder*) in an MDP whose action is the latent eps, with the frozen generative
*decoder* a = squash(g_phi(s, eps)) folded into the environment; between stages the decoder is
re-fitted (flow matching, fresh N(0, I) noise) to the (s, pre-squash action) pairs the agent
executed, and the encoder restarts from its initial weights. genrl's own implementation
(``genrl.algos.gorl``) drives genrl's PPO; this module gives the same two timescales to an SB3
algorithm, whose policy *is* the encoder:

* ``GoRLLatentWrapper(env, policy)`` -- the fast timescale. A ``gymnasium.Wrapper`` whose action
  space is the latent box ``[-L, L]^Z`` (Z = action dim, ``latent_bound`` L = 3 by default: SAC
  needs a bounded box, PPO clips to it too; 3 keeps 99.7 % of an N(0, 1) latent unclipped).
  ``step(eps)`` clips eps to the box, decodes ``pre = g(s, eps)`` with the decoder of a
  ``policies.gorl.GoRLPolicy`` under ``no_grad`` (deterministic Euler ODE, float32), executes
  ``action = squash(pre)`` (``GoRLConfig.squash``: tanh by default, computed by torch in float32;
  then clipped to the inner env's action box) and stores (s, pre) in a bounded FIFO
  ``RefinementBuffer`` (``buffer_size`` newest pairs). ``info["gorl_pre_action"]`` and
  ``info["gorl_action"]`` report both. The decoder sees the **raw** observation (no
  normalisation, so nothing to freeze; an SB3 ``VecNormalize`` outside the wrapper only changes
  what the encoder sees). The GoRLPolicy's own encoder is not used: SB3's policy replaces it.
* ``GoRLDecoderCallback(policy, config)`` -- the slow timescale, an SB3 ``BaseCallback``.
  Stage boundaries are env steps ``round(cumsum(stage_fractions)[:-1] * total_timesteps)``
  (``total_timesteps`` of ``learn``). At the first **rollout start** at or after a boundary (at
  most one refinement per rollout: PPO refines between an update and the next collection, so no
  rollout mixes two decoders; SAC's default ``train_freq=1`` hits the boundary exactly) it

  1. re-creates the decoder from scratch (``GoRLPolicy.reset_decoder``) and trains it by flow
     matching (``GoRLPolicy.decoder_loss``: fresh eps ~ N(0, I), never the agent's latents) on
     the wrappers' refinement buffers: ``decoder_epochs`` Adam epochs, ``val_fraction`` held out,
     early stop after ``patience`` epochs without a better validation loss, best weights kept
     (the recipe of ``genrl.algos.gorl``);
  2. resets the SB3 agent (the paper's encoder re-initialisation), exactly:

     - ``reset_policy`` (default True): every parameter and buffer of ``model.policy`` that is not
       a critic's is loaded back from the state dict the policy had when ``learn`` started
       (PPO/A2C: ``mlp_extractor.policy_net``, ``action_net``, ``log_std``, shared feature
       extractor; SAC/TD3: ``actor.*``), and their entries in every optimiser of the policy
       (``policy.optimizer``, ``actor.optimizer``) are dropped, so Adam restarts from zero
       moments. SAC's automatic entropy coefficient (``log_ent_coef``) goes back to its initial
       value and ``ent_coef_optimizer``'s state is cleared too;
     - ``reset_critic`` (None = automatic: False for on-policy algorithms, whose V(s) does not
       depend on how latents map to actions -- the decoder is refitted to reproduce the last
       stage's behaviour -- and True for off-policy ones, whose Q(s, eps) does): the critic keys
       (``mlp_extractor.value_net``, ``value_net``, ``vf_features_extractor``; ``critic.*``,
       ``critic_target.*``) and their optimiser state likewise;
     - ``reset_replay_buffer`` (default True, off-policy only): ``model.replay_buffer.reset()``:
       its (s, eps, r, s') transitions describe the latent MDP of the old decoder. Gradient steps
       resume at once on the new stage's data (``learning_starts`` is not re-applied);
     - the refinement buffers are emptied, so each refinement fits the stage that just ended.

  SB3's step counter, learning-rate schedule and logger are untouched. ``history`` lists one dict
  per refinement (``num_timesteps``, ``stage``, decoder losses, ``n_pairs``).

Limits: the callback finds the wrappers inside a ``DummyVecEnv`` (through ``VecEnvWrapper``s);
with a ``SubprocVecEnv`` the buffers and decoders would live in other processes (unsupported).
All wrappers must share the callback's ``GoRLPolicy`` object. The decoder runs on the policy's
device, one observation per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from genrl.algos.gorl import RefinementSchedule, stage_boundaries, train_decoder
from genrl_policies.gorl import GoRLPolicy

#: seed offset per stage for the decoder's re-creation and training noise
_DECODER_SEED = 2_000_029
#: state-dict key prefixes of SB3 critics (ActorCriticPolicy; SAC/TD3 policies)
CRITIC_PREFIXES = ("mlp_extractor.value_net.", "value_net.", "vf_features_extractor.", "critic.", "critic_target.")


# -- the fast timescale: the latent MDP ------------------------------------------------------------
class RefinementBuffer:
    """A FIFO of the newest ``capacity`` (observation, pre-squash action) pairs, float32."""

    def __init__(self, capacity: int, obs_dim: int, action_dim: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.pre = np.zeros((capacity, action_dim), np.float32)
        self.pos = 0  # next slot
        self.size = 0
        self.total_added = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, pre: np.ndarray) -> None:
        self.obs[self.pos] = obs
        self.pre[self.pos] = pre
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.total_added += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(obs (M, O), pre (M, A)) oldest first (copies)."""
        if self.size < self.capacity:
            return self.obs[: self.size].copy(), self.pre[: self.size].copy()
        order = np.r_[self.pos : self.capacity, 0 : self.pos]
        return self.obs[order], self.pre[order]

    def clear(self) -> None:
        self.pos = self.size = 0


class GoRLLatentWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """The latent MDP of GoRL: actions are latents eps in ``[-latent_bound, latent_bound]^Z``.

    Args:
        env: a gymnasium env with a flat Box observation and a Box action of ``policy.action_dim``.
        policy: the ``GoRLPolicy`` whose decoder (and ``squash``) turns latents into actions; its
            encoder is unused. Shared with ``GoRLDecoderCallback``, which retrains the decoder.
        latent_bound: L of the latent box (default 3).
        buffer_size: capacity of the refinement buffer (newest pairs kept).
        record: store (s, pre) pairs (False for evaluation envs).
    """

    def __init__(
        self,
        env: gym.Env,
        policy: GoRLPolicy,
        *,
        latent_bound: float = 3.0,
        buffer_size: int = 50_000,
        record: bool = True,
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(
            self, policy=policy, latent_bound=latent_bound, buffer_size=buffer_size, record=record
        )  # env.spec can re-create the wrapper (same policy object, a fresh buffer)
        gym.Wrapper.__init__(self, env)
        if not isinstance(policy, GoRLPolicy):
            raise TypeError(f"policy must be a GoRLPolicy, got {type(policy).__name__}")
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"GoRLLatentWrapper needs a flat Box observation space, got {obs_space}")
        if not isinstance(act_space, gym.spaces.Box) or act_space.shape != (policy.action_dim,):
            raise ValueError(f"env action space {act_space} does not match the policy's action_dim {policy.action_dim}")
        if obs_space.shape[0] != policy.obs_dim:
            raise ValueError(f"env observation dim {obs_space.shape[0]} != policy obs_dim {policy.obs_dim}")
        if not (isinstance(latent_bound, (int, float)) and math.isfinite(latent_bound) and latent_bound > 0):
            raise ValueError(f"latent_bound must be a finite number > 0, got {latent_bound!r}")
        self.policy = policy
        self.latent_bound = float(latent_bound)
        self.latent_dim = policy.latent_dim
        self.action_space = gym.spaces.Box(-self.latent_bound, self.latent_bound, (self.latent_dim,), np.float32)
        self.record = record
        self.buffer = RefinementBuffer(buffer_size, policy.obs_dim, policy.action_dim)
        self._low = np.asarray(act_space.low, np.float32)
        self._high = np.asarray(act_space.high, np.float32)
        self._obs: np.ndarray | None = None

    def decode(self, obs: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pre = g(s, eps), squash(pre)) for one observation, as float32 arrays of shape (A,)."""
        param = next(self.policy.decoder.parameters())
        o = torch.as_tensor(np.asarray(obs, np.float32).reshape(1, -1), device=param.device)
        e = torch.as_tensor(np.asarray(eps, np.float32).reshape(1, -1), device=param.device)
        with torch.no_grad():
            pre = self.policy.decode(o, e)
            action = self.policy.squash(pre)
        return pre[0].cpu().numpy(), action[0].cpu().numpy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        if self._obs is None:
            raise gym.error.ResetNeeded("GoRLLatentWrapper.step called before reset()")
        eps = np.clip(np.asarray(action, np.float32).reshape(self.latent_dim), -self.latent_bound, self.latent_bound)
        pre, squashed = self.decode(self._obs, eps)
        executed = np.clip(squashed, self._low, self._high)
        if self.record:
            self.buffer.add(np.asarray(self._obs, np.float32), pre)
        obs, reward, terminated, truncated, info = self.env.step(executed)
        self._obs = obs
        info = dict(info)
        info["gorl_pre_action"] = pre
        info["gorl_action"] = executed
        return obs, reward, terminated, truncated, info


# -- the slow timescale: decoder refinement + agent reset ------------------------------------------
@dataclass(frozen=True)
class GoRLSB3Config(RefinementSchedule):
    """Schedule and refinement settings of ``GoRLDecoderCallback`` (see the module docstring); the
    stages and the decoder recipe are genrl GoRL's (``RefinementSchedule``)."""

    reset_policy: bool = True
    """Reload the SB3 policy's non-critic weights from their values at ``learn`` start, clear their Adam state."""
    reset_critic: bool | None = None
    """Also the critic's; None: True for off-policy algorithms (Q(s, eps)), False for on-policy (V(s))."""
    reset_replay_buffer: bool = True
    """Off-policy only: empty the replay buffer (its latents belong to the old decoder)."""
    seed: int = 0
    """Base seed of the decoder's re-creation and training noise (stage k uses seed + 2000029 (k + 1))."""

    def boundaries(self, total_timesteps: int) -> list[int]:
        """Env-step counts at which stages 1, 2, ... start: round(cumsum(fractions)[:-1] * total)."""
        return stage_boundaries(self.stage_fractions, total_timesteps)


def find_latent_wrappers(venv: Any) -> list[GoRLLatentWrapper]:
    """The ``GoRLLatentWrapper`` of every sub-env of an SB3 ``DummyVecEnv`` (through VecEnvWrappers)."""
    while hasattr(venv, "venv"):
        venv = venv.venv
    sub_envs = getattr(venv, "envs", None)
    if sub_envs is None:
        raise TypeError(
            f"GoRLDecoderCallback needs a DummyVecEnv (got {type(venv).__name__}): the refinement buffers and "
            "the decoder must live in this process; or pass the wrappers explicitly"
        )
    found = []
    for env in sub_envs:
        while not isinstance(env, GoRLLatentWrapper) and hasattr(env, "env"):
            env = env.env
        if not isinstance(env, GoRLLatentWrapper):
            raise TypeError("a training sub-env is not wrapped in GoRLLatentWrapper")
        found.append(env)
    return found


def _optimizers(model: Any) -> list[torch.optim.Optimizer]:
    """Every optimiser attached to ``model.policy`` or one of its sub-modules (PPO: one; SAC: actor, critic)."""
    out: list[torch.optim.Optimizer] = []
    for module in model.policy.modules():
        opt = getattr(module, "optimizer", None)
        if isinstance(opt, torch.optim.Optimizer) and all(opt is not o for o in out):
            out.append(opt)
    return out


class GoRLDecoderCallback(BaseCallback):
    """GoRL's slow timescale for an SB3 algorithm: decoder refinement + agent reset at stage boundaries.

    Args:
        policy: the ``GoRLPolicy`` shared with the ``GoRLLatentWrapper``s.
        config: the schedule and refinement settings (``GoRLSB3Config``).
        wrappers: the wrappers whose buffers feed the refinement (default: found in the training env).
        total_timesteps: override of the run length the stage fractions apply to (default: ``learn``'s).
    """

    def __init__(
        self,
        policy: GoRLPolicy,
        config: GoRLSB3Config | None = None,
        *,
        wrappers: Iterable[GoRLLatentWrapper] | None = None,
        total_timesteps: int | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.gorl_policy = policy
        self.config = config or GoRLSB3Config()
        self._given_wrappers = list(wrappers) if wrappers is not None else None
        self._total = total_timesteps
        self.wrappers: list[GoRLLatentWrapper] = []
        self.boundaries: list[int] = []
        self.stage = 0
        self.history: list[dict[str, float]] = []
        self._init_state: dict[str, torch.Tensor] = {}
        self._init_log_ent_coef: torch.Tensor | None = None

    # -- SB3 hooks ------------------------------------------------------------------------------
    def _on_training_start(self) -> None:
        total = int(self._total if self._total is not None else self.model._total_timesteps)
        self.boundaries = self.config.boundaries(total)
        self.stage = sum(1 for b in self.boundaries if self.num_timesteps > b)
        self.wrappers = self._given_wrappers if self._given_wrappers is not None else find_latent_wrappers(self.training_env)
        for w in self.wrappers:
            if w.policy is not self.gorl_policy:
                raise ValueError("every GoRLLatentWrapper must hold the callback's GoRLPolicy")
        self._init_state = {k: v.detach().clone() for k, v in self.model.policy.state_dict().items()}
        log_ent = getattr(self.model, "log_ent_coef", None)
        self._init_log_ent_coef = log_ent.detach().clone() if isinstance(log_ent, torch.Tensor) else None

    def _on_rollout_start(self) -> None:
        if self.stage < len(self.boundaries) and self.num_timesteps >= self.boundaries[self.stage]:
            self.refine()

    def _on_step(self) -> bool:
        return True

    # -- the refinement -------------------------------------------------------------------------
    @property
    def off_policy(self) -> bool:
        return hasattr(self.model, "replay_buffer")

    def refine(self) -> dict[str, float]:
        """Retrain the decoder on the buffers, reset the agent, start the next stage."""
        c, stage = self.config, self.stage
        pairs = [w.buffer.arrays() for w in self.wrappers if len(w.buffer)]
        if not pairs:
            raise RuntimeError("GoRL refinement with empty refinement buffers (record=False on every training env?)")
        obs = torch.from_numpy(np.concatenate([p[0] for p in pairs]))
        pre = torch.from_numpy(np.concatenate([p[1] for p in pairs]))
        stats = train_decoder(
            self.gorl_policy, obs, pre,
            epochs=c.decoder_epochs, batch_size=c.decoder_batch_size, lr=c.decoder_lr,
            val_fraction=c.val_fraction, patience=c.patience, seed=c.seed + _DECODER_SEED * (stage + 1),
        )  # fmt: skip
        self.reset_agent()
        for w in self.wrappers:
            w.buffer.clear()
        self.stage = stage + 1
        record = {"num_timesteps": float(self.num_timesteps), "stage": float(self.stage), **stats}
        self.history.append(record)
        for key, value in record.items():
            self.logger.record(f"gorl/{key}", value)
        if self.verbose:
            print(f"GoRL refinement at {self.num_timesteps} steps -> stage {self.stage}: {stats}")
        return record

    def reset_keys(self) -> list[str]:
        """The state-dict keys of ``model.policy`` that a refinement reloads from the initial weights."""
        c = self.config
        reset_critic = self.off_policy if c.reset_critic is None else c.reset_critic
        keys = []
        for key in self._init_state:
            is_critic = key.startswith(CRITIC_PREFIXES)
            if (is_critic and reset_critic) or (not is_critic and c.reset_policy):
                keys.append(key)
        return keys

    def reset_agent(self) -> None:
        """Reload the reset keys, drop their optimiser state, entropy coefficient, replay buffer."""
        model, c = self.model, self.config
        keys = set(self.reset_keys())
        if keys:
            state = model.policy.state_dict()
            for key in keys:
                state[key] = self._init_state[key].clone()
            model.policy.load_state_dict(state)  # in place: the optimisers keep the same Parameter objects
            params = [p for name, p in model.policy.named_parameters() if name in keys]
            for opt in _optimizers(model):
                for p in params:
                    opt.state.pop(p, None)
        if c.reset_policy and self._init_log_ent_coef is not None:
            with torch.no_grad():
                model.log_ent_coef.copy_(self._init_log_ent_coef)
            ent_opt = getattr(model, "ent_coef_optimizer", None)
            if ent_opt is not None:
                ent_opt.state.pop(model.log_ent_coef, None)
        if self.off_policy and c.reset_replay_buffer and model.replay_buffer is not None:
            model.replay_buffer.reset()


__all__ = [
    "CRITIC_PREFIXES",
    "GoRLDecoderCallback",
    "GoRLLatentWrapper",
    "GoRLSB3Config",
    "RefinementBuffer",
    "find_latent_wrappers",
    "train_decoder",
]

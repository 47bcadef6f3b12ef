"""GoRL's two-timescale schedule around PPO (Zhang et al., arXiv 2512.02581, Algorithm 1).

The run's env steps are split into stages (paper: 60M / 60M / 30M / 30M of 180M, i.e. fractions
(1/3, 1/3, 1/6, 1/6)). Within a stage, PPO (``genrl.algos.ppo``) trains the **encoder** of a
``policies.gorl.GoRLPolicy`` in latent space with the decoder frozen (the decoder is part of the
environment: its parameters never require grad, the ratio is on the latent only). At each stage
boundary a **refinement** phase runs:

1. collect ``refine_steps`` env steps with the frozen latest encoder and the current decoder, on a
   *separate* env instance (same env config, observation normaliser copied frozen from the
   training env, seed derived from run seed + stage), storing (s, pre-tanh action). These steps are
   not counted in the run's env steps; they are reported as ``gorl/refinement_steps`` (cumulative);
2. re-create the decoder from scratch and train it by its generative loss (flow matching, or DDPM noise prediction for GoRL-Diff) with fresh noise
   (``policy.decoder_loss``): ``decoder_epochs`` epochs of Adam (``decoder_lr``) on minibatches of
   ``decoder_batch_size`` samples, ``val_fraction`` held out, early stopping after ``patience``
   epochs without a better validation loss, best-validation weights kept (the code's recipe);
3. re-initialise the encoder to its initial weights and drop its Adam state (optionally the
   critic too: ``reset_critic``, which the code's per-stage fresh PPO runs effectively do).

Per-stage PPO settings are PPO's schedule (``genrl.algos.ppo``): ``ppo.stage_clip_coefs`` (code:
0.15 in stage 0, 0.3 later; default: the paper's ``ppo.clip_coef`` = 0.2 throughout) and
``ppo.stage_max_grad_norms`` (code: 0.5, then 1.0), one value per stage; GoRL sets ``ppo.stage``.

Differences from the official pipeline, by design here: one PPO object spans the whole run, so
``ppo.anneal_lr`` anneals over the run, not per stage; the critic is kept across stages by default;
encoder and decoder share the env's running observation normaliser (the code keeps a separate,
frozen normaliser for the decoder; the env statistics keep moving slowly after a refinement); the
refinement data come from the latest (not the best-evaluated) encoder, as the paper says.

The refinement steps are module functions (``collect_refinement_data``, ``fit_decoder``,
``train_decoder``), shared with GoRL over SAC (``genrl.algos.gorl_sac``) and the SB3 callback.

``GoRL`` exposes what the trainer drives (``iterate``, ``global_step``, ``iteration``,
``n_iterations``, ``steps_per_iter``, ``env``, ``policy``, ``state_dict`` / ``load_state_dict``);
its own resume state is the stage counter and the refinement-step count (everything else is in
the policy's weights and PPO's state; refinement randomness is derived from seed + stage).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from genrl.algos.ppo import PPO, Critic, PPOConfig
from genrl.errors import ConfigError
from genrl_envs.base import BatchedEnv
from genrl_policies.gorl import GoRLPolicy

#: offsets that derive each refinement's seeds from the run seed and the stage
_COLLECT_SEED, _DECODER_SEED, _CRITIC_SEED = 1_000_003, 2_000_029, 3_000_017


@dataclass(frozen=True)
class RefinementSchedule:
    """GoRL's stages and decoder-refinement recipe, shared by genrl's GoRL (``GoRLTrainConfig``)
    and the Stable-Baselines3 callback (``genrl.sb3.GoRLSB3Config``)."""

    stage_fractions: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 6, 1 / 6)
    """Share of the run's env steps per stage; sums to 1 (paper: 60M/60M/30M/30M of 180M)."""
    decoder_epochs: int = 50
    decoder_batch_size: int = 1024
    """(s, a) samples per decoder minibatch, each expanded to ``decoder_pairs`` noise pairs
    (paper: 8192 on 512k samples; 1024 keeps ~50 steps per epoch on the smaller default dataset)."""
    decoder_lr: float = 3e-4
    val_fraction: float = 0.1
    """Held-out share of the refinement data (0: no validation, the last epoch's weights are kept)."""
    patience: int = 20
    """Stop after this many epochs without a better validation loss (0: never stop early)."""

    def __post_init__(self) -> None:
        fr = self.stage_fractions
        if not fr or any(not _is_number(f) or not f > 0 for f in fr):
            raise ConfigError(f"invalid gorl.stage_fractions = {list(fr)!r} (positive numbers)")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"gorl.stage_fractions = {list(fr)!r} must sum to 1 (they sum to {sum(fr):.6g})")
        ints = {"refine_steps": 1, "decoder_epochs": 1, "decoder_batch_size": 1, "patience": 0}
        for name, low in ints.items():
            value = getattr(self, name, low)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"invalid gorl.{name} = {value!r} (an integer >= {low})")
        if not (_is_number(self.decoder_lr) and self.decoder_lr > 0):
            raise ConfigError(f"invalid gorl.decoder_lr = {self.decoder_lr!r} (a number > 0)")
        if not (_is_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f"invalid gorl.val_fraction = {self.val_fraction!r} (in [0, 1))")

    @property
    def n_stages(self) -> int:
        return len(self.stage_fractions)


@dataclass(frozen=True)
class GoRLTrainConfig(RefinementSchedule):
    """The ``[gorl]`` section: GoRL's schedule and decoder refinement (only for ``policy = "gorl"``)."""

    refine_steps: int = 50_000
    """Env steps collected for each decoder refinement (paper: 512k of 180M; not counted in the run)."""
    reset_encoder: bool = True
    """Re-initialise the encoder (and its Adam state) at each stage start (paper Alg. 1, line 5)."""
    reset_critic: bool = False
    """Also re-initialise the critic (and its Adam state) at each stage start."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def stage_boundaries(fractions: tuple[float, ...], n_iterations: int, what: str = "PPO iterations") -> list[int]:
    """Iteration counts (PPO's; SAC's for ``genrl.algos.gorl_sac``) after which each stage ends (all
    but the last stage): the cumulative fractions times ``n_iterations``, rounded half up.
    ConfigError if a stage gets no iteration (``what`` names them in the message)."""
    bounds, acc = [], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(int(math.floor(acc * n_iterations + 0.5)))
    edges = [0, *bounds, n_iterations]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"gorl.stage_fractions {[round(f, 6) for f in fractions]} leave a stage without {what} "
            f"in a run of {n_iterations} iteration(s) (stage ends at {bounds}); use more steps or fewer stages"
        )
    return bounds


def train_decoder(
    policy: GoRLPolicy,
    obs: torch.Tensor,
    pre: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    patience: int,
    seed: int,
) -> dict[str, float]:
    """Re-create ``policy``'s decoder (``reset_decoder(seed)``) and fit it to (obs, pre-tanh
    actions) by the decoder's generative loss with fresh noise, keeping the best-validation weights.

    The refinement recipe shared by genrl's GoRL and the SB3 callback (``genrl.sb3``).
    Returns {"decoder_loss", "decoder_epochs", "n_pairs"[, "decoder_val_loss"]}."""
    device = next(policy.decoder.parameters()).device
    obs, pre = obs.to(device), pre.to(device)
    policy.reset_decoder(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = obs.shape[0]
    perm = torch.randperm(n, generator=gen, device=device)
    n_val = min(n - 1, max(1, round(val_fraction * n))) if val_fraction > 0 and n > 1 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    n_train = train_idx.numel()
    bs = min(batch_size, n_train)
    best, best_state, bad, n_epochs, train_loss = math.inf, None, 0, 0, math.nan

    def val_loss() -> float:
        g = torch.Generator(device=device).manual_seed(seed + 1)  # the same noise at every epoch
        total = 0.0
        with torch.no_grad():
            for start in range(0, n_val, bs):
                idx = val_idx[start : start + bs]
                total += float(policy.decoder_loss(obs[idx], pre[idx], g)) * idx.numel()
        return total / n_val

    with policy.decoder_training() as params:
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(epochs):
            order = train_idx[torch.randperm(n_train, generator=gen, device=device)]
            total, count = 0.0, 0
            for start in range(0, n_train, bs):
                idx = order[start : start + bs]
                loss = policy.decoder_loss(obs[idx], pre[idx], gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
            train_loss = total / count
            n_epochs += 1
            if n_val:
                val = val_loss()
                if val < best:
                    best, bad = val, 0
                    best_state = copy.deepcopy(policy.decoder.state_dict())
                else:
                    bad += 1
                    if patience and bad >= patience:
                        break
    if best_state is not None:
        policy.decoder.load_state_dict(best_state)
    stats = {"decoder_loss": train_loss, "decoder_epochs": float(n_epochs), "n_pairs": float(n)}
    if n_val:
        stats["decoder_val_loss"] = best
    return stats


def make_refinement_env(env: BatchedEnv, env_factory: Callable[[], BatchedEnv] | None = None) -> BatchedEnv:
    """A fresh instance of the training env for refinement data: ``env_factory()``, or one made from
    ``env``'s spec (same id, env count and back end; running observation normalisation if ``env``
    has it, its statistics copied in frozen by ``collect_refinement_data``)."""
    if env_factory is not None:
        return env_factory()
    from genrl_envs import make_env

    spec = env.spec
    norm = env.obs_normalizer_state() if hasattr(env, "obs_normalizer_state") else None
    device = getattr(env, "device", "cpu")
    return make_env(spec.env_id, spec.n_envs, backend=spec.backend, device=str(device), normalize_obs=norm is not None, normalize_reward=False)


def collect_refinement_data(
    policy: GoRLPolicy, env: BatchedEnv, refine_steps: int, seed: int, *, device: torch.device,
    env_factory: Callable[[], BatchedEnv] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, float]]:  # fmt: skip
    """(obs (M, O), pre-tanh actions (M, A), env steps taken, stats) from >= ``refine_steps`` env
    steps of ``policy`` as it is (its current encoder, stochastic; deterministic decoder) on a fresh
    instance of ``env`` (``make_refinement_env``) with ``env``'s observation statistics, frozen."""
    ref_env = make_refinement_env(env, env_factory)
    try:
        if hasattr(ref_env, "set_obs_normalizer"):
            ref_env.set_obs_normalizer(env.obs_normalizer_state(), frozen=True)
        gen = torch.Generator(device=device).manual_seed(seed)
        n_envs = ref_env.spec.n_envs
        n_iter = math.ceil(refine_steps / n_envs)
        obs_list, pre_list, returns = [], [], []
        with torch.inference_mode():
            obs = ref_env.reset(seed=seed).to(device)
            for _ in range(n_iter):
                action, record = policy.act(obs, generator=gen)
                obs_list.append(obs)
                pre_list.append(record.pre_action)
                out = ref_env.step(action)
                returns += out.episode_returns
                obs = out.obs.to(device)
    finally:
        ref_env.close()
    steps = n_iter * n_envs
    stats = {"gorl/refinement_collected": float(steps)}
    if returns:
        stats["gorl/refinement_ep_return"] = sum(returns) / len(returns)
    # leave inference mode: plain tensors for the decoder's autograd
    return torch.cat(obs_list).clone(), torch.cat(pre_list).clone(), steps, stats


def fit_decoder(policy: GoRLPolicy, obs: torch.Tensor, pre: torch.Tensor, schedule: RefinementSchedule, seed: int) -> dict[str, float]:
    """``train_decoder`` with ``schedule``'s recipe; its losses as ``gorl/decoder_*`` metrics."""
    c = schedule
    stats = train_decoder(
        policy, obs, pre, epochs=c.decoder_epochs, batch_size=c.decoder_batch_size,
        lr=c.decoder_lr, val_fraction=c.val_fraction, patience=c.patience, seed=seed,
    )  # fmt: skip
    stats.pop("n_pairs")
    return {f"gorl/{k}": v for k, v in stats.items()}


class StagedGoRL:
    """What GoRL over PPO (``GoRL``) and over SAC (``genrl.algos.gorl_sac.GoRLSAC``) share: the
    trainer's view of the inner algorithm (``self.inner``), the stage schedule (the refinement
    runs after a stage's last iteration, ``self.refine()``) and the stage in the resume state."""

    inner: Any
    boundaries: list[int]
    stage: int
    refinement_steps: int

    @property
    def global_step(self) -> int:
        return self.inner.global_step

    @property
    def iteration(self) -> int:
        return self.inner.iteration

    @property
    def n_iterations(self) -> int:
        return self.inner.n_iterations

    @property
    def steps_per_iter(self) -> int:
        return self.inner.steps_per_iter

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def refine(self) -> dict[str, float]:
        raise NotImplementedError

    # -- schedule -------------------------------------------------------------------------------
    def iterate(self) -> dict[str, float]:
        """One iteration of the inner algorithm on the encoder; after a stage's last, the refinement phase."""
        stage = self.stage
        metrics = self.inner.iterate()
        metrics["gorl/stage"] = float(stage)
        if stage < len(self.boundaries) and self.inner.iteration == self.boundaries[stage]:
            t0 = time.perf_counter()
            metrics.update(self.refine())
            metrics["time/refine_s"] = time.perf_counter() - t0
        metrics["gorl/refinement_steps"] = float(self.refinement_steps)
        return metrics

    # -- exact resume ---------------------------------------------------------------------------
    def gorl_state(self) -> dict[str, int]:
        return {"stage": self.stage, "refinement_steps": self.refinement_steps}

    def state_dict(self) -> dict[str, Any]:
        """The inner algorithm's state plus ``"gorl"``: {"stage", "refinement_steps"} (plain ints, JSON-able)."""
        return {**self.inner.state_dict(), "gorl": self.gorl_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
        g = state["gorl"]
        stage, refined = int(g["stage"]), int(g["refinement_steps"])
        expected = sum(1 for b in self.boundaries if self.inner.iteration >= b)
        if stage != expected:
            raise ValueError(f"GoRL stage {stage} does not match iteration {self.inner.iteration} (expected stage {expected})")
        self.stage, self.refinement_steps = stage, refined


class GoRL(StagedGoRL):
    """GoRL over PPO: latent-space PPO within a stage, decoder refinement between stages."""

    def __init__(
        self,
        policy: GoRLPolicy,
        env: BatchedEnv,
        ppo_config: PPOConfig,
        config: GoRLTrainConfig,
        *,
        total_steps: int,
        seed: int,
        device: str | torch.device = "cpu",
        env_factory: Callable[[], BatchedEnv] | None = None,
    ) -> None:
        if not isinstance(policy, GoRLPolicy):
            raise ConfigError(f"GoRL needs a GoRLPolicy (policy 'gorl'), got {type(policy).__name__}")
        for name in ("stage_clip_coefs", "stage_max_grad_norms"):
            values = getattr(ppo_config, name)
            if values and len(values) != config.n_stages:
                raise ConfigError(f"ppo.{name} has {len(values)} values for {config.n_stages} GoRL stages (one per stage, or empty)")
        self.cfg = config
        self.ppo = self.inner = PPO(policy, env, ppo_config, total_steps=total_steps, seed=seed, device=device)
        self.boundaries = stage_boundaries(config.stage_fractions, self.ppo.n_iterations)
        self.seed = int(seed)
        self.env_factory = env_factory
        self.stage = 0
        self.refinement_steps = 0

    # -- what the trainer reads -----------------------------------------------------------------
    @property
    def policy(self) -> GoRLPolicy:
        return self.ppo.policy  # type: ignore[return-value]

    @property
    def env(self) -> BatchedEnv:
        return self.ppo.env

    @property
    def critic(self) -> Critic:
        return self.ppo.critic

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.ppo.optimizer

    @property
    def stage(self) -> int:
        """The current stage; PPO's per-stage settings follow it."""
        return self.ppo.stage

    @stage.setter
    def stage(self, value: int) -> None:
        self.ppo.stage = int(value)

    def refine(self) -> dict[str, float]:
        """Collect data with the frozen encoder, retrain the decoder, start the next stage."""
        stage = self.stage
        obs, pre, stats = self.collect_refinement_data(self.seed + _COLLECT_SEED * (stage + 1))
        stats.update(self.train_decoder(obs, pre, self.seed + _DECODER_SEED * (stage + 1)))
        self.stage = stage + 1
        opt_state = self.ppo.optimizer.state
        if self.cfg.reset_encoder:
            self.policy.reset_encoder()
            for p in self.policy.encoder_parameters():
                opt_state.pop(p, None)
        if self.cfg.reset_critic:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + _CRITIC_SEED * (stage + 1))
                spec, pc = self.env.spec, self.ppo.cfg
                fresh = Critic(spec.obs_dim, tuple(pc.critic_hidden), pc.critic_activation).state_dict()
            self.critic.load_state_dict(fresh)
            for p in self.critic.parameters():
                opt_state.pop(p, None)
        return stats

    # -- refinement (the module functions, shared with genrl.algos.gorl_sac) -------------------
    def collect_refinement_data(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(obs (M, O), pre-tanh actions (M, A), stats) from >= ``refine_steps`` env steps of the
        current policy (stochastic encoder, deterministic decoder) on a fresh env instance."""
        obs, pre, steps, stats = collect_refinement_data(self.policy, self.env, self.cfg.refine_steps, seed, device=self.device, env_factory=self.env_factory)
        self.refinement_steps += steps
        return obs, pre, stats

    def train_decoder(self, obs: torch.Tensor, pre: torch.Tensor, seed: int) -> dict[str, float]:
        """Re-create the decoder and fit it to (obs, pre) by its generative loss with fresh noise."""
        return fit_decoder(self.policy, obs, pre, self.cfg, seed)


__all__ = [
    "GoRL",
    "StagedGoRL",
    "GoRLTrainConfig",
    "RefinementSchedule",
    "collect_refinement_data",
    "fit_decoder",
    "make_refinement_env",
    "stage_boundaries",
    "train_decoder",
]

"""SAC: Soft Actor-Critic (Haarnoja et al., 2018, arXiv:1801.01290, 1812.05905) with the
tanh-squashed Gaussian actor, through genrl's run loop (``--algo sac``).

Shape legend: N envs, O obs dim, A action dim, B batch, R buffer rows (one per env step, N
transitions each), n the return horizon (``n_step``).

Each env step stores N transitions (obs, action, reward, next obs, terminated) in a replay buffer
preallocated on the device (``genrl.replay``); the next obs is the true last observation where an
episode ended (``final_obs``), so a time limit bootstraps and a termination does not. Actions are
uniform in the action box before ``learning_starts``, the policy's samples after; from then on
``utd_ratio`` gradient steps run per transition, each on a batch drawn uniformly (with
replacement, by index, with the algorithm's generator):

    critic       y = R_n + gamma^n (1 - terminated) (min_j Qbar_j(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s')
                 L_Q = sum_j mean (Q_j(s, a) - y)^2
    actor        every ``policy_frequency``-th step, that many times (CleanRL's delayed update):
                 L_pi = mean(alpha log pi(a~|s) - min_j Q_j(s, a~)),  a~ = policy.rsample(s)
    temperature  after each actor step ("auto"): L_alpha = -mean(log alpha (log pi(a~|s) + H_target))
    targets      every ``target_network_frequency``-th step: Qbar <- Qbar + tau (Q - Qbar)

One iteration is ``steps_per_iter`` env steps, so the run loop logs, evaluates and checkpoints
between iterations; a checkpoint holds the buffer, and resuming any checkpoint reproduces the
uninterrupted run bit for bit on CPU.

The actor is the gaussian family with ``squash = "tanh"`` and ``state_dependent_std = true``,
[256, 256] ReLU as the references, and the env without running normalisation: ``SAC_DEFAULTS``,
laid under the run's config when it is parsed (so ``config.json`` shows them; the user's own
values win). SAC stores the env's action box in the policy, so an exported agent acts in the box
on its own. Log-probs are those of the squashed action in [-1, 1]^A (SB3's convention: the
target entropy -A does not depend on the box's units). ``--policy pmoe`` is PMOE-SAC
(``genrl.algos.pmoe_sac``: a mixture of K squashed experts, its own actor loss, an expert sampled
from the mixture in the critic target). ``--policy gorl`` is GoRL over SAC (``genrl.algos.gorl_sac``:
SAC on the encoder's latent, the frozen decoder inside the env step, refinement between stages).

Where CleanRL and SB3 differ, genrl takes: CleanRL's learning rates, learning start and delayed
actor (``SACConfig``), its critic loss (SB3 halves it); SB3's log sigma clamp [-20, 2] (CleanRL
rescales a tanh to [-5, 2]) and its temperature loss in log alpha with the actor step's own
log-prob (CleanRL: alpha times a fresh sample's).

SAC stores what the env gives; with running normalisation switched back on
(``--set env.normalize_obs=true``) stored transitions would carry the statistics of their time.

Data-parallel (``torchrun``, ``genrl.distributed``): each rank steps its own envs (seeds offset
by rank) into its own buffer; ``algo_config.batch_size`` is the global batch, each rank samples
``batch_size / W`` rows of its own buffer, and the critic, actor and temperature gradients are
averaged over ranks before each step, so every update is the one-process update on the union of
the shards. ``run.total_steps``, ``steps_per_iter``, ``learning_starts`` and ``utd_ratio`` count
the env steps of all ranks. GoRL over SAC runs in one process.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genrl.algos import pmoe_sac
from genrl.algos.base import register_control_algorithm
from genrl.distributed import replica
from genrl.errors import ConfigError, NonFiniteLossError, check_weights
from genrl.replay import Batch, ReplayBuffer
from genrl_envs.base import BatchedEnv
from genrl_policies.base import PolicyModule
from genrl_policies.gaussian import GaussianPolicy
from genrl_policies.gorl import GoRLPolicy
from genrl_policies.nets import ACTIVATIONS, mlp
from genrl_policies.pmoe import PMOEPolicy


@dataclass(frozen=True)
class SACConfig:
    """The ``algo_config`` section of ``--algo sac``. Defaults: CleanRL's sac_continuous_action.py,
    which agrees with SB3's SAC except where noted."""

    buffer_size: int = 1_000_000
    """Replay capacity in transitions (rounded down to a multiple of the env count)."""
    learning_starts: int = 5000
    """Env steps of uniform random actions before the first gradient step (CleanRL; SB3: 100)."""
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    """Polyak rate of the target critics."""
    policy_lr: float = 3e-4
    q_lr: float = 1e-3
    """Critic learning rate, also the temperature's (CleanRL; SB3: 3e-4 for all three)."""
    policy_frequency: int = 2
    """Actor (and temperature) updates run every this many gradient steps, this many at once
    (CleanRL's delayed update; SB3: 1)."""
    target_network_frequency: int = 1
    """Gradient steps between Polyak updates of the target critics."""
    utd_ratio: float = 1.0
    """Gradient steps per env step (per transition: N per step of N envs); may be fractional."""
    n_step: int = 1
    """Return horizon: n-step returns R_n (cut at episode ends and the newest stored step) bootstrapped
    with gamma^n, formed when a batch is drawn."""
    alpha: str = "auto"
    """Entropy temperature: "auto" (learned, initial 1, SB3), "auto_<init>" (learned from <init>),
    or a number (fixed, e.g. 0.2)."""
    target_entropy: float | None = None
    """Entropy the "auto" temperature aims at; None: -A (SB3, CleanRL)."""
    critic_hidden: tuple[int, ...] = (256, 256)
    critic_activation: str = "relu"
    critic_dtype: str = "float32"
    """Matmul precision of the critics: "float32", or "bfloat16" (autocast; weights, losses and
    Adam stay float32): ~2x faster critic steps on CPUs with AVX512-BF16 / AMX and on GPUs."""
    steps_per_iter: int = 1000
    """Env steps per iteration (rounded up to a multiple of the env count): logging, evaluation and
    checkpoints happen between iterations."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", str(self.alpha))
        positive_int = ("buffer_size", "batch_size", "policy_frequency", "target_network_frequency", "n_step", "steps_per_iter")
        for name in positive_int:
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid algo_config.{name} = {getattr(self, name)} (must be >= 1)")
        if self.learning_starts < 0:
            raise ConfigError(f"invalid algo_config.learning_starts = {self.learning_starts} (must be >= 0)")
        if self.buffer_size < self.batch_size:
            raise ConfigError(f"algo_config.buffer_size = {self.buffer_size} is smaller than algo_config.batch_size = {self.batch_size}")
        checks = {
            "gamma": 0.0 <= self.gamma <= 1.0,
            "tau": 0.0 < self.tau <= 1.0,
            "policy_lr": self.policy_lr > 0 and math.isfinite(self.policy_lr),
            "q_lr": self.q_lr > 0 and math.isfinite(self.q_lr),
            "utd_ratio": self.utd_ratio > 0 and math.isfinite(self.utd_ratio),
            "target_entropy": self.target_entropy is None or math.isfinite(self.target_entropy),
            "critic_hidden": bool(self.critic_hidden) and all(int(h) > 0 for h in self.critic_hidden),
            "critic_activation": self.critic_activation in ACTIVATIONS,
            "critic_dtype": self.critic_dtype in ("float32", "bfloat16"),
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid algo_config.{name} = {getattr(self, name)!r}")
        self.temperature()  # "auto", "auto_<init>" or a number

    def temperature(self) -> tuple[bool, float]:
        """(learned, initial or fixed alpha) from ``alpha``."""
        text = self.alpha.strip()
        learned = text == "auto" or text.startswith("auto_")
        try:
            value = 1.0 if text == "auto" else float(text[5:] if learned else text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > 0 if learned else value >= 0)):
            raise ConfigError(f'invalid algo_config.alpha = {self.alpha!r} ("auto", "auto_<initial alpha > 0>" or a number >= 0)')
        return learned, value


class TwinQ(nn.Module):
    """Two Q(s, a) networks on [obs, action]: (B, O), (B, A) -> (B,), (B,)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], activation: str, dtype: str = "float32") -> None:
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, hidden, 1, activation, out_gain=1.0)
        self.q2 = mlp(obs_dim + action_dim, hidden, 1, activation, out_gain=1.0)
        self.autocast = dtype == "bfloat16"

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([obs, action], -1)
        if not self.autocast:
            return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            q1, q2 = self.q1(x), self.q2(x)
        return q1.float().squeeze(-1), q2.float().squeeze(-1)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging, in place: target <- target + tau (source - target)."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s, tau)


def soft_q_target(reward: Tensor, discount: Tensor, q1: Tensor, q2: Tensor, alpha: Tensor, log_prob: Tensor) -> Tensor:
    """y = reward + discount (min(q1, q2) - alpha log_prob); discount is 0 where the episode terminated."""
    return reward + discount * (torch.minimum(q1, q2) - alpha * log_prob)


def temperature_loss(log_alpha: Tensor, log_prob: Tensor, target_entropy: float) -> Tensor:
    """-mean(log alpha (log pi + target entropy)), the log-prob held constant (SB3, softlearning)."""
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()


def squashed_actor(policy: PolicyModule, env: BatchedEnv) -> PolicyModule:
    """The policy SAC trains: the gaussian (or pmoe, ``pmoe_sac.squashed_pmoe``) family with the
    tanh squash and a state-dependent std (both set here when the run's config leaves them at the
    family's PPO defaults; one of them set otherwise is refused), acting in the env's box."""
    spec = env.spec
    if not (hasattr(policy, "rsample") and hasattr(policy, "set_action_box")):
        raise ConfigError(f"--algo sac trains a reparameterised, squashed policy: --policy gaussian or pmoe (the {policy.family} family has no rsample)")
    if isinstance(policy, PMOEPolicy):
        policy = pmoe_sac.squashed_pmoe(policy)
    if isinstance(policy, GaussianPolicy):
        squash, sde = policy.config.squash, policy.config.state_dependent_std
        if (squash, sde) == ("none", False):
            policy = GaussianPolicy(policy.obs_dim, policy.action_dim, dataclasses.replace(policy.config, squash="tanh", state_dependent_std=True))
        elif (squash, sde) != ("tanh", True):
            raise ConfigError("--algo sac needs policy_config.squash = 'tanh' with policy_config.state_dependent_std = true (or both left unset)")
    try:
        policy.set_action_box(spec.action_low, spec.action_high)  # type: ignore[operator]
    except ValueError:
        raise ConfigError(f"--algo sac squashes actions into the action box; {spec.env_id}'s is not finite") from None
    return policy


class SAC:
    """SAC over a batched env; ``iterate()`` runs ``steps_per_iter`` env steps with their gradient steps."""

    def __init__(self, policy: PolicyModule, env: BatchedEnv, cfg: SACConfig, *, total_steps: int, seed: int, device: str = "cpu") -> None:
        spec = env.spec
        if (policy.obs_dim, policy.action_dim) != (spec.obs_dim, spec.action_dim):
            raise ConfigError(f"policy dims (obs {policy.obs_dim}, action {policy.action_dim}) do not match {spec.env_id} (obs {spec.obs_dim}, action {spec.action_dim})")
        if cfg.buffer_size < spec.n_envs:
            raise ConfigError(f"algo_config.buffer_size = {cfg.buffer_size} is smaller than env.n_envs = {spec.n_envs}")
        self.cfg, self.env, self.device = cfg, env, torch.device(device)
        self.policy = squashed_actor(policy, env).to(self.device)
        self.critic = TwinQ(spec.obs_dim, spec.action_dim, tuple(cfg.critic_hidden), cfg.critic_activation, cfg.critic_dtype).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.autotune, alpha = cfg.temperature()
        self.log_alpha = torch.full((1,), math.log(alpha) if alpha > 0 else -math.inf, device=self.device, requires_grad=self.autotune)
        self.target_entropy = -float(spec.action_dim) if cfg.target_entropy is None else cfg.target_entropy
        aux = {id(p) for p in self.policy.auxiliary_parameters()}  # PMOE-PPO's auxiliary Q: unused by SAC
        self.actor_params = [p for p in self.policy.parameters() if id(p) not in aux]
        # fused Adam: one kernel per step instead of a dozen foreach ops (~15% of an update on CPU)
        self.actor_opt = torch.optim.Adam(self.actor_params, lr=cfg.policy_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.q_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.q_lr, fused=True) if self.autotune else None
        self.dist = replica()  # data-parallel (genrl.distributed): own envs and buffer per rank, gradients averaged
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"algo_config.batch_size = {cfg.batch_size} does not split into {self.dist.world_size} equal per-process shards")
        self.shard = cfg.batch_size // self.dist.world_size  # this rank's rows of each global batch
        self.buffer = ReplayBuffer(cfg.buffer_size, spec.n_envs, spec.obs_dim, spec.action_dim, self.device)
        self.low = torch.as_tensor(spec.action_low, device=self.device)
        self.high = torch.as_tensor(spec.action_high, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(self.dist.seed(seed))
        self.rank_steps = spec.n_envs * self.dist.world_size  # global env steps per vector step (every rank steps once)
        self.env_steps_per_iter = -(-cfg.steps_per_iter // self.rank_steps)  # vector steps
        self.steps_per_iter = self.env_steps_per_iter * self.rank_steps
        self.total_steps = int(total_steps)
        self.n_iterations = max(1, math.ceil(self.total_steps / self.steps_per_iter))
        self.global_step = self.iteration = self.n_updates = 0
        self.learning_from = 0  # env step learning_starts counts from (GoRL-SAC: each stage's first)
        self._stats_base = self.dist.normalizer_stats(env)  # normaliser statistics every rank shares (None: one process)
        self.next_obs = env.reset(seed=seed + self.dist.rank * spec.n_envs).to(self.device)

    rank_local_keys = ("next_obs", "rng.generator", "buffer")
    """What differs between data-parallel ranks (``genrl.distributed_run``): the rest is replicated."""

    # -- acting and storing ---------------------------------------------------------------------
    def explore(self, obs: Tensor) -> Tensor:
        """Uniform in the action box before ``learning_starts``, then the policy's sample; (N, A)."""
        if self.global_step - self.learning_from < self.cfg.learning_starts:
            u = torch.rand(obs.shape[0], self.env.spec.action_dim, generator=self.generator, device=self.device)
            return self.low + (self.high - self.low) * u
        with torch.no_grad():
            action, _ = self.policy.act(obs, generator=self.generator)
        return action

    def iterate(self) -> dict[str, float]:
        """``steps_per_iter`` env steps, each followed by the gradient steps due; returns metrics."""
        cfg, t0 = self.cfg, time.perf_counter()
        returns: list[float] = []
        lengths: list[int] = []
        sums: dict[str, Tensor] = {}
        updates_before, n_actor = self.n_updates, 0
        if self._stats_base is None:  # data-parallel, after a resume: rank 0's normaliser statistics to every rank
            self._stats_base = self.dist.sync_normalizers(self.env)
        obs = self.next_obs
        for _ in range(self.env_steps_per_iter):
            action = self.explore(obs)
            out = self.env.step(action)
            self.buffer.add(obs, action, out.reward, out.final_obs, out.terminated, out.truncated)
            obs = out.obs.to(self.device)
            self.global_step += self.rank_steps
            returns += out.episode_returns
            lengths += out.episode_lengths
            due = int(max(0, self.global_step - self.learning_from - cfg.learning_starts) * cfg.utd_ratio) - self.n_updates
            for _ in range(due):
                n_actor += self.update(sums)
        self.next_obs = obs
        self.iteration += 1
        self._stats_base = self.dist.merge_normalizers(self.env, self._stats_base)
        returns, lengths = self.dist.gather_episodes(returns, lengths)
        sums = self.dist.mean_stats(sums)  # the ranks' loss sums averaged: every rank logs and checks the same
        n_critic = self.n_updates - updates_before
        bad = [k for k, v in sums.items() if not torch.isfinite(v)]
        if bad:
            raise NonFiniteLossError(f"non-finite SAC loss before step {self.global_step} (terms: {', '.join(bad)})")
        check_weights(self.actor_params + list(self.critic.parameters()), f"at step {self.global_step}")
        dt = time.perf_counter() - t0
        metrics = {"rollout/episodes": float(len(returns)), "train/n_updates": float(n_critic), "train/alpha": float(self.log_alpha.detach().exp()),
                   "time/sps": self.steps_per_iter / dt, "time/iteration_s": dt}  # fmt: skip
        if returns:
            metrics["rollout/ep_return"] = sum(returns) / len(returns)
            metrics["rollout/ep_length"] = sum(lengths) / len(lengths)
        for key, value in sums.items():
            metrics[f"train/{key}"] = float(value) / max(1, n_critic if key in ("critic_loss", "q_value") else n_actor)
        return metrics

    # -- gradient steps -------------------------------------------------------------------------
    def update(self, sums: dict[str, Tensor]) -> int:
        """One critic step (and the actor / temperature / target steps due); returns actor steps."""
        cfg = self.cfg
        batch = self.buffer.sample(self.shard, cfg.gamma, cfg.n_step, self.generator)
        alpha = self.log_alpha.detach().exp()
        target = self.td_target(batch, alpha)
        q1, q2 = self.critic(batch.obs, batch.action)
        critic_loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.dist.average_grads(self.critic.parameters())  # data-parallel: the gradient of the global batch's loss
        self.critic_opt.step()
        self.n_updates += 1
        _add(sums, critic_loss=critic_loss.detach(), q_value=(q1 + q2).detach().mean() / 2)
        n_actor = 0
        if self.n_updates % cfg.policy_frequency == 0:
            for _ in range(cfg.policy_frequency):
                actor_loss, log_prob, stats = self.actor_loss(batch.obs, alpha)
                self.actor_opt.zero_grad(set_to_none=True)
                actor_loss.backward(inputs=self.actor_params)  # no gradients for the critic's weights
                self.dist.average_grads(self.actor_params)
                self.actor_opt.step()
                _add(sums, actor_loss=actor_loss.detach(), entropy=-log_prob.detach().mean(), **stats)
                if self.alpha_opt is not None:
                    alpha_loss = temperature_loss(self.log_alpha, log_prob, self.target_entropy)
                    self.alpha_opt.zero_grad(set_to_none=True)
                    alpha_loss.backward()
                    self.dist.average_grads([self.log_alpha])
                    self.alpha_opt.step()
                    alpha = self.log_alpha.detach().exp()
                    _add(sums, alpha_loss=alpha_loss.detach())
                n_actor += 1
        if self.n_updates % cfg.target_network_frequency == 0:
            soft_update(self.critic_target, self.critic, cfg.tau)
        return n_actor

    def td_target(self, batch: Batch, alpha: Tensor) -> Tensor:
        """y (B,) with a' = policy.rsample(s'); for PMOE an expert k' ~ Cat(alpha(s')) and its own log-density."""
        with torch.no_grad():
            next_action, next_log_prob = self.policy.rsample(batch.next_obs, generator=self.generator)
            return soft_q_target(batch.reward, batch.discount, *self.critic_target(batch.next_obs, next_action), alpha, next_log_prob)

    def actor_loss(self, obs: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """mean(alpha log pi(a~|s) - min_j Q_j(s, a~)), log pi(a~|s) (B,) and extra metrics, a~
        reparameterised. PMOE-SAC (``pmoe_sac``): every expert's sample scored by the critic, the
        best expert's loss plus the mixing-weight loss (or the Gumbel / score-ratio baselines)."""
        if isinstance(self.policy, PMOEPolicy):
            return pmoe_sac.actor_loss(self.policy, self.critic, obs, alpha, self.generator)
        action, log_prob = self.policy.rsample(obs, generator=self.generator)
        q1, q2 = self.critic(obs, action)
        return (alpha * log_prob - torch.minimum(q1, q2)).mean(), log_prob, {}

    # -- exact resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Critics, targets, temperature, optimizers, generator, the buffer's written rows (views),
        the next observation and counters; the env saves its own, the run loop the policy."""
        optimizer = {"actor": self.actor_opt.state_dict(), "critic": self.critic_opt.state_dict()}
        if self.alpha_opt is not None:
            optimizer["alpha"] = self.alpha_opt.state_dict()
        return {
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach(),
            "optimizer": optimizer,
            "rng.generator": self.generator.get_state(),
            "next_obs": self.next_obs.cpu(),
            "buffer": self.buffer.state_dict(),
            "buffer_pos": self.buffer.pos,
            "buffer_full": self.buffer.full,
            "global_step": self.global_step,
            "iteration": self.iteration,
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["optimizer"]["actor"])
        self.critic_opt.load_state_dict(state["optimizer"]["critic"])
        if self.alpha_opt is not None:
            self.alpha_opt.load_state_dict(state["optimizer"]["alpha"])
        self.generator.set_state(state["rng.generator"])
        # a fresh, aligned copy (see PPO.load_state_dict); a back end without snapshots restarted its episodes
        restarted = getattr(self.env, "restarted_obs", None)
        self.next_obs = (state["next_obs"] if restarted is None else restarted).to(self.device, copy=True)
        self.buffer.load_state_dict({k: v.to(self.device) for k, v in state["buffer"].items()}, state["buffer_pos"], state["buffer_full"])
        self.global_step, self.iteration, self.n_updates = int(state["global_step"]), int(state["iteration"]), int(state["n_updates"])
        if int(state.get("world_size", 1)) != self.dist.world_size:  # resumed with another number of processes
            self.iteration = self.global_step // self.steps_per_iter
        self._stats_base = None  # data-parallel: rank 0's normaliser statistics are shared at the next iteration

    def close(self) -> None:
        self.env.close()


def _add(sums: dict[str, Tensor], **terms: Tensor) -> None:
    for k, v in terms.items():
        sums[k] = sums[k] + v if k in sums else v


def build(policy: PolicyModule, env: BatchedEnv, cfg: SACConfig, *, total_steps: int, seed: int, device: str = "cpu", **gorl: Any) -> Any:
    """SAC; for the gorl family GoRL around it (``genrl.algos.gorl_sac``; ``gorl``: the trainer's
    ``gorl=`` settings and refinement ``env_factory=``)."""
    if isinstance(policy, GoRLPolicy):
        from genrl.algos import gorl_sac

        return gorl_sac.build(policy, env, cfg, total_steps=total_steps, seed=seed, device=device, **gorl)
    return SAC(policy, env, cfg, total_steps=total_steps, seed=seed, device=device)


#: what an --algo sac run needs other than genrl's PPO-era defaults (laid under the user's config):
#: no running normalisation (CleanRL, SB3), the squashed state-dependent actor of the references
SAC_DEFAULTS = {
    "env": {"normalize_obs": False, "normalize_reward": False},
    "policy_config_for": {
        "gaussian": {"squash": "tanh", "state_dependent_std": True, "hidden_sizes": [256, 256], "activation": "relu"},
        "pmoe": {"n_experts": 4, "hidden_sizes": [256, 256], "activation": "relu", **pmoe_sac.SAC_SETTINGS},  # rlkit-pmoe's example
        # GoRL-SAC's encoder: the SAC actor's layout over the latent, squashed into the latent box; no latent regulariser
        "gorl": {"encoder_hidden": [256, 256], "encoder_activation": "relu", "state_dependent_std": True, "encoder_squash": "tanh", "latent_reg": "none"},
    },
}

register_control_algorithm("sac", build, SACConfig, defaults=SAC_DEFAULTS, gorl=True)

__all__ = ["SAC", "SACConfig", "Batch", "ReplayBuffer", "TwinQ", "soft_q_target", "soft_update", "temperature_loss"]

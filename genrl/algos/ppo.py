"""PPO: Proximal Policy Optimization (Schulman et al., 2017, arXiv:1707.06347) for any policy family.

Shape legend: T rollout steps (``n_steps``), N envs, O obs dim, A action dim, B minibatch,
K chain steps of a per-step log-ratio (diffusion families).

One iteration: collect T x N transitions with the current policy (``act`` returns the action and
a behaviour *record*), compute values of every observation and of every next observation in two
batched critic calls, GAE with time limits bootstrapped and terminations not, then ``n_epochs``
passes of shuffled minibatches minimising

    clipped surrogate(policy.log_ratio)  +  vf_coef * value loss  -  ent_coef * regularizer
    + policy.auxiliary_loss (the family's own, e.g. PMOE's mixing-weight loss)

with global-norm gradient clipping, optional target-KL early stop and linear learning-rate
annealing. The policy family is never inspected: only the contract of ``policies.base``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from genrl.advantages import gae
from genrl.distributed import replica
from genrl.errors import ConfigError, NonFiniteLossError, check_weights
from genrl.losses import clipped_surrogate, value_loss
from genrl_envs.base import BatchedEnv
from genrl_policies.base import PolicyModule, record_map
from genrl_policies.nets import mlp


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters; defaults are the widely used MuJoCo settings (PPO paper, CleanRL, SB3)."""

    n_steps: int = 2048
    """Rollout length per env per iteration."""
    n_minibatches: int = 32
    n_epochs: int = 10
    learning_rate: float = 3e-4
    anneal_lr: bool = True
    """Linearly decay the learning rate to 0 over the run."""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    """Ratio clip; for per-step log-ratios (diffusion chains) the clip of the first (noisiest)
    fine-tuned step (DPPO's ``clip_ploss_coef``; its gym fine-tuning uses 0.01)."""
    clip_coef_final: float | None = None
    """Per-step log-ratios: clip of the last (cleanest) step, reached from ``clip_coef`` by
    DPPO's exponential schedule at ``clip_rate``; None: ``clip_coef`` at every step."""
    clip_rate: float = 3.0
    """Rate of that schedule (DPPO ``clip_ploss_coef_rate``)."""
    denoising_gamma: float = 0.99
    """Per-step log-ratios: step i of K' weighs the advantage by denoising_gamma^(K'-1-i), so later,
    cleaner steps weigh more (DPPO ``gamma_denoising``); 1: equal weights."""
    clip_vloss: bool = False
    """Clip the value prediction around the rollout values with ``clip_coef``."""
    vf_clip_mode: str = "max"
    """With ``clip_vloss``: "max" of the clipped and unclipped losses (PPO2, CleanRL, RSL-RL) or
    the "clipped" prediction's loss alone (skrl, PolicyFlow)."""
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    """Weight of the policy's regularizer (entropy for Gaussians)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip; inf: no clipping (FPO, DPPO)."""
    target_kl: float | None = None
    """Stop the epoch loop when the minibatch approx-KL exceeds 1.5 x this (SB3's rule)."""
    norm_adv: bool = True
    """Normalise advantages (zero mean, unit std)."""
    norm_adv_scope: str = "minibatch"
    """"minibatch" (CleanRL/SB3) or "batch" (once over the whole rollout, RSL-RL/PolicyFlow)."""
    desired_kl: float | None = None
    """KL-adaptive learning rate (RSL-RL, PolicyFlow): before each minibatch step the lr is divided
    by 1.5 when the minibatch KL estimate exceeds 2 x this and multiplied by 1.5 below half of
    it, within [lr_min, lr_max]. None: off. Needs ``anneal_lr = false``."""
    kl_adapt_every: str = "minibatch"
    """When the adaptive lr changes: each "minibatch" on its KL (RSL-RL) or each "epoch" on the
    mean KL of the update's minibatches so far (skrl's KLAdaptiveLR, PolicyFlow)."""
    lr_min: float = 1e-5
    lr_max: float = 1e-2
    optimizer: str = "adam"
    """"adam" or "adamw" (decoupled weight decay, PolicyFlow's optimiser)."""
    weight_decay: float = 0.0
    critic_hidden: tuple[int, ...] = (64, 64)
    critic_activation: str = "tanh"
    adam_eps: float = 1e-5
    stage_clip_coefs: tuple[float, ...] = ()
    """Per-stage ``clip_coef`` for staged algorithms (GoRL: one per stage; its code: 0.15, then
    0.3); empty: ``clip_coef`` throughout."""
    stage_max_grad_norms: tuple[float, ...] = ()
    """Per-stage ``max_grad_norm`` (GoRL's code: 0.5, then 1.0); empty: ``max_grad_norm`` throughout."""

    def __post_init__(self) -> None:
        checks = {
            "n_steps": self.n_steps >= 1,
            "n_minibatches": self.n_minibatches >= 1,
            "n_epochs": self.n_epochs >= 1,
            "learning_rate": self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "gamma": 0.0 <= self.gamma <= 1.0,
            "gae_lambda": 0.0 <= self.gae_lambda <= 1.0,
            "clip_coef": self.clip_coef > 0,
            "clip_coef_final": self.clip_coef_final is None or (self.clip_coef_final > 0 and math.isfinite(self.clip_coef_final)),
            "clip_rate": self.clip_rate > 0 and math.isfinite(self.clip_rate),
            "denoising_gamma": 0.0 < self.denoising_gamma <= 1.0,
            "vf_coef": self.vf_coef >= 0,
            "ent_coef": math.isfinite(self.ent_coef),
            "max_grad_norm": self.max_grad_norm > 0,
            "target_kl": self.target_kl is None or self.target_kl > 0,
            "adam_eps": self.adam_eps > 0,
            "norm_adv_scope": self.norm_adv_scope in ("minibatch", "batch"),
            "desired_kl": self.desired_kl is None or (self.desired_kl > 0 and math.isfinite(self.desired_kl)),
            "lr_min": 0 < self.lr_min <= self.lr_max,
            "kl_adapt_every": self.kl_adapt_every in ("minibatch", "epoch"),
            "vf_clip_mode": self.vf_clip_mode in ("max", "clipped"),
            "optimizer": self.optimizer in ("adam", "adamw"),
            "weight_decay": self.weight_decay >= 0 and math.isfinite(self.weight_decay),
        }
        for name in ("stage_clip_coefs", "stage_max_grad_norms"):
            checks[name] = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in getattr(self, name))
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid ppo.{name} = {getattr(self, name)!r}")
        if self.desired_kl is not None and self.anneal_lr:
            raise ConfigError("ppo.desired_kl (KL-adaptive learning rate) needs ppo.anneal_lr = false")
        if self.weight_decay > 0 and self.optimizer == "adam":
            raise ConfigError("ppo.weight_decay needs ppo.optimizer = 'adamw' (Adam's L2 penalty is not offered)")


def chain_schedule(n: int, gamma: float, base: float, final: float, rate: float) -> tuple[Tensor, Tensor]:
    """DPPO's per-step weights and clips for a chain of ``n`` fine-tuned steps, float64 (n,) each:
    gamma^(n-1-i), and base + (final - base) (e^{rate u} - 1) / (e^rate - 1) with u = i / (n - 1)
    from the first (i = 0) to the last step ((final,) when n = 1)."""
    weights = gamma ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
    if n == 1:
        return weights, torch.tensor([final], dtype=torch.float64)
    u = torch.arange(n, dtype=torch.float64) / (n - 1)
    return weights, base + (final - base) * torch.expm1(rate * u) / math.expm1(rate)


def adaptive_lr(lr: float, kl: float, desired_kl: float, lr_min: float, lr_max: float) -> float:
    """RSL-RL's KL-adaptive rule: lr / 1.5 if kl > 2 desired, lr * 1.5 if 0 < kl < desired / 2,
    clamped to [lr_min, lr_max]; otherwise unchanged."""
    if kl > 2.0 * desired_kl:
        return max(lr_min, lr / 1.5)
    if 0.0 < kl < desired_kl / 2.0:
        return min(lr_max, lr * 1.5)
    return lr


class Critic(nn.Module):
    """State-value network V(s) (the critic belongs to the algorithm, not the policy)."""

    def __init__(self, obs_dim: int, hidden: tuple[int, ...], activation: str) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1, activation, out_gain=1.0)

    def forward(self, obs: Tensor) -> Tensor:  # (B, O) -> (B,)
        return self.net(obs).squeeze(-1)


class PPO:
    """PPO over a batched env and any policy of the contract.

    ``iterate()`` runs one rollout + update and returns metrics; ``state_dict()`` /
    ``load_state_dict()`` capture everything needed for an exact resume (with the env's own).
    """

    def __init__(
        self,
        policy: PolicyModule,
        env: BatchedEnv,
        config: PPOConfig,
        *,
        total_steps: int,
        seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        spec = env.spec
        if (policy.obs_dim, policy.action_dim) != (spec.obs_dim, spec.action_dim):
            raise ConfigError(f"policy dims (obs {policy.obs_dim}, action {policy.action_dim}) do not match {spec.env_id} (obs {spec.obs_dim}, action {spec.action_dim})")
        batch = config.n_steps * spec.n_envs
        if batch % config.n_minibatches:
            raise ConfigError(f"n_steps * n_envs = {batch} is not divisible by n_minibatches = {config.n_minibatches}")
        self.policy, self.env, self.cfg = policy.to(device), env, config
        self.device = torch.device(device)
        self.critic = Critic(spec.obs_dim, tuple(config.critic_hidden), config.critic_activation).to(device)
        aux_ids = {id(p) for p in policy.auxiliary_parameters()}
        self.aux_params = [p for p in policy.parameters() if id(p) in aux_ids]
        self.params = [p for p in policy.parameters() if id(p) not in aux_ids] + list(self.critic.parameters())
        params = self.params + self.aux_params
        # fused Adam(W): one kernel per step instead of a dozen foreach ops (~15% of update time)
        if config.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=config.learning_rate, eps=config.adam_eps, weight_decay=config.weight_decay, fused=True)
        else:
            self.optimizer = torch.optim.Adam(params, lr=config.learning_rate, eps=config.adam_eps, fused=True)
        self.dist = replica()  # data-parallel processes (genrl.distributed); one process: every hook is local
        self.total_steps = int(total_steps)
        self.steps_per_iter = batch * self.dist.world_size  # env steps of all processes
        self.n_iterations = max(1, math.ceil(self.total_steps / self.steps_per_iter))
        self.generator = torch.Generator(device=self.device).manual_seed(self.dist.seed(seed))
        self.global_step = 0
        self.iteration = 0
        self.stage = 0
        """Index into ``stage_clip_coefs`` / ``stage_max_grad_norms``; a staged algorithm sets it."""
        self._stats_base = self.dist.normalizer_stats(env)  # normaliser statistics every rank shares (None: one process)
        self.next_obs = env.reset(seed=seed + self.dist.rank * spec.n_envs).to(self.device)
        self._storage: dict[str, Any] | None = None

    # -- rollout ------------------------------------------------------------------------------
    def _allocate(self, record: Any) -> dict[str, Any]:
        T, N, O = self.cfg.n_steps, self.env.spec.n_envs, self.env.spec.obs_dim
        z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=self.device)  # noqa: E731
        return {
            "obs": z(T, N, O),
            "next_obs": z(T, N, O),  # obs after step t (final obs where the episode ended)
            "reward": z(T, N),
            "terminated": z(T, N, dtype=torch.bool),
            "truncated": z(T, N, dtype=torch.bool),
            "record": record_map(lambda x: z(T, *x.shape, dtype=x.dtype), record),
        }

    def collect(self) -> dict[str, float]:
        """Fill the rollout storage with T x N transitions; returns episode statistics."""
        ep_returns: list[float] = []
        ep_lengths: list[int] = []
        obs = self.next_obs
        if self._storage is None:  # allocated outside inference mode: normal tensors for autograd
            with torch.no_grad():
                _, first = self.policy.act(obs, generator=torch.Generator(self.device).manual_seed(0))
            self._storage = self._allocate(first)
        s = self._storage
        if self._stats_base is None:  # after a resume: rank 0's statistics to every rank
            self._stats_base = self.dist.sync_normalizers(self.env)
        with torch.inference_mode():
            obs = self._rollout(s, obs, ep_returns, ep_lengths)
        self.next_obs = obs.clone()  # a normal tensor again (checkpoints, autograd)
        self._stats_base = self.dist.merge_normalizers(self.env, self._stats_base)
        ep_returns, ep_lengths = self.dist.gather_episodes(ep_returns, ep_lengths)
        self.global_step += self.steps_per_iter
        stats: dict[str, float] = {"rollout/episodes": float(len(ep_returns))}
        if ep_returns:
            stats["rollout/ep_return"] = sum(ep_returns) / len(ep_returns)
            stats["rollout/ep_length"] = sum(ep_lengths) / len(ep_lengths)
        return stats

    def _rollout(self, s: dict[str, Any], obs: Tensor, ep_returns: list[float], ep_lengths: list[int]) -> Tensor:
        # Per-step tensors go to lists and are stacked into the storage once: one copy per
        # field per rollout instead of one indexed write per field per step (~15 us a step).
        names = [f.name for f in dataclasses.fields(s["record"])]
        cols: dict[str, list[Tensor]] = {k: [] for k in ("obs", "reward", "terminated", "truncated", "next_obs", *names)}
        on_cpu = self.device.type == "cpu"
        overlap = getattr(self.env, "can_step_async", False)  # the simulator steps while the record is stored
        for _ in range(self.cfg.n_steps):
            action, record = self.policy.act(obs, generator=self.generator)
            if overlap:
                self.env.step_async(action)  # type: ignore[attr-defined]
            cols["obs"].append(obs)
            for name in names:
                cols[name].append(getattr(record, name))
            out = self.env.step_wait() if overlap else self.env.step(action)  # type: ignore[attr-defined]
            cols["reward"].append(out.reward)
            cols["terminated"].append(out.terminated)
            cols["truncated"].append(out.truncated)
            cols["next_obs"].append(out.final_obs)
            obs = out.obs if on_cpu else out.obs.to(self.device)
            if out.episode_returns:
                ep_returns += out.episode_returns
                ep_lengths += out.episode_lengths
        for key in ("obs", "reward", "terminated", "truncated", "next_obs"):
            torch.stack(cols[key], out=s[key]) if on_cpu else s[key].copy_(torch.stack(cols[key]))
        for name in names:
            store = getattr(s["record"], name)
            store.copy_(torch.stack(cols[name]))
        return obs

    # -- update -------------------------------------------------------------------------------
    def ppo_loss(
        self, obs: Tensor, record: Any, advantages: Tensor, returns: Tensor, old_values: Tensor, *, normalized: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        """Total minibatch loss and its detached terms (``normalized``: advantages already are)."""
        cfg = self.cfg
        if cfg.norm_adv and cfg.norm_adv_scope == "minibatch" and advantages.numel() > 1 and not normalized:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        terms = self.policy.evaluate(obs, record, returns, regularize=cfg.ent_coef != 0, generator=self.generator)
        log_ratio = terms.log_ratio
        if not terms.chain:
            pg_loss, stats = clipped_surrogate(log_ratio, advantages, self.clip_coef)
        else:  # (B, K') per-step ratios of a denoising chain: DPPO's weights and clip schedule
            final = self.clip_coef if cfg.clip_coef_final is None else cfg.clip_coef_final
            weights, clip_coefs = chain_schedule(log_ratio.shape[-1], cfg.denoising_gamma, self.clip_coef, final, cfg.clip_rate)
            dtype = torch.get_default_dtype()  # the schedule in float64, then the default dtype (as DPPO's buffers)
            weights, clip_coefs = weights.to(dtype).to(log_ratio.device), clip_coefs.to(dtype).to(log_ratio.device)
            pg_loss, stats = clipped_surrogate(log_ratio, advantages, clip_coefs, weights)
        v_loss = value_loss(self.critic(obs), returns, old_values, self.clip_coef if cfg.clip_vloss else None, cfg.vf_clip_mode)
        loss = pg_loss + cfg.vf_coef * v_loss
        stats.update(policy_loss=pg_loss.detach(), value_loss=v_loss.detach())
        if terms.regularizer is not None:
            reg_mean = terms.regularizer.mean()
            loss = loss - cfg.ent_coef * reg_mean
            stats["entropy"] = reg_mean.detach()
        if terms.aux_loss is not None:
            loss = loss + terms.aux_loss
            stats["aux_loss"] = terms.aux_loss.detach()
        stats.update(terms.stats)
        if not torch.isfinite(loss):
            bad = [k for k, v in stats.items() if not torch.isfinite(v).all()]
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step} (terms: {', '.join(bad) or 'total'})")
        return loss, stats

    def update(self) -> dict[str, float]:
        """GAE over the stored rollout, then the epoch/minibatch loop."""
        cfg, s = self.cfg, self._storage
        assert s is not None, "collect() must run before update()"
        T, N = cfg.n_steps, self.env.spec.n_envs
        if cfg.anneal_lr:
            frac = 1.0 - self.iteration / self.n_iterations
            self.optimizer.param_groups[0]["lr"] = frac * cfg.learning_rate
        with torch.no_grad():
            values = self.critic(s["obs"].view(T * N, -1)).view(T, N)
            next_values = self.critic(s["next_obs"].view(T * N, -1)).view(T, N)
        advantages, returns = gae(s["reward"], values, next_values, s["terminated"], s["truncated"], cfg.gamma, cfg.gae_lambda)
        self.policy.begin_update()
        b_obs = s["obs"].view(T * N, -1)
        b_rec = record_map(lambda x: x.reshape(T * N, *x.shape[2:]), s["record"])
        b_adv, b_ret, b_val = advantages.view(-1), returns.view(-1), values.view(-1)
        if cfg.norm_adv and cfg.norm_adv_scope == "batch":
            b_adv = self.dist.normalize(b_adv)  # over the global batch
        batch, mb = T * N, T * N // cfg.n_minibatches
        sums: dict[str, Tensor] = {}
        kls: list[float] = []  # minibatch KL estimates of this update (KL-adaptive lr)
        n_updates, stop = 0, False
        for _ in range(cfg.n_epochs):
            perm = torch.randperm(batch, generator=self.generator, device=self.device)
            shared = self.dist.world_size > 1 and cfg.norm_adv and cfg.norm_adv_scope == "minibatch"  # over each global minibatch
            e_adv = self.dist.normalize_slices(b_adv[perm], mb) if shared else None
            for start in range(0, batch, mb):
                idx = perm[start : start + mb]
                rec = record_map(lambda x: x[idx], b_rec)
                adv = b_adv[idx] if e_adv is None else e_adv[start : start + mb]
                loss, stats = self.ppo_loss(b_obs[idx], rec, adv, b_ret[idx], b_val[idx], normalized=e_adv is not None)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                stats = self.dist.average_grads(self.params + self.aux_params, stats)  # and the KL: every rank stops alike
                if cfg.target_kl is not None and stats["approx_kl"] > 1.5 * cfg.target_kl:
                    stop = True
                    break
                if cfg.desired_kl is not None:
                    kls.append(float(stats["approx_kl"]))
                    if cfg.kl_adapt_every == "minibatch":
                        self._adapt_lr(kls[-1])
                grad_norm = nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
                finite = torch.isfinite(grad_norm)
                if self.aux_params:  # auxiliary nets (e.g. PMOE's Q) are clipped on their own
                    aux_norm = nn.utils.clip_grad_norm_(self.aux_params, self.max_grad_norm, foreach=True)
                    finite = finite & torch.isfinite(aux_norm)
                if not finite:
                    raise NonFiniteLossError(f"non-finite gradient norm at step {self.global_step}")
                self.optimizer.step()
                stats["grad_norm"] = grad_norm
                for k, v in stats.items():  # tensors: one conversion per update, not per minibatch
                    sums[k] = sums[k] + v if k in sums else v
                n_updates += 1
            if stop:
                break
            if cfg.desired_kl is not None and cfg.kl_adapt_every == "epoch" and kls:
                self._adapt_lr(sum(kls) / len(kls))
        check_weights(self.params + self.aux_params, f"at step {self.global_step}")
        self.iteration += 1
        out = {f"train/{k}": float(v) / max(n_updates, 1) for k, v in sums.items()}
        if "entropy" not in sums:
            with torch.no_grad():
                reg = self.policy.regularizer(b_obs, b_rec)
            if reg is not None:
                out["train/entropy"] = float(self.dist.mean_stats({"e": reg.mean()})["e"])
        out["train/explained_variance"] = self.dist.explained_variance(b_val, b_ret)
        out["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        out["train/n_updates"] = float(n_updates)
        out["train/early_stop"] = float(stop)
        return out

    @property
    def clip_coef(self) -> float:
        """The ratio (and value) clip of the current stage."""
        return float(self.cfg.stage_clip_coefs[self.stage]) if self.cfg.stage_clip_coefs else self.cfg.clip_coef

    @property
    def max_grad_norm(self) -> float:
        """The gradient-norm clip of the current stage."""
        return float(self.cfg.stage_max_grad_norms[self.stage]) if self.cfg.stage_max_grad_norms else self.cfg.max_grad_norm

    def _adapt_lr(self, kl: float) -> None:
        cfg, group = self.cfg, self.optimizer.param_groups[0]
        assert cfg.desired_kl is not None
        group["lr"] = adaptive_lr(group["lr"], kl, cfg.desired_kl, cfg.lr_min, cfg.lr_max)

    def iterate(self) -> dict[str, float]:
        """One rollout + one update; returns the metrics of both and time/sps."""
        t0 = time.perf_counter()
        metrics = self.collect()
        t1 = time.perf_counter()
        metrics.update(self.update())
        t2 = time.perf_counter()
        metrics["time/sps"] = self.steps_per_iter / (t2 - t0)
        metrics["time/rollout_s"] = t1 - t0
        metrics["time/update_s"] = t2 - t1
        return metrics

    # -- exact resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors (critic, next obs, rng) + optimizer state + counters; the env saves its own."""
        return {
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "next_obs": self.next_obs.cpu(),
            "rng.generator": self.generator.get_state(),
            "global_step": self.global_step,
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        # a fresh, aligned copy: a tensor read from a file may start off a 64-byte boundary, and
        # the policy's first action would then round differently (see envs.gym._aligned)
        restarted = getattr(self.env, "restarted_obs", None)  # a back end without snapshots restarted its episodes
        self.next_obs = (state["next_obs"] if restarted is None else restarted).to(self.device, copy=True)
        self.generator.set_state(state["rng.generator"])
        self.global_step = int(state["global_step"])
        self.iteration = int(state["iteration"])
        if int(state.get("world_size", 1)) != self.dist.world_size:  # resumed with another number of processes
            self.iteration = self.global_step // self.steps_per_iter
        self._stats_base = None  # data-parallel: rank 0's normaliser statistics are shared at the next rollout

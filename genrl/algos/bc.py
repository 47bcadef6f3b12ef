"""Behaviour cloning of diffusion and flow policies from demonstrations (Diffusion Policy's recipe).

``genrl train --algo bc --dataset demos.safetensors --policy diffusion|policyflow|fpo`` fits the
policy to a genrl-demos file (``genrl demos``, ``genrl.datasets``) by the family's own denoising
objective (``policy.bc_loss``: DDPM noise prediction for the diffusion family, conditional flow
matching for the flow families), on Diffusion Policy's windows: the observation history of
``env.n_obs_steps`` steps (oldest first) and the action chunk of ``env.horizon`` steps, padded at
episode edges; the env executes ``env.n_action_steps`` of each chunk (``envs.chunking``).

One iteration is ``updates_per_iter`` AdamW steps on minibatches drawn with the algorithm's own
generator (learning rate: linear warm-up, then cosine to 0, as Diffusion Policy); the run's budget
(``run.total_steps``) counts gradient steps. Observations are normalised with the dataset's mean
and variance, frozen into the env's normaliser, so the evaluation episodes and the exported agent
see exactly the training inputs; actions are used as recorded (the tasks' action boxes are
[-1, 1], the range the diffusion family's x0 clip assumes). The acting policy (``policy``: what
evaluation, checkpoints' ``policy/`` and the export hold) is an exponential moving average of the
trained weights (Diffusion Policy's warm-up decay 1 - (1 + step)^-0.75 up to ``ema_decay``; it evaluates
its EMA model), the trained weights are
``model``. ``init_from`` in a PPO run then fine-tunes the exported policy with RL (DPPO's workflow).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genrl.algos.base import register_control_algorithm
from genrl.distributed import ShardedSampler, replica
from genrl.errors import ConfigError, NonFiniteLossError, check_weights
from genrl_envs.base import BatchedEnv
from genrl_policies.base import PolicyModule


@dataclass(frozen=True)
class BCConfig:
    """The ``algo_config`` section of ``--algo bc``."""

    dataset: str = ""
    """A genrl-demos file (``genrl demos --env ... --out FILE``); required."""
    batch_size: int = 256
    learning_rate: float = 1e-4
    weight_decay: float = 1e-6
    updates_per_iter: int = 500
    """Gradient steps per iteration (logging, evaluation and checkpoints happen between iterations)."""
    warmup_steps: int = 500
    """Linear learning-rate warm-up, then cosine decay to 0 over the run (Diffusion Policy's schedule)."""
    ema_decay: float = 0.9999
    """Largest decay of the EMA of the trained weights that acts (Diffusion Policy's EMAModel: decay
    1 - (1 + step)^-0.75, capped here); 0: the trained weights themselves act."""
    successful_only: bool = True
    """Train on the dataset's successful episodes only."""
    max_episodes: int = 0
    """Use only the first N (successful) episodes; 0: all (dataset-size studies)."""

    def __post_init__(self) -> None:
        if self.dataset and Path(self.dataset).expanduser().exists():  # recorded absolute: the run resumes from any folder
            object.__setattr__(self, "dataset", str(Path(self.dataset).expanduser().resolve()))
        for name in ("batch_size", "updates_per_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid algo_config.{name} = {getattr(self, name)} (must be >= 1)")
        if self.warmup_steps < 0 or self.max_episodes < 0:
            raise ConfigError("algo_config.warmup_steps and algo_config.max_episodes must be >= 0")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)) or self.weight_decay < 0:
            raise ConfigError(f"invalid algo_config.learning_rate / weight_decay = {self.learning_rate} / {self.weight_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"invalid algo_config.ema_decay = {self.ema_decay} (in [0, 1))")


_SAMPLER_SEED = 5_000_011
"""Offset of the seed of the batch-drawing stream that every data-parallel rank shares."""


class BC:
    """Behaviour cloning; ``iterate()`` runs ``updates_per_iter`` gradient steps."""

    def __init__(self, policy: PolicyModule, env: BatchedEnv, cfg: BCConfig, *, total_steps: int, seed: int, device: str = "cpu") -> None:
        from genrl.datasets import ChunkDataset, DatasetError, load_demos

        if not cfg.dataset:
            raise ConfigError("--algo bc needs a dataset: --dataset FILE (genrl demos --env ... --out FILE)")
        if type(policy).bc_loss is PolicyModule.bc_loss:
            raise ConfigError(f"the {policy.family} policy cannot be behaviour-cloned (no denoising objective); use diffusion, policyflow or fpo")
        try:
            demos = load_demos(cfg.dataset)
        except DatasetError as exc:
            raise ConfigError(str(exc)) from None
        spec = env.spec
        if demos.env_id != spec.env_id:
            raise ConfigError(f"{cfg.dataset} holds demonstrations of {demos.env_id}, the run's env is {spec.env_id}")
        if cfg.successful_only:
            demos = demos.select(np.asarray(demos.success, dtype=bool))
        if cfg.max_episodes:
            demos = demos.select(np.arange(min(cfg.max_episodes, demos.n_episodes)))
        if demos.n_episodes == 0:
            raise ConfigError(f"{cfg.dataset} has no (successful) episodes to clone")
        O, A = demos.obs_dim, demos.action_dim
        if spec.obs_dim % O or spec.action_dim % A:
            raise ConfigError(f"the env's obs {spec.obs_dim} / action {spec.action_dim} are not stacks of the dataset's {O} / {A}")
        self.n_obs_steps, self.horizon = spec.obs_dim // O, spec.action_dim // A
        view = getattr(env, "obs_resolution", None)
        if view:  # the policy's sensors (env.obs_resolution): the clone learns from what it will see
            from genrl_envs.views import apply_view

            demos = dataclasses.replace(demos, obs=apply_view(demos.obs, view, O))
        self.device = torch.device(device)
        self.cfg, self.env, self.demos = cfg, env, demos
        self.data = ChunkDataset(demos, self.n_obs_steps, self.horizon, device=self.device)
        # the dataset's per-step statistics, stacked like the env's observation, frozen into its normaliser
        obs64 = np.asarray(demos.obs, dtype=np.float64)
        stats = {"mean": np.tile(obs64.mean(0), self.n_obs_steps), "var": np.tile(obs64.var(0), self.n_obs_steps), "count": np.asarray(float(len(obs64)))}
        if hasattr(env, "set_obs_normalizer") and env.obs_normalizer_state() is not None:
            env.set_obs_normalizer(stats, frozen=True)
            self._mean = torch.as_tensor(stats["mean"], device=self.device)
            self._std = torch.sqrt(torch.as_tensor(stats["var"], device=self.device) + 1e-8)
            self._clip = float(getattr(env, "clip_obs", getattr(getattr(env, "_obs_norm", None), "clip", 10.0)))
        else:
            self._mean = None
        self.model = policy.to(self.device)
        self.policy = copy.deepcopy(self.model) if cfg.ema_decay > 0 else self.model
        self.policy.requires_grad_(False) if cfg.ema_decay > 0 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.dist = replica()  # data-parallel: each gradient step's batch split into disjoint per-rank shards
        self.sampler = ShardedSampler(self.dist, seed + _SAMPLER_SEED, self.device) if self.dist.world_size > 1 else None
        if self.sampler is not None and cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"algo_config.batch_size = {cfg.batch_size} does not split into {self.dist.world_size} equal shards (one per process)")
        self.generator = torch.Generator(device=self.device).manual_seed(self.dist.seed(seed))  # the noise: per rank
        self.total_steps = int(total_steps)
        self.steps_per_iter = cfg.updates_per_iter
        self.n_iterations = max(1, math.ceil(self.total_steps / self.steps_per_iter))
        self.iteration = 0

    @property
    def global_step(self) -> int:
        """Gradient steps done."""
        return self.iteration * self.steps_per_iter

    def normalize(self, obs: Tensor) -> Tensor:
        """Dataset observations as the env presents them to the policy."""
        if self._mean is None:
            return obs
        return ((obs.double() - self._mean) / self._std).clamp(-self._clip, self._clip).float()

    def _lr(self, step: int) -> float:
        c, total = self.cfg, self.n_iterations * self.steps_per_iter
        if step < c.warmup_steps:
            return c.learning_rate * (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, total - c.warmup_steps)
        return c.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def iterate(self) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(cfg.updates_per_iter):
            step = self.global_step + i
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(step)
            if self.sampler is None:
                obs, actions = self.data.sample(cfg.batch_size, self.generator)
            else:
                obs, actions = self.data.get(self.sampler.rows(len(self.data), cfg.batch_size))
            loss = self.model.bc_loss(self.normalize(obs), actions, generator=self.generator)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite behaviour-cloning loss at gradient step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.dist.average_grads(self.model.parameters())
            self.optimizer.step()
            if cfg.ema_decay > 0:
                decay = min(cfg.ema_decay, 1.0 - (1.0 + step) ** -0.75)  # early steps barely averaged
                with torch.no_grad():
                    for p_ema, p in zip(self.policy.parameters(), self.model.parameters(), strict=True):
                        p_ema.lerp_(p, 1.0 - decay)
            total += loss.detach()
        self.policy.finish_bc()  # e.g. the diffusion family's frozen base steps take the cloned weights
        check_weights(list(self.model.parameters()), f"at gradient step {self.global_step + cfg.updates_per_iter}")
        self.iteration += 1
        dt = time.perf_counter() - t0
        return {"train/bc_loss": float(self.dist.mean_stats({"loss": total})["loss"]) / cfg.updates_per_iter, "train/learning_rate": self.optimizer.param_groups[0]["lr"],
                "time/updates_per_s": cfg.updates_per_iter / dt, "time/update_s": dt}  # fmt: skip

    # -- exact resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "rng.generator": self.generator.get_state(), "iteration": self.iteration}
        if self.cfg.ema_decay > 0:  # the acting (EMA) policy is saved as the checkpoint's policy; these are the trained weights
            state["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.sampler is not None:  # the shared batch-drawing stream (replicated on every rank)
            state["rng.sampler"] = self.sampler.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cfg.ema_decay > 0:
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng.generator"])
        if self.sampler is not None and "rng.sampler" in state:
            self.sampler.generator.set_state(state["rng.sampler"])
        self.iteration = int(state["iteration"])

    def close(self) -> None:
        self.env.close()


def build(policy: PolicyModule, env: BatchedEnv, cfg: BCConfig, *, total_steps: int, seed: int, device: str = "cpu") -> BC:
    return BC(policy, env, cfg, total_steps=total_steps, seed=seed, device=device)


register_control_algorithm("bc", build, BCConfig)

__all__ = ["BC", "BCConfig"]

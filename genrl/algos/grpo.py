"""GRPO for text-to-image flow models: the configuration and machinery Flow-GRPO and G2RPO share.

The two algorithms are one file each: ``flow_grpo.py`` (Liu et al. 2025, arXiv 2505.05470) and
``g2rpo.py`` (Zhou et al. 2025, arXiv 2510.01982); their docstrings describe them. Here: the
config (``grpo_config.py``: one dataclass, both algorithms' fields), the schedules (trained steps, G2RPO's
continuation, the fixed shifted sigmas), Flow-GRPO's zero-advantage filter, and the ``GRPO`` base
class (optimiser, EMA, SDE and ODE steps, ratio and KL terms, guarded optimiser step,
``iterate``, ``generate``, resume state).

Options shared by both: GRPO-Guard's normalised ratio (``ratio="guard"``), GDPO's decoupled
per-reward normalisation (``reward_aggregation="gdpo"``), LoRA or full fine-tuning.

Shapes: P prompts per iteration, G group size, N = P*G images, T sampling steps, M optimised
steps (G2RPO), L granularities, C/H/W latent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from genrl.algos.grpo_config import ALGOS, CONTINUATIONS, GRPOConfig
from genrl.distributed import replica
from genrl.errors import ConfigError, NonFiniteLossError, check_weights
from genrl_policies.t2i import Conditioning, FlowImagePolicy, SDEStep, guard_log_ratio, kl_to_reference


def trained_steps(cfg: GRPOConfig) -> list[int]:
    """Flow-GRPO's trained step indices: the SDE steps, or the first int(T * fraction)."""
    if cfg.sde_steps:
        return sorted(set(cfg.sde_steps))
    return list(range(max(1, int(cfg.n_steps * cfg.timestep_fraction))))


def continuation_indices(k: int, stride: int, num_steps: int, rule: str = "official") -> list[int]:
    """G2RPO's deterministic continuation after the SDE step k -> k+1, as schedule indices: the
    model is evaluated at every index but the last, and the last step jumps to it.

    Both rules start from the strided list S = [k+1] + [k+2, k+2+stride, ...] (indices <= T).
    ``"official"`` (``bcmi/Granular-GRPO``, ``train_g2rpo_hps.py``: ``prefix = sigmas[:k+2]``,
    ``suffix = sigmas[k+2::g]``, ODE over ``range(k+1, len-1)``, decode the x0-prediction of the
    last iteration) evaluates S without its last element and jumps from the one before it to
    sigma = 0; when the stride lands on T that is the plain Euler schedule, when it skips T the
    last strided sigma is never evaluated. ``"extended"`` (genrl's earlier rule) evaluates all of S
    and jumps from its last element to sigma = 0 when the stride skips T.
    """
    strided = [k + 1, *range(k + 2, num_steps + 1, stride)]
    if rule == "official":
        return [*strided[:-1], num_steps] if len(strided) > 1 else [num_steps]
    if rule == "extended":
        return strided if strided[-1] == num_steps else [*strided, num_steps]
    raise ValueError(f"unknown continuation rule {rule!r}; valid: {', '.join(CONTINUATIONS)}")


def shifted_sigmas(num_steps: int, shift: float) -> Tensor:
    """DanceGRPO / G2RPO's fixed schedule: ``linspace(1, 0, T+1)`` mapped by the SD3 time shift
    ``shift t / (1 + (shift - 1) t)``, in float32 as the reference computes it."""
    t = torch.linspace(1, 0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def kept_samples(advantages: Tensor, n_minibatches: int, generator: torch.Generator) -> Tensor:
    """Indices of the samples Flow-GRPO trains on with zero-advantage filtering: those with a
    non-zero advantage, plus randomly chosen dropped ones until the count divides into
    ``n_minibatches`` (the reference's ``mask`` top-up); empty when every advantage is zero."""
    nonzero = advantages != 0
    if not bool(nonzero.any()):
        return torch.zeros(0, dtype=torch.long)
    short = -int(nonzero.sum()) % n_minibatches
    if short:
        dropped = torch.nonzero(~nonzero).flatten()
        nonzero[dropped[torch.randperm(dropped.numel(), generator=generator)[:short]]] = True
    return torch.nonzero(nonzero).flatten()


class _Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def add(self, key: str, start: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - start


class GRPO:
    """What Flow-GRPO (``flow_grpo.FlowGRPO``) and G2RPO (``g2rpo.G2RPO``) share on a
    ``TextToImageEnv``: the optimiser, the sigma schedule, the EMA, SDE / ODE steps, the ratio and
    KL terms, the optimiser step with its guards, ``iterate``, ``generate`` and the resume state.

    ``GRPO(policy, env, cfg, algo=NAME, ...)`` builds the registered subclass for NAME.
    ``iterate()`` = ``collect`` (sample + reward + advantages) then ``update``; it returns log
    metrics. ``global_step`` counts scored images (P*G per Flow-GRPO iteration, P*G*M*L for
    G2RPO's branches x granularities; evaluation images are extra).
    """

    _registry: dict[str, type["GRPO"]] = {}
    name = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.name:
            GRPO._registry[cls.name] = cls

    def __new__(cls, *args: Any, algo: str = "flow-grpo", **kw: Any) -> "GRPO":
        if cls is GRPO:
            if algo not in ALGOS:
                raise ConfigError(f"unknown algo '{algo}'; valid choices: {', '.join(ALGOS)}")
            cls = GRPO._registry[algo]  # filled when genrl.algos imports flow_grpo and g2rpo
        return super().__new__(cls)

    def collect(self, timer: "_Timer") -> dict[str, Any]:
        raise NotImplementedError

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def __init__(self, policy: FlowImagePolicy, env: Any, cfg: GRPOConfig, *, algo: str = "flow-grpo", seed: int = 0, total_images: int = 1) -> None:
        algo = self.name  # a registered subclass: __new__ refused unknown names
        self.policy, self.env, self.cfg, self.algo = policy, env, cfg, algo
        g2 = algo == "g2rpo"
        self.ddof = cfg.std_ddof if cfg.std_ddof is not None else (1 if g2 else 0)
        self.eps = cfg.adv_eps if cfg.adv_eps is not None else (1e-8 if g2 else 1e-4)
        self.aggregation = cfg.reward_aggregation or ("per_reward" if g2 else "sum")
        self.m_steps = cfg.g2rpo_steps if cfg.g2rpo_steps is not None else max(1, cfg.n_steps // 2)
        self.device = env.device
        # data-parallel (genrl.distributed): prompts and initial noise from a stream every rank
        # shares, each rank's share of the images, its SDE noise from its own stream
        self.dist = replica()
        self.generator = torch.Generator(device=self.device).manual_seed(self.dist.seed(seed))
        self.shared = self.generator if self.dist.world_size == 1 else torch.Generator(device=self.device).manual_seed(seed)
        if self.dist.world_size > 1:
            self._check_shards(cfg, algo)
        if cfg.kl_coef > 0:
            policy.keep_reference()
        self.fsdp = cfg.fsdp
        if cfg.fsdp:  # FSDP2: each rank keeps 1/N of the weights, gradients and AdamW state
            if self.dist.world_size == 1:
                raise ConfigError("grpo.fsdp shards the model across processes: launch with torchrun --nproc_per_node N (N >= 2)")
            from genrl.distributed import shard_transformer

            for module in (policy.transformer, policy.reference_transformer):
                if module is not None:
                    shard_transformer(module, self.dist)
        self.params = params = policy.trainable_parameters()
        if not params:
            raise ConfigError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        self.schedule = cfg.schedule or ("shifted" if g2 and getattr(env, "flux", False) else "pipeline")
        policy.cfg_gradient = cfg.cfg_gradient
        policy.autocast = None if cfg.autocast == "off" else getattr(torch, cfg.autocast)
        if cfg.gradient_checkpointing:
            if not hasattr(policy.transformer, "enable_gradient_checkpointing"):
                raise ConfigError(f"grpo.gradient_checkpointing: {type(policy.transformer).__name__} does not support it")
            policy.transformer.enable_gradient_checkpointing()
        policy.timestep_levels = 1000 if self.schedule == "shifted" else None
        self.sigmas = self.schedule_sigmas(cfg.n_steps)
        # EMA of the trained weights (Flow-GRPO's EMAModuleWrapper), float32, outside the optimiser
        self.ema = [p.detach().clone() for p in params] if cfg.ema else None
        self.optimizer_steps = 0
        self.images_per_iter = cfg.prompts_per_iter * cfg.group_size  # scored images per iteration
        if g2:
            self.images_per_iter *= self.m_steps * len(cfg.granularities)
        self.n_iterations = max(1, -(-total_images // self.images_per_iter))
        self.iteration = 0

    def _check_shards(self, cfg: GRPOConfig, algo: str) -> None:
        w, n = self.dist.world_size, cfg.prompts_per_iter * cfg.group_size
        if algo == "g2rpo" and cfg.prompts_per_iter % w:
            raise ConfigError(f"grpo.prompts_per_iter = {cfg.prompts_per_iter} does not split into {w} processes (G2RPO shards whole prompts)")
        if algo == "flow-grpo" and (n % w or n // w < cfg.updates_per_epoch):
            raise ConfigError(f"{n} images per iteration do not split into {w} equal shards of at least grpo.updates_per_epoch = {cfg.updates_per_epoch}")
        if cfg.drop_zero_advantage:
            raise ConfigError("grpo.drop_zero_advantage runs in one process (ranks would keep different numbers of samples)")

    def _share(self, n: int) -> slice:
        """This rank's rows of ``n`` (equal consecutive shares, rank order)."""
        k = n // self.dist.world_size
        return slice(self.dist.rank * k, (self.dist.rank + 1) * k)

    def _gather(self, x: Tensor, dim: int = 0) -> Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order (one process: ``x``)."""
        if self.dist.world_size == 1:
            return x
        parts = self.dist.all_gather_rows(x.movedim(dim, 0).contiguous(), "gathering rewards")
        return torch.cat(parts).movedim(0, dim)

    @property
    def global_step(self) -> int:
        return self.iteration * self.images_per_iter

    @property
    def steps_per_iter(self) -> int:
        """The run loop's budget unit per iteration: scored images."""
        return self.images_per_iter

    def schedule_sigmas(self, num_steps: int) -> Tensor:
        """(T+1,) sigmas of the configured schedule (``GRPOConfig.schedule``)."""
        if self.schedule == "shifted":
            return shifted_sigmas(num_steps, self.cfg.schedule_shift).to(self.device)
        return self.env.sigmas(num_steps)

    def _ema_update(self) -> None:
        """Flow-GRPO's EMA step, after optimiser step n (1-based): when (n + 1) % interval == 0,
        ema += (1 - decay) (p - ema) with decay = min((1 + n) / (10 + n), ema_decay)."""
        n = self.optimizer_steps
        if self.ema is None or (n + 1) % self.cfg.ema_interval:
            return
        decay = min((1 + n) / (10 + n), self.cfg.ema_decay)
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.add_(p.detach() - e, alpha=1 - decay)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the context the policy carries the EMA weights (no-op without ``ema``)."""
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    # ------------------------------------------------------------------ sampling helpers
    def _prompts(self) -> list[str]:
        n, pool = self.cfg.prompts_per_iter, self.env.prompts
        if n <= len(pool):
            idx = torch.randperm(len(pool), generator=self.shared)[:n]
        else:
            idx = torch.randint(len(pool), (n,), generator=self.shared)
        return [pool[i] for i in idx.tolist()]

    def _step(self, x: Tensor, i: int, cond: Conditioning, eta: float, **kw: Any) -> SDEStep:
        s = self.sigmas
        return self.policy.step(x, s[i].expand(x.shape[0]), s[i + 1].expand(x.shape[0]), cond, noise_level=eta, sigma_guard=s[1], **kw)

    def _saving(self) -> contextlib.AbstractContextManager[Any]:
        """Where the training forward keeps its activations: host memory under
        ``activation_offload`` on a GPU, else where they are computed."""
        if self.cfg.activation_offload and self.device.type == "cuda":
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()

    def _ode(self, x: Tensor, cond: Conditioning, indices: list[int]) -> Tensor:
        """Deterministic Euler steps along ``indices`` of the training schedule (the last may jump)."""
        return self.policy.ode(x, self.sigmas, cond, indices)

    def _log_ratio(self, new: SDEStep, old_lp: Tensor, old_mean: Tensor) -> Tensor:
        if self.cfg.ratio == "guard":
            return guard_log_ratio(new, old_mean, old_lp)
        return new.log_prob - old_lp

    def _kl(self, new: SDEStep, x: Tensor, i: int, cond: Conditioning, velocity_rows: int | None = None) -> Tensor:
        s = self.sigmas
        with torch.no_grad(), self.policy.reference():
            ref = self._step(x, i, cond, self.cfg.noise_level)
        if velocity_rows is not None:  # G2RPO: the reference mean is shared by a group's branches
            ref_mean = ref.mean.repeat_interleave(velocity_rows, dim=0)
        else:
            ref_mean = ref.mean
        dt = (s[i + 1] - s[i]).expand(new.mean.shape[0])
        return kl_to_reference(new.mean, ref_mean, new.std, dt, self.cfg.kl)

    def _finish(self, loss: Tensor) -> float:
        bad = not torch.isfinite(loss)
        if self.dist.world_size > 1:  # every rank stops alike; then the gradient of the global batch
            bad = self.dist.any(bad)[0]
            if not bad and not self.fsdp:  # FSDP's backward already reduce-scattered the averaged gradients
                self.dist.average_grads(self.params)
        if bad:
            raise NonFiniteLossError(f"non-finite GRPO loss at iteration {self.iteration}")
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # FSDP: the norm over every rank's shards
        if not torch.isfinite(gn):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"non-finite gradient norm at iteration {self.iteration}")
        self.optimizer.step()
        check_weights(self.params, f"at iteration {self.iteration}")
        self.optimizer_steps += 1
        self._ema_update()
        return float(gn)

    # ------------------------------------------------------------------ the loop body
    def iterate(self) -> dict[str, float]:
        """One iteration: collect, update; returns metrics (rewards, losses, timings)."""
        timer = _Timer()
        start = time.perf_counter()
        self.policy.eval()
        batch = self.collect(timer)
        t0 = time.perf_counter()
        self.policy.train()
        stats = self.update(batch)
        if self.dist.world_size > 1:  # the ranks' minibatch statistics averaged
            stats = {k: float(v) for k, v in self.dist.mean_stats({k: torch.tensor(v, dtype=torch.float64) for k, v in stats.items()}).items()}
        timer.add("train", t0)
        self.iteration += 1
        total = self.env.rewards.total(batch["scores"])
        metrics: dict[str, float] = {f"reward/{k}": float(v.mean()) for k, v in batch["scores"].items()}
        metrics["reward/total"] = float(total.mean())
        metrics["reward/total_std"] = float(total.std())
        metrics.update(stats)
        elapsed = time.perf_counter() - start
        metrics.update({f"time/{k}_s": v for k, v in timer.t.items()})
        metrics["time/images_per_s"] = self.images_per_iter / elapsed
        return metrics

    # ------------------------------------------------------------------ evaluation and state
    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], num_steps: int | None = None) -> Tensor:
        """Deterministic (ODE) images for every (prompt, seed) pair, prompt-major: (len*len, C, H, W)."""
        steps = num_steps or self.cfg.eval_n_steps or self.env.defaults.num_inference_steps
        sig = self.schedule_sigmas(steps)
        cond = Conditioning(*self.env.encode([p for p in prompts for _ in seeds]))
        x = torch.cat([self.env.initial_noise(1, torch.Generator(device=self.device).manual_seed(s)) for _ in prompts for s in seeds])
        was = self.policy.training
        self.policy.eval()
        with self.ema_weights():
            x = self.policy.ode(x, sig, cond)
        self.policy.train(was)
        return self.env.decode(x)

    def state_dict(self) -> dict[str, Any]:
        """The trained weights, optimiser, streams, counters (and EMA). Under FSDP a collective:
        every rank calls it; rank 0 gets the full (unsharded, CPU) weights, optimiser state keyed
        by parameter names, and EMA, the other ranks empty ones."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.policy.transformer, options=opts)
            optimizer = get_optimizer_state_dict(self.policy.transformer, self.optimizer, options=opts)
            ema = [e.full_tensor().cpu() for e in self.ema] if self.ema is not None else None
        else:
            weights, optimizer, ema = self.policy.adapter_state_dict(), self.optimizer.state_dict(), self.ema
        out = {
            "adapter": weights,
            "optimizer": optimizer,
            "generator": self.generator.get_state(),
            **({"shared_generator": self.shared.get_state()} if self.dist.world_size > 1 else {}),
            "iteration": self.iteration,
            "optimizer_steps": self.optimizer_steps,
        }
        if ema is not None:
            out["ema"] = {f"ema.{i}": e.clone() for i, e in enumerate(ema)}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``state_dict``'s contents (under FSDP the full ones, on every rank: each keeps its shards)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.policy.transformer, state["adapter"], options=opts)
            set_optimizer_state_dict(self.policy.transformer, self.optimizer, state["optimizer"], options=opts)
        else:
            self.policy.load_adapter_state_dict(state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.dist.world_size > 1:
            self.shared.set_state(state["shared_generator"])
        self.iteration = int(state["iteration"])
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        if self.ema is not None:
            saved = state.get("ema")
            if saved is None or len(saved) != len(self.ema):
                raise ValueError("the checkpoint holds no EMA weights for this run's grpo.ema = true")
            for i, e in enumerate(self.ema):
                full = saved[f"ema.{i}"].to(e.device)
                if hasattr(e, "device_mesh"):  # FSDP: this rank's shard of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(full, e.device_mesh, e.placements)
                e.copy_(full)

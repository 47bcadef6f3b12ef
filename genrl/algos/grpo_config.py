"""The configuration of text-to-image GRPO (Flow-GRPO and G2RPO): one strict dataclass with both
algorithms' fields and their validation (``genrl.algos.grpo`` holds the shared machinery)."""

from __future__ import annotations

from dataclasses import dataclass

from genrl.errors import ConfigError

ALGOS = ("flow-grpo", "g2rpo")
CONTINUATIONS = ("official", "extended")


@dataclass(frozen=True)
class GRPOConfig:
    """Hyperparameters of Flow-GRPO and G2RPO (defaults: the papers' where they fit a CPU).

    ``None`` means "the algorithm's own default": std_ddof 0 / eps 1e-4 for Flow-GRPO, 1 / 1e-8
    for G2RPO; the model's sidecar values for guidance and resolution.
    """

    n_steps: int = 10
    """T: denoising steps while sampling for training (Flow-GRPO: 10 of the 40 inference steps)."""
    noise_level: float = 0.7
    """eta of the SDE's std_s = eta * sqrt(s / (1 - s))."""
    group_size: int = 8
    """G images per prompt."""
    prompts_per_iter: int = 4
    """P prompt groups per iteration (sampled without replacement while the set allows)."""
    # Flow-GRPO
    timestep_fraction: float = 0.99
    """Train the first int(T * fraction) steps (0.99 of 10 -> 9; the last step is skipped)."""
    sde_steps: tuple[int, ...] = ()
    """Only these step indices are stochastic and trained (MixGRPO-style); () = every step."""
    same_initial_noise: bool = False
    """One initial noise per group (G2RPO always does this)."""
    std_scope: str = "global"
    """Flow-GRPO's advantage std: "global" over the batch (released configs) or per "group"."""
    std_ddof: int | None = None
    adv_eps: float | None = None
    adv_clip: float = 5.0
    clip_coef: float = 1e-4
    kl_coef: float = 0.0
    """beta of the KL to the reference (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore; G2RPO: 0)."""
    kl: str = "flow_grpo"
    """"flow_grpo": mean (dmu)^2 / (2 std_s^2) (no |dt|); "exact": the Gaussian KL of the step."""
    ratio: str = "standard"
    """"standard" exp(lp - lp_old) or "guard" (GRPO-Guard's bias-free, step-normalised ratio)."""
    reward_aggregation: str | None = None
    """"sum" | "per_reward" | "gdpo"; default "sum" (Flow-GRPO), "per_reward" (G2RPO)."""
    n_epochs: int = 1
    """Passes over each iteration's samples."""
    updates_per_epoch: int = 1
    """Flow-GRPO: optimiser steps per pass (minibatches); G2RPO always steps once per k."""
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    finetune: str = "lora"
    lora_rank: int = 32
    lora_alpha: float = 64.0
    micro_batch: int | None = None
    """Flow-GRPO: rows per training forward; a minibatch larger than this is processed in pieces
    whose gradients accumulate into the same optimiser step (memory, not maths, changes; None:
    the whole minibatch at once). G2RPO's training forward is already one row per prompt."""
    activation_offload: bool = False
    """Keep the training forward's saved activations in (pinned) host memory until the backward
    pass needs them (``torch.autograd.graph.save_on_cpu``): GPU memory for PCIe traffic. On a CPU
    run it changes nothing."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of storing them
    (diffusers' ``enable_gradient_checkpointing``): training memory per block falls to its input,
    for about one more forward of compute. Gradients are unchanged."""
    fsdp: bool = False
    """Full fine-tuning over several processes (torchrun): shard the transformer's weights,
    gradients and AdamW state across them with torch's FSDP2 (``fully_shard``, one unit per
    transformer block), so each device holds 1/N of them plus the block being computed; for models
    whose full fine-tuning does not fit one device. Needs ``finetune = "full"``."""
    guidance_scale: float | None = None
    resolution: int | None = None
    eval_n_steps: int | None = None
    """ODE steps for evaluation and image grids (default: the model's inference steps)."""
    # G2RPO
    g2rpo_steps: int | None = None
    """|M|: optimise steps 0 .. M-1 (paper: the first half, T // 2)."""
    granularities: tuple[int, ...] = (1, 2)
    """Lambda: continuation strides (paper {1, 2, 3}; released script {1, 2})."""
    continuation: str = "official"
    """G2RPO's strided continuation: "official" (the released code's loop) or "extended"
    (evaluates the last strided sigma too); see ``continuation_indices``."""
    # both
    cfg_gradient: str = "conditional"
    """With true CFG: train only the text-conditioned branch ("conditional", Flow-GRPO's
    ``compute_log_prob`` detaches the unconditional prediction) or "both"."""
    schedule: str | None = None
    """Sigma schedule: "pipeline" (the diffusers scheduler's, with its resolution-dependent shift
    on Flux) or "shifted" (``linspace(1, 0, T+1)`` under a fixed ``schedule_shift``, the
    transformer told ``int(sigma * 1000) / 1000``: G2RPO / DanceGRPO on Flux). Default: "shifted"
    for G2RPO on a Flux model, "pipeline" otherwise."""
    schedule_shift: float = 3.0
    ema: bool = False
    """Keep an EMA of the trained weights (Flow-GRPO's ``train.ema``) and use it for evaluation
    grids and ``final/``."""
    ema_decay: float = 0.9
    """EMA decay cap: decay = min((1 + n) / (10 + n), ema_decay) at optimiser step n (Flow-GRPO)."""
    ema_interval: int = 8
    """Update the EMA when (optimiser steps + 1) % ema_interval == 0 (Flow-GRPO: 8)."""
    drop_zero_advantage: bool = False
    """Flow-GRPO: train only on images whose advantage is non-zero (groups whose rewards are all
    equal carry no signal); random dropped ones are put back to keep minibatches equal."""
    autocast: str = "off"
    """Mixed precision for the transformer's forward in sampling and training: "off", "bfloat16"
    or "float16" (``torch.autocast``; trained weights stay float32). The log-prob drift between
    sampling and training it causes is logged as ``train/onpolicy_log_ratio_max`` (max |log ratio|
    before the iteration's first optimiser step, 0 without drift)."""

    def __post_init__(self) -> None:
        checks = {
            "n_steps": self.n_steps >= 1,
            "noise_level": self.noise_level >= 0,
            "group_size": self.group_size >= 2,
            "prompts_per_iter": self.prompts_per_iter >= 1,
            "timestep_fraction": 0 < self.timestep_fraction <= 1,
            "adv_clip": self.adv_clip > 0,
            "clip_coef": self.clip_coef > 0,
            "kl_coef": self.kl_coef >= 0,
            "n_epochs": self.n_epochs >= 1,
            "updates_per_epoch": 1 <= self.updates_per_epoch <= self.group_size * self.prompts_per_iter,
            "learning_rate": self.learning_rate > 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "lora_rank": self.lora_rank >= 1,
            "granularities": len(self.granularities) >= 1 and all(g >= 1 for g in self.granularities),
            "micro_batch": self.micro_batch is None or self.micro_batch >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid grpo.{bad[0]} = {getattr(self, bad[0])!r}")
        if any(not 0 <= s < self.n_steps for s in self.sde_steps):
            raise ConfigError(f"grpo.sde_steps {self.sde_steps} must lie in [0, n_steps={self.n_steps})")
        if self.g2rpo_steps is not None and not 1 <= self.g2rpo_steps < self.n_steps:
            raise ConfigError(f"grpo.g2rpo_steps must be in [1, n_steps), got {self.g2rpo_steps}")
        for name, value, valid in (
            ("std_scope", self.std_scope, ("global", "group")),
            ("kl", self.kl, ("flow_grpo", "exact")),
            ("ratio", self.ratio, ("standard", "guard")),
            ("finetune", self.finetune, ("lora", "full")),
            ("reward_aggregation", self.reward_aggregation, (None, "sum", "per_reward", "gdpo")),
            ("continuation", self.continuation, CONTINUATIONS),
            ("cfg_gradient", self.cfg_gradient, ("conditional", "both")),
            ("schedule", self.schedule, (None, "pipeline", "shifted")),
            ("autocast", self.autocast, ("off", "bfloat16", "float16")),
        ):
            if value not in valid:
                raise ConfigError(f"invalid grpo.{name} = {value!r}; valid: {', '.join(str(v) for v in valid)}")
        if self.fsdp and self.finetune != "full":
            raise ConfigError("grpo.fsdp shards full fine-tuning: set grpo.finetune = 'full' (LoRA adapters are small enough to replicate)")
        if self.noise_level == 0:
            raise ConfigError("grpo.noise_level must be > 0: GRPO needs stochastic steps")
        if not self.schedule_shift > 0:
            raise ConfigError(f"invalid grpo.schedule_shift = {self.schedule_shift!r} (must be > 0)")
        if not 0 <= self.ema_decay < 1 or self.ema_interval < 1:
            raise ConfigError(f"invalid grpo.ema_decay / ema_interval = {self.ema_decay} / {self.ema_interval}")

"""Named presets: each method's paper / reference-code settings, one switch away.

A preset is a partial run configuration (the same nested keys as a config file). ``--preset NAME``
(or ``preset = "NAME"`` in a config file) lays it under the user's own values, so a config file
or ``--set`` still overrides any of it, and the run's ``config.json`` records the name and every
resolved value. ``paper`` picks the preset of the run's policy family (control) or algorithm
(text-to-image). ``genrl presets`` prints them all.

genrl's own defaults stay what trains best at the small budgets of a laptop (README, "Presets");
the presets are what each method's authors ran. Values a method's code sets but genrl cannot
express (a separate critic learning rate, Brax's minibatch geometry) are listed in the README's
table of remaining differences, not silently approximated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genrl.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    source: str
    """Where the values come from (repository and file of the reference code, or the paper)."""
    family: str | None = None
    """The policy family it is for (control presets), or None (any family)."""
    algo: str | None = None
    """The algorithm it is for: a text-to-image algorithm, a control one ("sac"), or None (PPO)."""
    values: dict[str, Any] = field(default_factory=dict)
    paper: bool = True
    """Whether ``--preset paper`` may pick it (False: a peer library's defaults, not a paper's)."""


_PRESETS = (
    Preset(
        "policyflow",
        "PolicyFlow's PPO (PolicyFlowCfgInstance): KL-adaptive lr, AdamW, 4 x 5 minibatch epochs",
        "PolicyFlow code (PolicyFlowCfgInstance; fork HarriWxy/PolicyFlow_srb), arXiv 2602.01156",
        family="policyflow",
        values={
            "ppo": {
                "learning_rate": 1e-4,
                "anneal_lr": False,
                "desired_kl": 0.01,
                "kl_adapt_every": "epoch",
                "n_minibatches": 4,
                "n_epochs": 5,
                "gamma": 0.99,
                "gae_lambda": 0.95,
                "clip_coef": 0.2,
                "clip_vloss": True,
                "vf_clip_mode": "clipped",
                "vf_coef": 2.0,
                "ent_coef": 0.01,
                "max_grad_norm": 1.0,
                "norm_adv_scope": "batch",
                "optimizer": "adamw",
                "weight_decay": 1e-5,
            },
            "policy_config": {"brownian_coef": 0.01, "n_steps": 10, "method": "midpoint"},
        },
    ),
    Preset(
        "fpo",
        "FPO's official MuJoCo Playground settings: clip 0.05, eps-supervised mean CFM loss, 4 x 32 net",
        "akanazawa/fpo playground/src/flow_policy/fpo.py and its Brax PPO config",
        family="fpo",
        values={
            "ppo": {
                "clip_coef": 0.05,
                "learning_rate": 3e-4,
                "anneal_lr": False,
                "ent_coef": 0.0,
                "vf_coef": 0.5,
                "gamma": 0.995,
                "gae_lambda": 0.95,
                "n_minibatches": 32,
                "n_epochs": 16,
                "max_grad_norm": float("inf"),
                "critic_hidden": [256, 256, 256, 256, 256],
                "critic_activation": "silu",
            },
            "env": {"normalize_reward": False, "reward_scale": 10.0},
            "policy_config": {
                "n_mc": 8,
                "n_steps": 10,
                "t_sampling": "grid",
                "ratio_mode": "average",
                "loss_weighting": "eps",
                "loss_reduction": "mean",
                "hidden_sizes": [32, 32, 32, 32],
                "activation": "silu",
                "embed_dim": 8,
                "output_scale": 0.25,
                "exploration_noise": 0.0,
            },
        },
    ),
    Preset(
        "dppo",
        "DPPO's gym fine-tuning settings: K = 20 with the last 10 fine-tuned, clip 0.01, mean log-probs in [-5, 2]",
        "irom-lab/dppo cfg/gym/finetune/hopper-v2/ft_ppo_diffusion_mlp.yaml, model/diffusion/diffusion_ppo.py",
        family="diffusion",
        values={
            "ppo": {
                "learning_rate": 1e-4,
                "anneal_lr": False,
                "optimizer": "adamw",
                "n_epochs": 5,
                "vf_coef": 0.5,
                "ent_coef": 0.0,
                "target_kl": 1.0,
                "max_grad_norm": float("inf"),
                "clip_coef": 0.01,
                "clip_coef_final": 0.01,
                "clip_rate": 3.0,
                "denoising_gamma": 0.99,
            },
            "policy_config": {
                "n_denoising_steps": 20,
                "ft_denoising_steps": 10,
                "logprob_reduction": "mean",
                "logprob_clamp": [-5.0, 2.0],
                "min_sampling_std": 0.1,
                "min_logprob_std": 0.1,
                "noise_clamp": 3.0,
            },
        },
    ),
    Preset(
        "gorl",
        "GoRL's paper / code settings: Brax PPO (lr 1e-3, 16 epochs, gamma 0.995, reward x10), clip 0.15 -> 0.3",
        "GoRL paper App. E (arXiv 2512.02581) and bennidict23/GoRL",
        family="gorl",
        values={
            "ppo": {
                "learning_rate": 1e-3,
                "anneal_lr": False,
                "gamma": 0.995,
                "gae_lambda": 0.95,
                "vf_coef": 0.5,
                "ent_coef": 0.01,
                "n_minibatches": 32,
                "n_epochs": 16,
                "critic_hidden": [256, 256, 256, 256, 256],
                "critic_activation": "silu",
                "stage_clip_coefs": [0.15, 0.3, 0.3, 0.3],
                "stage_max_grad_norms": [0.5, 1.0, 1.0, 1.0],
            },
            "env": {"normalize_reward": False, "reward_scale": 10.0},
            "policy_config": {
                "encoder_hidden": [32, 32, 32, 32],
                "encoder_activation": "silu",
                "decoder_hidden": [64, 64, 64, 64],
                "decoder_activation": "silu",
                "decoder_steps": 10,
                "decoder_pairs": 8,
                "latent_reg": "kl",
            },
        },
    ),
    Preset(
        "pmoe",
        "PMOE-PPO (co-author script): K = 5 experts, clipped value loss",
        "quantumiracle/Popular-RL-Algorithms pmoe_ppo.py; JieRen98/rlkit-pmoe",
        family="pmoe",
        values={
            "ppo": {"clip_coef": 0.2, "clip_vloss": True, "learning_rate": 3e-4, "max_grad_norm": 0.5, "n_epochs": 10},
            "policy_config": {"n_experts": 5, "estimator": "pmoe", "mixing_input": "obs", "hidden_sizes": [64, 64]},
        },
    ),
    Preset(
        "flow-grpo",
        "Flow-GRPO's SD3 recipe: 10 SDE steps (9 trained), G = 24, beta 0.04, LoRA 32/64 with EMA, zero-advantage filter",
        "yifan123/flow_grpo config/grpo.py (SD3 GenEval) and scripts/train_sd3.py",
        algo="flow-grpo",
        values={
            "grpo": {
                "n_steps": 10,
                "eval_n_steps": 40,
                "noise_level": 0.7,
                "group_size": 24,
                "timestep_fraction": 0.99,
                "std_scope": "global",
                "adv_clip": 5.0,
                "clip_coef": 1e-4,
                "kl_coef": 0.04,
                "kl": "flow_grpo",
                "learning_rate": 3e-4,
                "weight_decay": 1e-4,
                "max_grad_norm": 1.0,
                "updates_per_epoch": 2,
                "n_epochs": 1,
                "lora_rank": 32,
                "lora_alpha": 64.0,
                "ema": True,
                "ema_decay": 0.9,
                "ema_interval": 8,
                "drop_zero_advantage": True,
                "cfg_gradient": "conditional",
                "guidance_scale": 4.5,
            },
        },
    ),
    Preset(
        "g2rpo",
        "G2RPO's released script: T = 16, G = 12, first 8 steps, strides {1, 2}, full fine-tuning at lr 2e-6",
        "bcmi/Granular-GRPO fastvideo/train_g2rpo_hps.py, scripts/finetune/finetune_g2rpo_hps.sh",
        algo="g2rpo",
        values={
            "grpo": {
                "n_steps": 16,
                "noise_level": 0.7,
                "group_size": 12,
                "prompts_per_iter": 1,
                "g2rpo_steps": 8,
                "granularities": [1, 2],
                "continuation": "official",
                "adv_clip": 5.0,
                "clip_coef": 1e-4,
                "kl_coef": 0.0,
                "learning_rate": 2e-6,
                "weight_decay": 1e-4,
                "max_grad_norm": 1.0,
                "finetune": "full",
                "schedule_shift": 3.0,
            },
        },
    ),
)

_POLICYFLOW_PPO = _PRESETS[0].values["ppo"]

_PRESETS += (
    Preset(
        "policyflow-multigoal",
        "PolicyFlow's MultiGoal run: 4096 torch-native envs x 32 steps, w_b 0.25, w_g 0.001, lr 2e-4, [256, 128, 64] Mish",
        "PolicyFlow scripts/multigoal (design notes, algorithms.md 3.5), arXiv 2602.01156",
        family="policyflow",
        values={
            "env": {"env_id": "genrl/MultiGoal-v0", "n_envs": 4096, "backend": "torch"},
            "ppo": {**_POLICYFLOW_PPO, "learning_rate": 2e-4, "ent_coef": 0.001, "n_steps": 32},
            "policy_config": {"brownian_coef": 0.25, "hidden_sizes": [256, 128, 64], "activation": "mish", "embed_dim": 64, "n_steps": 10},
        },
    ),
    Preset(
        "many-envs",
        "Brax / MuJoCo Playground-style PPO for thousands of batched envs: 4096 envs x 16 steps, 4 large minibatches, 4 epochs",
        "Brax PPO defaults (num_minibatches, unroll_length) as MuJoCo Playground's locomotion configs use them",
        values={
            "env": {"n_envs": 4096},
            "ppo": {"n_steps": 16, "n_minibatches": 4, "n_epochs": 4, "norm_adv_scope": "batch"},
        },
    ),
)

_SAC_COMMON = {"batch_size": 256, "gamma": 0.99, "tau": 0.005, "policy_lr": 3e-4, "q_lr": 3e-4, "policy_frequency": 1,
               "target_network_frequency": 1, "buffer_size": 1_000_000, "utd_ratio": 1.0, "alpha": "auto"}  # fmt: skip

_PRESETS += (
    Preset(
        "sb3-sac",
        "Stable-Baselines3's SAC defaults: lr 3e-4 for actor, critics and temperature, actor every step, learning starts 100",
        "DLR-RM/stable-baselines3 sac/sac.py (SAC.__init__ defaults) and its MlpPolicy net_arch [256, 256]",
        family="gaussian",
        algo="sac",
        values={"algo_config": {**_SAC_COMMON, "learning_starts": 100}, "policy_config": {"hidden_sizes": [256, 256], "activation": "relu"}},
        paper=False,
    ),
    Preset(
        "pmoe-sac",
        "PMOE-SAC's official example: K = 4 tanh-Gaussian experts, [256, 256], lr 3e-4, 1000 random steps first",
        "JieRen98/rlkit-pmoe examples/PMOEsac.py and rlkit/torch/PMOEsac (design notes, algorithms.md 6.2)",
        family="pmoe",
        algo="sac",
        values={
            "algo_config": {**_SAC_COMMON, "learning_starts": 1000},
            "policy_config": {"n_experts": 4, "hidden_sizes": [256, 256], "activation": "relu", "estimator": "pmoe", "mixing_input": "features"},
        },
    ),
    Preset(
        "gorl-sac",
        "GoRL(SAC+Diffusion), the paper's off-policy variant: stages 2M / 1M / 1M of a 4M-step run, lr 3e-4, batch 256, UTD 20, twin critics",
        "GoRL paper (arXiv 2512.02581) section 2.6 of the design notes, algorithms.md; SAC around the latent encoder (genrl.algos.gorl_sac)",
        family="gorl",
        algo="sac",
        values={
            "algo_config": {**_SAC_COMMON, "utd_ratio": 20.0},
            "gorl": {"stage_fractions": [0.5, 0.25, 0.25]},
            "policy_config": {"decoder": "diffusion"},
        },
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def resolve_preset(name: str, data: dict[str, Any]) -> Preset:
    """The preset called ``name`` ("paper": the one of the run's family or algorithm), checked
    against the run's family / algorithm."""
    from genrl.algos.grpo import ALGOS as IMAGE_ALGOS

    image = data.get("algo") in IMAGE_ALGOS
    algo = data.get("algo", "ppo")
    policy = data.get("policy", "gaussian")

    def fits(p: Preset) -> bool:
        if image:
            return p.algo == algo
        return p.algo not in IMAGE_ALGOS and (p.algo or "ppo") == algo and p.family in (None, policy)

    if name == "paper":
        match = [p for p in _PRESETS if p.paper and (image or p.family is not None) and fits(p)]
        if not match:
            what = f"algo '{algo}'" if image else (f"policy '{policy}'" if algo == "ppo" else f"--algo {algo} --policy {policy}")
            raise ConfigError(f"no paper preset for {what}; presets: {', '.join(PRESETS)}")
        return match[0]
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, [*PRESETS, "paper"], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} valid: paper, {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if preset.algo in IMAGE_ALGOS:
        if not image or algo != preset.algo:
            raise ConfigError(f"preset '{name}' is for --env t2i --algo {preset.algo}")
        return preset
    if image:
        raise ConfigError(f"preset '{name}' is for control runs, not --env t2i")
    wanted = ("--algo " + preset.algo + " " if preset.algo else "") + (f"--policy {preset.family}" if preset.family else "")
    if (preset.algo or "ppo") != algo:
        raise ConfigError(f"preset '{name}' is for {wanted.strip() or '--algo ppo'}, not --algo {algo}")
    if preset.family is not None and policy != preset.family:
        raise ConfigError(f"preset '{name}' is for {wanted.strip()}, not --policy {policy}")
    return preset


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys: {"ppo": {"clip_coef": 0.2}} -> {"ppo.clip_coef": 0.2}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe(preset: Preset) -> str:
    """The preset in full, one ``key = value`` per line (``genrl presets``)."""
    target = f"--policy {preset.family}" if preset.family else f"--env t2i --algo {preset.algo}" if preset.algo else "any control run"
    lines = [f"{preset.name}  ({target})", f"  {preset.summary}", f"  source: {preset.source}"]
    lines += [f"  {k} = {v!r}" for k, v in flatten(preset.values).items()]
    return "\n".join(lines)

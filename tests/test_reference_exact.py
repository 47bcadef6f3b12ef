"""genrl against transcriptions of the methods' reference code, where it once departed.

Each test names its source. Values and gradients are compared on random inputs and edge cases.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from genrl.algos.grpo import GRPO, GRPOConfig, continuation_indices, kept_samples, shifted_sigmas
from genrl_policies.pmoe import PMOEConfig, PMOEPolicy
from genrl_policies.t2i import Conditioning, FlowImagePolicy, LoraSpec


# -- Flow-GRPO under true CFG: only the text-conditioned branch is trained ----------------------
def _grads(policy: FlowImagePolicy, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, w: torch.Tensor) -> list[torch.Tensor]:
    params = policy.trainable_parameters()
    return list(torch.autograd.grad((policy.velocity(x, sigma, cond) * w).sum(), params))


def _check_cfg_gradients(policy: FlowImagePolicy, x: torch.Tensor, cond: Conditioning) -> None:
    g = policy.guidance_scale
    assert g > 1
    sigma = torch.full((x.shape[0],), 0.6)
    w = torch.randn_like(x)
    negative = Conditioning(cond.negative_prompt_embeds, cond.negative_pooled)  # type: ignore[arg-type]
    policy.guidance_scale = 1.0  # one branch at a time
    text = _grads(policy, x, sigma, Conditioning(cond.prompt_embeds, cond.pooled), w)
    uncond = _grads(policy, x, sigma, negative, w)
    policy.guidance_scale = g
    policy.cfg_gradient = "conditional"  # flow_grpo scripts/train_sd3.py compute_log_prob @ac4c86e:
    conditional = _grads(policy, x, sigma, cond, w)  # noise_pred_uncond = noise_pred_uncond.detach()
    policy.cfg_gradient = "both"
    both = _grads(policy, x, sigma, cond, w)
    assert any(t.abs().sum() > 0 for t in text)
    for c, b, t, u in zip(conditional, both, text, uncond):
        torch.testing.assert_close(c, g * t, rtol=1e-3, atol=2e-5)  # d/dtheta [u.detach() + g (t - u.detach())] = g dt
        torch.testing.assert_close(b, g * t + (1 - g) * u, rtol=1e-3, atol=2e-5)
    assert any(not torch.allclose(c, b) for c, b in zip(conditional, both))


def test_sd3_cfg_trains_only_the_conditional_branch(tmp_path: Path) -> None:
    from genrl_envs.digits import build_digits_pipeline
    from genrl_envs.t2i import TextToImageEnv

    path = tmp_path / "pipe"
    build_digits_pipeline(seed=0, num_layers=1).save_pretrained(str(path))
    side = {"resolution": 8, "max_sequence_length": 0, "guidance_scale": 4.5, "num_inference_steps": 4, "prompts": "digits"}
    (path / "genrl_t2i.json").write_text(json.dumps(side))
    env = TextToImageEnv(path, rewards="brightness")
    policy = FlowImagePolicy(env.transformer, guidance_scale=4.5, lora=LoraSpec(rank=4, alpha=8))
    with torch.no_grad():  # B of LoRA starts at zero: move it so both A and B get gradients
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    cond = Conditioning(*env.encode(["a handwritten 3", "a handwritten 7"]))
    _check_cfg_gradients(policy, env.initial_noise(2, torch.Generator().manual_seed(1)), cond)


def test_flux_true_cfg_trains_only_the_conditional_branch(tmp_path: Path) -> None:
    from test_t2i_pipelines import build_tiny_flux

    from genrl_envs.t2i import TextToImageEnv

    env = TextToImageEnv(build_tiny_flux(tmp_path, guidance_embeds=False), rewards="brightness")
    assert env.true_cfg
    policy = FlowImagePolicy(env.transformer, guidance_scale=env.guidance_scale, finetune="full")
    cond = Conditioning(*env.encode(["a handwritten 1"]))
    _check_cfg_gradients(policy, env.initial_noise(1, torch.Generator().manual_seed(2)), cond)


# -- G2RPO's granular continuation (bcmi/Granular-GRPO fastvideo/train_g2rpo_hps.py) --------------
def official_continuation(velocity, x: torch.Tensor, sigmas: torch.Tensor, k: int, g: int) -> torch.Tensor:
    """Transcription: prefix = sigmas[:k+2]; suffix = sigmas[k+2::g]; ODE over range(k+1, len-1);
    the decoded image is the x0-prediction of the last iteration."""
    schedule = torch.cat((sigmas[: k + 2], sigmas[k + 2 :: g]))
    pred_original = x
    for i in range(k + 1, len(schedule) - 1):
        v = velocity(x, schedule[i])
        pred_original = x - schedule[i] * v
        x = x + (schedule[i + 1] - schedule[i]) * v
    return pred_original


def toy_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.tanh(1.3 * x + 0.7) * (0.5 + sigma) - 0.2 * x.square()


@pytest.mark.parametrize("T", [10, 16])
def test_g2rpo_continuation_matches_the_official_loop(T: int) -> None:
    sigmas = shifted_sigmas(T, 3.0)
    stub = SimpleNamespace(velocity=lambda x, s, cond: toy_velocity(x, s[0]))  # FlowImagePolicy.ode on a toy field
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    skipped = 0
    for lam in (1, 2, 3):
        for k in range(T - 1):
            idx = continuation_indices(k, lam, T)
            ref = official_continuation(toy_velocity, x, sigmas.double(), k, lam)
            got = FlowImagePolicy.ode(stub, x, sigmas.double(), None, idx)  # type: ignore[arg-type]
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
            if (T - (k + 2)) % lam:  # the stride skips sigma = 0
                skipped += 1
                assert idx != continuation_indices(k, lam, T, "extended")
    assert skipped > 0
    # the cases the reference's loop changes: T = 16, lambda = 2, every odd k
    assert continuation_indices(1, 2, 16) == [2, 3, 5, 7, 9, 11, 13, 16]
    assert continuation_indices(1, 2, 16, "extended") == [2, 3, 5, 7, 9, 11, 13, 15, 16]
    assert continuation_indices(0, 2, 16) == [1, 2, 4, 6, 8, 10, 12, 14, 16]


def test_g2rpo_flux_schedule_and_timesteps_match_the_official_script(tmp_path: Path) -> None:
    # train_g2rpo_hps.py: sigma_schedule = sd3_time_shift(3, linspace(1, 0, T+1)); timesteps int(sigma*1000)/1000
    t = torch.linspace(1, 0, 17)
    torch.testing.assert_close(shifted_sigmas(16, 3.0), 3.0 * t / (1 + 2.0 * t), rtol=0, atol=0)
    stub = SimpleNamespace(timestep_levels=1000)
    sig = shifted_sigmas(16, 3.0)
    ref = torch.tensor([int(s * 1000) / 1000 for s in sig], dtype=torch.float32)
    assert torch.equal(FlowImagePolicy.model_sigma(stub, sig), ref)  # type: ignore[arg-type]
    from test_t2i_pipelines import build_tiny_flux

    from genrl_envs.t2i import TextToImageEnv

    env = TextToImageEnv(build_tiny_flux(tmp_path, guidance_embeds=True), rewards="brightness")
    policy = FlowImagePolicy(env.transformer, guidance_scale=env.guidance_scale, lora=LoraSpec(rank=2, alpha=4))
    g2 = GRPO(policy, env, GRPOConfig(n_steps=16, group_size=2, prompts_per_iter=1), algo="g2rpo", total_images=8)
    assert g2.schedule == "shifted" and policy.timestep_levels == 1000
    assert torch.equal(g2.sigmas, sig)
    fg = GRPO(policy, env, GRPOConfig(n_steps=16, group_size=2, prompts_per_iter=1), algo="flow-grpo", total_images=8)
    assert fg.schedule == "pipeline" and policy.timestep_levels is None
    assert torch.equal(fg.sigmas, env.sigmas(16))


# -- PMOE's mixing-weight loss (JieRen98/rlkit-pmoe PMOEsac.py L122; pmoe_ppo.py) ----------------
@pytest.mark.parametrize("k", [1, 5])
def test_pmoe_mixing_loss_is_the_references_mse(k: int) -> None:
    torch.manual_seed(0)
    policy = PMOEPolicy(3, 2, PMOEConfig(n_experts=k, mixing_input="features")).double()
    obs = torch.randn(64, 3, dtype=torch.float64)
    loss = policy.mixing_loss(obs, generator=torch.Generator().manual_seed(4))
    # the transcription draws the same per-expert samples and scores them with the same Q
    log_alpha, means, log_std = policy.mixture(obs)
    noise = torch.randn(means.shape, generator=torch.Generator().manual_seed(4), dtype=means.dtype)
    with torch.no_grad():
        best_index = policy.q_value(obs, (means + noise * log_std.exp()).detach()).argmax(-1)
    ref = F.mse_loss(F.one_hot(best_index, k).double(), log_alpha.exp())  # mixing_coefficient_loss
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    head = list(policy.mixing_head.parameters())
    for a, b in zip(torch.autograd.grad(loss, head), torch.autograd.grad(ref, head)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# -- Flow-GRPO's zero-advantage filter (scripts/train_sd3.py, the mask top-up) -------------------
def test_zero_advantage_filter_keeps_nonzero_and_tops_up_to_whole_minibatches() -> None:
    adv = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    keep = kept_samples(adv, 2, torch.Generator().manual_seed(0))
    assert set([1, 2, 5]) <= set(keep.tolist()) and keep.numel() == 4
    assert kept_samples(adv, 1, torch.Generator()).tolist() == [1, 2, 5]
    assert kept_samples(torch.zeros(6), 2, torch.Generator()).numel() == 0


def test_ema_follows_flow_grpo_decay_and_interval() -> None:
    algo = GRPO.__new__(GRPO)
    p = torch.nn.Parameter(torch.zeros(3))
    algo.params, algo.cfg = [p], GRPOConfig(ema=True, ema_decay=0.9, ema_interval=8)
    algo.ema = [p.detach().clone()]
    ref = torch.zeros(3, dtype=torch.float64)
    for n in range(1, 40):  # optimiser steps done so far
        with torch.no_grad():
            p.fill_(float(n))
        algo.optimizer_steps = n
        algo._ema_update()
        if (n + 1) % 8 == 0:  # EMAModuleWrapper(decay=0.9, update_step_interval=8)
            decay = min((1 + n) / (10 + n), 0.9)
            ref += (1 - decay) * (float(n) - ref)
        torch.testing.assert_close(algo.ema[0].double(), ref, rtol=1e-6, atol=1e-6)
    with algo.ema_weights():
        assert torch.equal(p.detach(), algo.ema[0])
    assert torch.equal(p.detach(), torch.full((3,), 39.0))


def test_shifted_schedule_is_monotone_and_ends_at_zero() -> None:
    s = shifted_sigmas(10, 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    assert math.isclose(float(shifted_sigmas(2, 1.0)[1]), 0.5)


# -- presets: every value the README lists is what building the preset gives --------------------
def readme_preset_rows() -> list[tuple[str, str, object]]:
    import re

    import tomllib

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| ([a-z0-9-]+) \| `--[^`]*` \| `([^`]+)` \| `([^`]+)` \|$", text, flags=re.M)
    return [(name, key, tomllib.loads(f"v = {value}")["v"]) for name, key, value in rows]


def test_every_preset_builds_the_values_the_readme_lists() -> None:
    from genrl.config import config_from_dict
    from genrl.presets import PRESETS, flatten

    rows = readme_preset_rows()
    assert {r[0] for r in rows} == set(PRESETS)
    for name, preset in PRESETS.items():
        assert {k: v for n, k, v in rows if n == name} == flatten(preset.values)  # the table is complete
    for name, key, value in rows:
        preset = PRESETS[name]
        image = preset.algo in ("flow-grpo", "g2rpo")
        base = {"env": "t2i", "algo": preset.algo} if image else {"algo": preset.algo or "ppo", "policy": preset.family or "gaussian"}
        cfg = config_from_dict({**base, "preset": name})
        assert cfg.preset == name
        section, field = key.split(".", 1)
        if section == "policy_config":
            got = getattr(cfg.policy_config_object(), field)
        elif section == "algo_config":
            got = getattr(cfg.algo_config_object(), field)
        else:
            got = getattr(getattr(cfg, section), field)
        expected = tuple(value) if isinstance(value, list) else value
        assert got == expected, (name, key, got, expected)


def test_presets_layer_under_user_values_and_resolve_paper() -> None:
    from genrl.config import config_from_dict
    from genrl.errors import ConfigError

    cfg = config_from_dict({"policy": "fpo", "preset": "paper", "ppo": {"clip_coef": 0.1}})
    assert cfg.preset == "fpo" and cfg.ppo.clip_coef == 0.1 and cfg.ppo.n_epochs == 16
    assert config_from_dict({"env": "t2i", "algo": "g2rpo", "preset": "paper"}).grpo.n_steps == 16
    for data, msg in (
        ({"policy": "gaussian", "preset": "paper"}, "no paper preset"),
        ({"policy": "gaussian", "preset": "fpo"}, "is for --policy fpo"),
        ({"policy": "fpo", "preset": "fop"}, "did you mean 'fpo'"),
    ):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(data)


def test_preset_run_records_and_resumes_its_values(tmp_path: Path) -> None:
    from genrl import cli
    from genrl.trainer import load_run_config

    out = tmp_path / "run"
    argv = ["train", "--env", "Pendulum-v1", "--policy", "policyflow", "--preset", "paper", "--steps", "256", "--out", str(out),
            "--set", "ppo.n_steps=128", "--set", "policy_config.hidden_sizes=[16]", "--eval-episodes", "1", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    cfg = load_run_config(out)
    assert cfg.preset == "policyflow" and cfg.ppo.desired_kl == 0.01 and cfg.ppo.optimizer == "adamw"
    assert json.loads((out / "config.json").read_text())["ppo"]["weight_decay"] == 1e-5


# -- KL-adaptive learning rate (RSL-RL rsl_rl/algorithms/ppo.py) --------------------------------
def test_adaptive_lr_rule() -> None:
    from genrl.algos.ppo import adaptive_lr

    assert adaptive_lr(1e-3, 0.05, 0.01, 1e-5, 1e-2) == 1e-3 / 1.5  # kl > 2 desired: lower
    assert adaptive_lr(1e-3, 0.001, 0.01, 1e-5, 1e-2) == 1e-3 * 1.5  # 0 < kl < desired / 2: raise
    assert adaptive_lr(1e-3, 0.01, 0.01, 1e-5, 1e-2) == 1e-3  # in the band: keep
    assert adaptive_lr(1e-3, 0.0, 0.01, 1e-5, 1e-2) == 1e-3  # kl exactly 0 (first minibatch): keep
    assert adaptive_lr(1.1e-5, 1.0, 0.01, 1e-5, 1e-2) == 1e-5  # clamped below
    assert adaptive_lr(9e-3, 1e-4, 0.01, 1e-5, 1e-2) == 1e-2  # clamped above


@pytest.mark.parametrize("every", ["minibatch", "epoch"])
def test_adaptive_lr_moves_the_optimiser_lr_with_the_measured_kl(every: str) -> None:
    from genrl.algos.ppo import PPO, PPOConfig
    from genrl_envs import make_env
    from genrl_policies.gaussian import GaussianPolicy

    lrs = {}
    for desired in (1e-9, 1e3):  # every KL is far above / far below the target
        env = make_env("Pendulum-v1", 1)
        cfg = PPOConfig(n_steps=64, n_minibatches=4, n_epochs=2, anneal_lr=False, desired_kl=desired, kl_adapt_every=every)
        algo = PPO(GaussianPolicy(3, 1), env, cfg, total_steps=64, seed=0)
        algo.iterate()
        env.close()
        lrs[desired] = algo.optimizer.param_groups[0]["lr"]
    # 8 minibatches, the first of which is exactly on-policy (KL 0: RSL-RL keeps the lr); 2 epochs
    steps = 7 if every == "minibatch" else 2
    assert math.isclose(lrs[1e-9], max(1e-5, 3e-4 / 1.5**steps), rel_tol=1e-9)
    assert math.isclose(lrs[1e3], min(1e-2, 3e-4 * 1.5**steps), rel_tol=1e-9)


def test_new_ppo_options_are_validated() -> None:
    from genrl.algos.ppo import PPOConfig
    from genrl.errors import ConfigError

    with pytest.raises(ConfigError, match="anneal_lr"):
        PPOConfig(desired_kl=0.01)
    with pytest.raises(ConfigError, match="adamw"):
        PPOConfig(weight_decay=1e-4)
    with pytest.raises(ConfigError, match="vf_clip_mode"):
        PPOConfig(vf_clip_mode="min")


def test_sac_presets_key_on_the_control_algorithm() -> None:
    from genrl.config import config_from_dict
    from genrl.errors import ConfigError

    cfg = config_from_dict({"algo": "sac", "policy": "pmoe", "preset": "paper", "env": {"env_id": "Pendulum-v1"}})
    assert cfg.preset == "pmoe-sac" and cfg.algo_config_object().learning_starts == 1000 and cfg.policy_config_object().n_experts == 4
    cfg = config_from_dict({"algo": "sac", "preset": "sb3-sac", "algo_config": {"batch_size": 64}})
    assert cfg.algo_config_object().policy_frequency == 1 and cfg.algo_config_object().batch_size == 64  # the user's value wins
    assert config_from_dict({"policy": "pmoe", "preset": "paper"}).preset == "pmoe"  # PPO keeps its own paper preset
    for data, msg in (
        ({"algo": "sac", "preset": "paper"}, "no paper preset for --algo sac --policy gaussian"),
        ({"preset": "sb3-sac"}, "is for --algo sac --policy gaussian, not --algo ppo"),
        ({"algo": "sac", "policy": "fpo", "preset": "fpo"}, "is for --policy fpo, not --algo sac"),
        ({"algo": "sac", "policy": "pmoe", "preset": "sb3-sac"}, "not --policy pmoe"),
    ):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(data)

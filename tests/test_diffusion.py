"""DPPO-style diffusion policy (policies.diffusion): per-step log-probs, schedules, frozen base."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

from genrl_policies.base import load_pretrained
from genrl_policies.diffusion import DiffusionConfig, DiffusionPolicy, DiffusionRecord, cosine_beta_schedule

OBS, ACT, B, K = 4, 2, 5, 6
TINY = dict(hidden_sizes=(16, 16), embed_dim=8, n_denoising_steps=K)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> DiffusionPolicy:
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in dtype: the schedule buffers are not float32-rounded
    try:
        policy = DiffusionPolicy(OBS, ACT, DiffusionConfig(**{**TINY, **kw}))
    finally:
        torch.set_default_dtype(default)
    perturb_(policy, seed + 100, 0.3)  # move off the zero last layer (eps = 0 at init)
    return policy


def perturb_(module: torch.nn.Module, seed: int, scale: float) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def observations(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(B, OBS, generator=gen(1), dtype=dtype)


def reference_step_log_probs(policy: DiffusionPolicy, obs: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """Each fine-tuned step scored on its own with torch.distributions: (B, K')."""
    cfg, n_ft = policy.config, policy.n_ft
    betas = cosine_beta_schedule(cfg.n_denoising_steps)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    std = (betas * (1 - abar_prev) / (1 - abar)).clamp(min=1e-20).sqrt()
    out = []
    for i in range(n_ft):
        k = n_ft - 1 - i
        x = chain[:, i]
        eps = policy.net(x, torch.full((B,), k / cfg.n_denoising_steps, dtype=x.dtype), obs)
        x0 = ((x - (1 - abar[k]).sqrt() * eps) / abar[k].sqrt()).clamp(-1, 1)  # denoised_clip = 1
        mean = (betas[k] * abar_prev[k].sqrt() * x0 + (1 - abar_prev[k]) * (1 - betas[k]).sqrt() * x) / (1 - abar[k])
        out.append(Normal(mean, std[k].clamp(min=cfg.min_logprob_std)).log_prob(chain[:, i + 1]).sum(-1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("ft", [None, 3])
def test_chain_log_prob_is_sum_of_per_step_gaussians(ft: int | None) -> None:
    policy, obs = make(ft_denoising_steps=ft), observations()
    _, record = policy.act(obs, generator=gen(2))
    expected = reference_step_log_probs(policy, obs, record.chain)
    torch.testing.assert_close(record.log_prob, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(policy.chain_log_prob(obs, record), expected.sum(-1), rtol=1e-12, atol=1e-12)


def test_log_probs_use_std_floor() -> None:
    policy = make(min_logprob_std=0.2, min_sampling_std=0.05)
    assert (policy.logprob_std >= 0.2).all() and (policy.sampling_std >= 0.05).all()
    # k = 0 has zero posterior variance: both floors are hit there
    assert policy.logprob_std[0] == 0.2 and policy.sampling_std[0] == 0.05
    # a chain step exactly at the mean has log-prob -A (log std + log sqrt(2 pi)) with std >= 0.2
    obs = observations()
    _, record = policy.act(obs, deterministic=True)
    bound = -ACT * (math.log(0.2) + 0.5 * math.log(2 * math.pi))
    assert (record.log_prob <= bound + 1e-12).all()
    torch.testing.assert_close(record.log_prob[:, -1], torch.full((B,), bound, dtype=torch.float64))


def test_mean_reduction_and_logprob_clamp() -> None:
    obs = observations()
    base = make()
    _, record = base.act(obs, generator=gen(3))
    mean = make(logprob_reduction="mean")
    torch.testing.assert_close(mean.step_log_probs(obs, record.chain), record.log_prob / ACT, rtol=1e-12, atol=0)
    clamped = make(logprob_clamp=(-1.0, 0.5))
    lp = clamped.step_log_probs(obs, record.chain)
    assert (lp <= ACT * 0.5).all() and (lp >= -ACT * 1.0).all()
    assert clamped.config.logprob_clamp == (-1.0, 0.5)


@pytest.mark.parametrize("n", [10, 1, 4])
def test_denoising_discount_and_clip_schedule(n: int) -> None:
    from genrl.algos.ppo import chain_schedule

    weights, clips = chain_schedule(n, 0.9, 0.002, 0.05, 3.0)
    assert weights.shape == clips.shape == (n,)
    torch.testing.assert_close(weights, torch.tensor([0.9 ** (n - 1 - i) for i in range(n)], dtype=torch.float64))
    assert weights[-1] == 1.0
    assert clips[-1] == pytest.approx(0.05, abs=1e-15)
    if n > 1:
        assert clips[0] == pytest.approx(0.002, abs=1e-15)
        assert (clips[1:] > clips[:-1]).all()
        u = torch.arange(n, dtype=torch.float64) / (n - 1)
        torch.testing.assert_close(clips, 0.002 + 0.048 * torch.expm1(3 * u) / math.expm1(3))


def test_ppo_clip_schedule_settings_are_checked() -> None:
    from genrl.algos.ppo import PPOConfig
    from genrl.errors import ConfigError

    for bad in ({"clip_coef_final": 0.0}, {"clip_rate": 0.0}, {"denoising_gamma": 0.0}, {"denoising_gamma": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PPOConfig(**bad)


@pytest.mark.parametrize("ft", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ratio_is_exactly_one_at_unchanged_params(ft: int | None, dtype: torch.dtype) -> None:
    policy, obs = make(ft_denoising_steps=ft, dtype=dtype), observations(dtype)
    n = K if ft is None else ft
    for deterministic in (False, True):
        _, record = policy.act(obs, deterministic=deterministic, generator=gen(4))
        lr = policy.log_ratio(obs, record)
        assert lr.shape == (B, n)
        assert torch.equal(lr, torch.zeros_like(lr))
    perturb_(policy, 5, 0.05)
    assert not torch.equal(policy.log_ratio(obs, record), torch.zeros_like(lr))
    assert policy.regularizer(obs, record) is None


def test_frozen_base_steps() -> None:
    policy, obs = make(ft_denoising_steps=2), observations()
    names = {n for n, _ in policy.named_parameters()}
    assert names and all(n.startswith("net.") for n in names)  # base is not trainable
    assert not any(p is b for p in policy.parameters() for b in policy.base_net.buffers())
    sd = policy.state_dict()
    assert any(k.startswith("base_net.") for k in sd)  # saved, so a fine-tuned policy reloads exactly
    _, record = policy.act(obs, generator=gen(6))
    assert record.chain.shape == (B, 3, ACT) and record.log_prob.shape == (B, 2)
    # the frozen early steps: the chain's first stored state depends on the base net only
    before = record.chain[:, 0].clone()
    base_state = {k: v.clone() for k, v in policy.base_net.state_dict().items()}
    perturb_(policy, 7, 0.5)
    _, again = policy.act(obs, generator=gen(6))
    torch.testing.assert_close(again.chain[:, 0], before, rtol=0, atol=0)
    assert not torch.equal(again.chain[:, -1], record.chain[:, -1])
    for k, v in policy.base_net.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    # ... and an optimizer over parameters() never touches it
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)
    policy.chain_log_prob(obs, again).sum().backward()
    opt.step()
    for k, v in policy.base_net.state_dict().items():
        assert torch.equal(v, base_state[k]), k


def test_full_finetuning_has_no_base() -> None:
    policy = make()
    assert policy.base_net is None and policy.n_ft == K
    _, record = policy.act(observations(), generator=gen(8))
    assert record.chain.shape == (B, K + 1, ACT)


def test_deterministic_is_noise_free() -> None:
    policy, obs = make(), observations()
    a1, r1 = policy.act(obs, deterministic=True, generator=gen(9))
    a2, r2 = policy.act(obs, deterministic=True, generator=gen(10))
    a3, _ = policy.act(obs, deterministic=True)
    assert torch.equal(a1, a2) and torch.equal(a1, a3) and torch.equal(r1.chain, r2.chain)
    s1, _ = policy.act(obs, generator=gen(9))
    s2, _ = policy.act(obs, generator=gen(10))
    assert not torch.equal(s1, s2)


def test_final_action_clip_and_noise_clamp() -> None:
    obs = observations()
    policy = make(final_action_clip=0.3, denoised_clip=None)
    action, record = policy.act(obs, generator=gen(11))
    assert action.abs().max() <= 0.3 and torch.equal(record.chain[:, -1], action)
    # noise clamp: with a tiny clamp the sample stays within clamp * std of the mean at each step
    tight = make(noise_clamp=1e-3)
    _, rec = tight.act(obs, generator=gen(12))
    mean = tight.step_mean(rec.chain[:, -2], torch.zeros(B, dtype=torch.long), obs)
    assert ((rec.chain[:, -1] - mean).abs() <= 1e-3 * tight.sampling_std[0] + 1e-12).all()


def test_record_is_detached_and_batch_first() -> None:
    policy, obs = make(ft_denoising_steps=3), observations()
    action, record = policy.act(obs, generator=gen(13))
    assert isinstance(record, DiffusionRecord)
    shapes = {"chain": (B, 4, ACT), "log_prob": (B, 3)}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        assert value.shape == shapes[f.name] and not value.requires_grad, f.name
    assert torch.equal(action, record.chain[:, -1])


@pytest.mark.parametrize("ft", [None, 2])
def test_save_load_roundtrip(ft: int | None, tmp_path: Path) -> None:
    policy = make(ft_denoising_steps=ft, dtype=torch.float32)  # load_pretrained builds float32
    obs = observations(torch.float32)
    perturb_(policy, 14, 0.2)  # the fine-tuned net now differs from the frozen base
    policy.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, family="diffusion")
    assert loaded.config == policy.config
    for deterministic in (True, False):
        a, ra = policy.act(obs, deterministic=deterministic, generator=gen(15))
        b, rb = loaded.act(obs, deterministic=deterministic, generator=gen(15))
        assert torch.equal(a, b) and torch.equal(ra.chain, rb.chain) and torch.equal(ra.log_prob, rb.log_prob)


def test_bad_chain_shape_raises() -> None:
    policy, obs = make(ft_denoising_steps=2), observations()
    with pytest.raises(ValueError, match="chain has shape"):
        policy.step_log_probs(obs, torch.zeros(B, K + 1, ACT, dtype=torch.float64))


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_denoising_steps=0),
        dict(ft_denoising_steps=0),
        dict(ft_denoising_steps=K + 1),
        dict(min_sampling_std=0.0),
        dict(min_logprob_std=-1.0),
        dict(noise_clamp=0.0),
        dict(denoised_clip=-1.0),
        dict(final_action_clip=float("inf")),
        dict(logprob_clamp=(2.0, -5.0)),
        dict(logprob_reduction="max"),
        dict(activation="gelu"),
        dict(embed_dim=5),
    ],
)
def test_bad_config_raises(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        DiffusionConfig(**{**TINY, **bad})


def test_bad_obs_shape_raises() -> None:
    policy = make()
    with pytest.raises(ValueError, match=rf"\(B, {OBS}\)"):
        policy.act(torch.zeros(B, OBS + 1, dtype=torch.float64))


def test_runs_and_policies_of_the_earlier_layout_still_load(tmp_path) -> None:
    """DPPO's schedule and GoRL's per-stage clips moved into the PPO section; older files convert."""
    import json

    from genrl.config import config_from_dict, upgrade_config
    from genrl.errors import ConfigError

    old = {"policy": "diffusion", "policy_config": {"clip_coef_base": 0.01, "clip_coef_final": 0.02, "clip_rate": 2.0, "gamma_denoising": 0.9}}
    cfg = config_from_dict(upgrade_config(old))
    assert (cfg.ppo.clip_coef, cfg.ppo.clip_coef_final, cfg.ppo.clip_rate, cfg.ppo.denoising_gamma) == (0.01, 0.02, 2.0, 0.9)
    gorl = config_from_dict(upgrade_config({"policy": "gorl", "gorl": {"clip_coefs": [0.1, 0.2, 0.3, 0.3], "max_grad_norms": []}}))
    assert gorl.ppo.stage_clip_coefs == (0.1, 0.2, 0.3, 0.3) and gorl.ppo.stage_max_grad_norms == ()
    with pytest.raises(ConfigError, match="cannot resume unchanged"):
        upgrade_config({**old, "ppo": {"clip_vloss": True, "clip_coef": 0.2}})
    policy = make(dtype=torch.float32)
    policy.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"].update(old["policy_config"])  # an export written before the move
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = load_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), policy.state_dict().values(), strict=True))

"""FPO (policies.fpo): ratio bookkeeping, the two ratio modes, the eps weighting and the mechanism."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from genrl_policies.base import load_pretrained
from genrl_policies.flow import cfm_loss
from genrl_policies.fpo import FPOConfig, FPOPolicy, FPORecord

OBS, ACT, B = 4, 2, 6
TINY = dict(hidden_sizes=(16, 16), embed_dim=8, n_steps=4)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> FPOPolicy:
    torch.manual_seed(seed)
    policy = FPOPolicy(OBS, ACT, FPOConfig(**{**TINY, **kw})).to(dtype)
    perturb_(policy, seed + 100, 0.3)  # move off the zero last layer (a = z at init)
    return policy


def perturb_(policy: torch.nn.Module, seed: int, scale: float) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def observations(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(B, OBS, generator=gen(1), dtype=dtype)


@pytest.mark.parametrize("ratio_mode", ["average", "per_pair"])
@pytest.mark.parametrize("loss_weighting", ["velocity", "eps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ratio_is_exactly_one_at_unchanged_params(ratio_mode: str, loss_weighting: str, dtype: torch.dtype) -> None:
    policy, obs = make(ratio_mode=ratio_mode, loss_weighting=loss_weighting, dtype=dtype), observations(dtype)
    for deterministic in (False, True):
        _, record = policy.act(obs, deterministic=deterministic, generator=gen(2))
        lr = policy.log_ratio(obs, record)
        assert lr.shape == ((B,) if ratio_mode == "average" else (B, policy.config.n_mc))
        assert torch.equal(lr, torch.zeros_like(lr))
    assert policy.regularizer(obs, record) is None


def test_modes_agree_for_one_pair_and_differ_for_several() -> None:
    obs = observations()
    ratios = {}
    for n_mc in (1, 8):
        for mode in ("average", "per_pair"):
            policy = make(n_mc=n_mc, ratio_mode=mode)
            _, record = policy.act(obs, generator=gen(3))
            perturb_(policy, 7, 0.02)  # small: the per-pair clamp (3) does not fire
            ratios[n_mc, mode] = policy.log_ratio(obs, record)
    per_pair_1 = ratios[1, "per_pair"]
    assert per_pair_1.shape == (B, 1) and per_pair_1.abs().max() < 3.0
    torch.testing.assert_close(ratios[1, "average"], per_pair_1.squeeze(1), rtol=0, atol=1e-12)
    # n_mc > 1: exp(mean) is not mean(exp): the surrogate terms differ, log-ratios average equal
    avg, pp = ratios[8, "average"], ratios[8, "per_pair"]
    torch.testing.assert_close(avg, pp.mean(-1), rtol=0, atol=1e-12)
    assert not torch.allclose(avg.exp(), pp.exp().mean(-1))


def test_per_pair_clamp_fires_and_is_reported() -> None:
    policy, obs = make(ratio_mode="per_pair", per_pair_clamp=0.01), observations()
    _, record = policy.act(obs, generator=gen(4))
    perturb_(policy, 8, 0.3)
    lr = policy.log_ratio(obs, record)
    assert lr.abs().max() <= 0.01 + 1e-15
    terms = policy.evaluate(obs, record, torch.zeros(B, dtype=obs.dtype))  # the one call an algorithm makes
    assert terms.aux_loss is None and terms.regularizer is None and torch.equal(terms.log_ratio, lr)
    stats = terms.stats
    assert 0 < stats["fpo/pair_clamp_fraction"] <= 1
    raw = record.cfm_loss - policy.pair_losses(obs, record.action, record.eps, record.t)
    assert stats["fpo/pair_clamp_fraction"] == (raw.abs() > 0.01).double().mean()
    assert make(ratio_mode="average").evaluate(obs, record, torch.zeros(B)).stats == {}


def test_eps_weighting_is_noise_reconstruction_error() -> None:
    """loss_weighting="eps": ||z - z_hat||^2 with z_hat = x_t - t v = t^2 * CFM loss."""
    policy, obs = make(loss_weighting="eps"), observations()
    velocity_policy = make(loss_weighting="velocity")
    _, record = policy.act(obs, generator=gen(5))
    a, z, t = record.action, record.eps, record.t  # (B, A), (B, M, A), (B, M)
    x_t = (1 - t[..., None]) * z + t[..., None] * a[:, None]
    M = z.shape[1]
    v = policy.velocity(x_t.reshape(B * M, ACT), t.reshape(-1), obs.repeat_interleave(M, 0)).view(B, M, ACT)
    z_hat = x_t - t[..., None] * v
    expected = (z - z_hat).square().sum(-1)  # (B, M)
    torch.testing.assert_close(record.cfm_loss, expected, rtol=1e-12, atol=1e-12)
    plain = velocity_policy.pair_losses(obs, a, z, t)  # same parameters (same seed)
    torch.testing.assert_close(record.cfm_loss, t.square() * plain, rtol=1e-12, atol=1e-12)
    # the plain loss is flow.cfm_loss itself; "mean" divides by A
    flat = cfm_loss(policy.velocity, a.repeat_interleave(M, 0), z.reshape(-1, ACT), t.reshape(-1), obs.repeat_interleave(M, 0))
    torch.testing.assert_close(plain, flat.view(B, M), rtol=0, atol=0)
    mean_policy = make(loss_weighting="velocity", loss_reduction="mean")
    torch.testing.assert_close(mean_policy.pair_losses(obs, a, z, t), plain / ACT, rtol=1e-12, atol=0)


def test_grid_times_are_euler_times() -> None:
    policy = make(n_mc=64)
    _, record = policy.act(observations(), generator=gen(6))
    k = record.t * policy.config.n_steps
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-12)
    assert record.t.min() >= 0 and record.t.max() <= 1 - 1 / policy.config.n_steps
    _, rec_u = make(n_mc=64, t_sampling="uniform").act(observations(), generator=gen(6))
    assert not torch.allclose(rec_u.t * 4, (rec_u.t * 4).round())


@pytest.mark.parametrize("ratio_mode", ["average", "per_pair"])
def test_cfm_step_towards_positive_actions_raises_their_ratio(ratio_mode: str) -> None:
    """FPO's mechanism: descending the advantage-weighted surrogate lowers the CFM loss of
    positive-advantage actions (rho > 1) and raises it for negative ones (rho < 1)."""
    policy, obs = make(ratio_mode=ratio_mode, n_mc=16), observations()
    _, record = policy.act(obs, generator=gen(9))
    adv = torch.tensor([1.0, -1.0] * (B // 2), dtype=obs.dtype)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    lr = policy.log_ratio(obs, record)
    loss = -(lr.exp() * adv.view(B, *([1] * (lr.ndim - 1)))).mean()  # the unclipped surrogate
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        lr = policy.log_ratio(obs, record)
        lr = lr if lr.ndim == 1 else lr.mean(-1)
    assert (lr[adv > 0] > 0).all(), lr
    assert (lr[adv < 0] < 0).all(), lr


def test_record_is_detached_and_batch_first() -> None:
    policy, obs = make(), observations()
    action, record = policy.act(obs, generator=gen(10))
    assert isinstance(record, FPORecord)
    shapes = {"action": (B, ACT), "eps": (B, 8, ACT), "t": (B, 8), "cfm_loss": (B, 8)}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        assert value.shape == shapes[f.name], f.name
        assert not value.requires_grad and value.grad_fn is None, f.name
    assert torch.equal(action, record.action)


def test_deterministic_keeps_random_noise_unless_configured() -> None:
    obs = observations()
    policy = make(exploration_noise=0.5)
    a1, _ = policy.act(obs, deterministic=True, generator=gen(11))
    a2, _ = policy.act(obs, deterministic=True, generator=gen(12))
    assert not torch.equal(a1, a2)  # z is random, as in FPO's evaluation
    # without feather noise the deterministic action is the ODE map of the same z
    s1, _ = make(exploration_noise=0.0).act(obs, deterministic=False, generator=gen(11))
    torch.testing.assert_close(a1, s1, rtol=0, atol=0)
    zero = make(exploration_noise=0.5, deterministic_zero_noise=True)
    b1, _ = zero.act(obs, deterministic=True, generator=gen(11))
    b2, _ = zero.act(obs, deterministic=True, generator=gen(12))
    assert torch.equal(b1, b2)


def test_zero_velocity_init_is_identity_flow() -> None:
    torch.manual_seed(0)
    policy = FPOPolicy(OBS, ACT, FPOConfig(**TINY)).double()
    z = torch.randn(B, ACT, generator=gen(13), dtype=torch.float64)
    action, _ = policy.act(observations(), generator=gen(13))
    torch.testing.assert_close(action, z, rtol=0, atol=0)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    # float32: load_pretrained builds float32 parameters, as the trainer does
    policy = make(ratio_mode="per_pair", loss_weighting="eps", dtype=torch.float32)
    obs = observations(torch.float32)
    policy.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, family="fpo")
    assert loaded.config == policy.config
    a, ra = policy.act(obs, deterministic=True, generator=gen(14))
    b, rb = loaded.act(obs, deterministic=True, generator=gen(14))
    assert torch.equal(a, b) and torch.equal(ra.cfm_loss, rb.cfm_loss)


@pytest.mark.parametrize(
    "bad",
    [
        dict(n_mc=0),
        dict(n_steps=0),
        dict(n_mc=2.5),
        dict(ratio_mode="mean"),
        dict(loss_weighting="x0"),
        dict(loss_reduction="max"),
        dict(t_sampling="beta"),
        dict(exploration_noise=-0.1),
        dict(exploration_noise=float("nan")),
        dict(per_pair_clamp=0.0),
        dict(embed_dim=3),
        dict(hidden_sizes=()),
        dict(activation="gelu"),
    ],
)
def test_bad_config_raises(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name if name != "hidden_sizes" else "hidden_sizes"):
        FPOConfig(**bad)


def test_bad_obs_shape_raises() -> None:
    policy = make()
    with pytest.raises(ValueError, match=rf"\(B, {OBS}\)"):
        policy.act(torch.zeros(B, OBS + 1, dtype=torch.float64))
    _, record = policy.act(observations(), generator=gen(15))
    with pytest.raises(ValueError, match=rf"\(B, {OBS}\)"):
        policy.log_ratio(torch.zeros(OBS, dtype=torch.float64), record)

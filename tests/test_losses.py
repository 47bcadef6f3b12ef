"""PPO loss terms (genrl.losses) and PPO's own loss assembly, lr annealing and target-KL stop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import genrl_envs as envs
from genrl.advantages import gae
from genrl.algos.ppo import PPO, PPOConfig
from genrl.errors import NonFiniteLossError
from genrl.losses import clipped_surrogate, explained_variance, value_loss
from genrl_policies.base import record_map
from genrl_policies.gaussian import GaussianPolicy

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, eps: float) -> torch.Tensor:
    """-mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)); A has log_ratio's full shape."""
    assert adv.shape == log_ratio.shape
    rho = log_ratio.exp()
    return -torch.minimum(rho * adv, torch.clamp(rho, 1 - eps, 1 + eps) * adv).mean()


# -- clipped surrogate -----------------------------------------------------------------------------
def test_clipped_surrogate_matches_definition_1d() -> None:
    eps = 0.2
    log_ratio = 0.4 * torch.randn(64, generator=gen(0), dtype=F64)
    adv = torch.randn(64, generator=gen(1), dtype=F64)
    loss, stats = clipped_surrogate(log_ratio, adv, eps)
    torch.testing.assert_close(loss, reference_surrogate(log_ratio, adv, eps), rtol=0, atol=1e-12)
    rho = log_ratio.exp()
    frac = ((rho - 1).abs() > eps).double().mean()
    assert 0.0 < frac.item() < 1.0  # some samples are clipped and some are not
    torch.testing.assert_close(stats["clip_fraction"].double(), frac, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["approx_kl"], ((rho - 1) - log_ratio).mean(), rtol=0, atol=1e-12)


def test_clipped_surrogate_broadcasts_advantage_over_chain_steps() -> None:
    eps, B, K = 0.1, 8, 4
    log_ratio = 0.3 * torch.randn(B, K, generator=gen(2), dtype=F64)
    adv = torch.randn(B, generator=gen(3), dtype=F64)
    loss, _ = clipped_surrogate(log_ratio, adv, eps)
    # explicit (B, K) advantage: A[b, k] = adv[b]
    expected = reference_surrogate(log_ratio, adv[:, None].expand(B, K).contiguous(), eps)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    # a wrong broadcast (A[b, k] = adv[k] style) would give a different number
    wrong = reference_surrogate(log_ratio, adv[:K].expand(B, K).contiguous(), eps)
    assert not torch.isclose(loss, wrong)


def test_clipped_surrogate_at_zero_log_ratio() -> None:
    adv = torch.tensor([1.0, -2.0, 0.5, 3.5], dtype=F64)
    loss, stats = clipped_surrogate(torch.zeros(4, dtype=F64), adv, 0.2)
    # rho = 1 everywhere -> loss = -mean(A) = -(1 - 2 + 0.5 + 3.5) / 4 = -3 / 4
    assert loss.item() == -0.75
    assert stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0


def test_clipped_surrogate_gradient_zero_when_clipped_in_improving_direction() -> None:
    eps = 0.2
    #            A>0,rho>1+e  A<0,rho<1-e  A>0,rho=1  A<0,rho>1+e  A>0,rho<1-e  A<0,rho=1.1
    rho = torch.tensor([1.5, 0.5, 1.0, 1.5, 0.5, 1.1], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -3.0], dtype=F64)
    log_ratio = rho.log().requires_grad_(True)
    loss, _ = clipped_surrogate(log_ratio, adv, eps)
    (grad,) = torch.autograd.grad(loss, log_ratio)
    # clipped branch active (constant in rho) -> 0; otherwise d/dlogrho of -rho*A/B = -rho*A/B:
    #   i=2: -1.0 * 1 / 6 = -1/6     i=3: -1.5 * -1 / 6 = 0.25
    #   i=4: -0.5 * 2 / 6 = -1/6     i=5: -1.1 * -3 / 6 = 0.55
    expected = torch.tensor([0.0, 0.0, -1 / 6, 0.25, -1 / 6, 0.55], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0
    assert (grad[2:] != 0).all()


def test_approx_kl_nonnegative() -> None:
    for seed in range(20):
        log_ratio = torch.randn(16, generator=gen(seed), dtype=F64) * (0.1 + seed)
        _, stats = clipped_surrogate(log_ratio, torch.ones(16, dtype=F64), 0.2)
        # k3 = (rho - 1) - log rho >= 0 elementwise since x - 1 >= log x
        assert stats["approx_kl"].item() >= 0.0


def test_approx_kl_estimates_gaussian_kl() -> None:
    # actions from the behaviour policy N(0, 1); the new policy is N(0.3, 1.2^2) (1-D).
    old, new = Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)), Normal(torch.tensor(0.3, dtype=F64), torch.tensor(1.2, dtype=F64))
    x = torch.randn(200_000, generator=gen(13), dtype=F64)  # x ~ old
    log_ratio = new.log_prob(x) - old.log_prob(x)
    _, stats = clipped_surrogate(log_ratio, torch.ones_like(x), 0.2)
    # E_old[(rho - 1) - log rho] = KL(old || new)
    #   = log(1.2 / 1) + (1 + 0.3^2) / (2 * 1.44) - 0.5 = 0.18232 + 0.37847 - 0.5 = 0.06079
    kl = kl_divergence(old, new)
    torch.testing.assert_close(kl, torch.tensor(0.0607935, dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats["approx_kl"], kl, rtol=0.03, atol=0)


# -- value loss and explained variance -------------------------------------------------------------
def test_value_loss_unclipped() -> None:
    v = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=F64)
    r = torch.tensor([0.0, 2.0, 1.0, 1.5], dtype=F64)
    # 0.5 * mean((1)^2, 0, (-2)^2, (-1)^2) = 0.5 * (1 + 0 + 4 + 1) / 4 = 0.75
    assert value_loss(v, r, torch.zeros(4, dtype=F64), None).item() == 0.75


def test_value_loss_clipped_hand_example() -> None:
    v, r, old = (torch.tensor([x], dtype=F64) for x in (1.0, 2.0, 0.0))
    # clipped V = 0 + clamp(1 - 0, -0.2, 0.2) = 0.2; max((1-2)^2, (0.2-2)^2) = max(1, 3.24) = 3.24
    # loss = 0.5 * 3.24 = 1.62
    torch.testing.assert_close(value_loss(v, r, old, 0.2), torch.tensor(1.62, dtype=F64), rtol=0, atol=1e-12)


def test_value_loss_clipped_matches_definition() -> None:
    v = torch.randn(32, generator=gen(20), dtype=F64)
    r = torch.randn(32, generator=gen(21), dtype=F64)
    old = v + 0.5 * torch.randn(32, generator=gen(22), dtype=F64)
    eps = 0.2
    v_clip = old + torch.clamp(v - old, -eps, eps)
    expected = 0.5 * torch.maximum((v - r) ** 2, (v_clip - r) ** 2).mean()
    got = value_loss(v, r, old, eps)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert got.item() > value_loss(v, r, old, None).item()  # the clip is active somewhere


def test_explained_variance() -> None:
    target = torch.randn(50, generator=gen(23), dtype=F64)
    assert explained_variance(target.clone(), target) == 1.0
    # predicting the mean: Var[target - mean] / Var[target] = 1 -> 0
    assert math.isclose(explained_variance(torch.full_like(target, target.mean().item()), target), 0.0, abs_tol=1e-12)
    # pred = 0.5 * target: 1 - Var[0.5 t] / Var[t] = 1 - 0.25 = 0.75
    assert math.isclose(explained_variance(0.5 * target, target), 0.75, abs_tol=1e-12)
    assert math.isnan(explained_variance(target[:5], torch.full((5,), 3.0, dtype=F64)))


# -- PPO's loss assembly ---------------------------------------------------------------------------
def make_ppo(total_steps: int = 32, **cfg) -> PPO:
    env = envs.make_env("Pendulum-v1", 1)
    torch.manual_seed(0)
    policy = GaussianPolicy(env.spec.obs_dim, env.spec.action_dim)
    config = PPOConfig(**{"n_steps": 16, "n_minibatches": 2, "n_epochs": 1, **cfg})
    return PPO(policy, env, config, total_steps=total_steps, seed=0)


def stored_batch(ppo: PPO):
    """(obs, record, advantages, returns, values) over the whole stored rollout, as update() builds them."""
    s, cfg = ppo._storage, ppo.cfg
    T, N = cfg.n_steps, ppo.env.spec.n_envs
    with torch.no_grad():
        values = ppo.critic(s["obs"].view(T * N, -1)).view(T, N)
        next_values = ppo.critic(s["next_obs"].view(T * N, -1)).view(T, N)
    adv, ret = gae(s["reward"], values, next_values, s["terminated"], s["truncated"], cfg.gamma, cfg.gae_lambda)
    rec = record_map(lambda x: x.reshape(T * N, *x.shape[2:]), s["record"])
    return s["obs"].view(T * N, -1), rec, adv.view(-1), ret.view(-1), values.view(-1)


@pytest.fixture(scope="module")
def collected() -> PPO:
    torch.manual_seed(0)
    ppo = make_ppo(ent_coef=0.01)
    ppo.collect()
    yield ppo
    ppo.env.close()


def test_ppo_loss_is_sum_of_terms(collected: PPO) -> None:
    ppo = collected
    obs, rec, adv, ret, val = stored_batch(ppo)
    loss, stats = ppo.ppo_loss(obs, rec, adv, ret, val)

    cfg = ppo.cfg
    norm = (adv - adv.mean()) / (adv.std() + 1e-8)
    pg, _ = clipped_surrogate(ppo.policy.log_ratio(obs, rec), norm, cfg.clip_coef)
    v = 0.5 * (ppo.critic(obs) - ret).square().mean()
    ent = ppo.policy.regularizer(obs, rec).mean()
    expected = pg + cfg.vf_coef * v - cfg.ent_coef * ent
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["value_loss"], v.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats["entropy"], ent.detach(), rtol=1e-6, atol=1e-6)
    assert v.item() > 0 and ent.item() != 0  # every term contributes
    assert loss.requires_grad


def test_ppo_loss_at_unchanged_parameters(collected: PPO) -> None:
    ppo = collected
    obs, rec, adv, ret, val = stored_batch(ppo)
    assert torch.equal(ppo.policy.log_ratio(obs, rec), torch.zeros(obs.shape[0]))
    _, stats = ppo.ppo_loss(obs, rec, adv, ret, val)
    norm = (adv - adv.mean()) / (adv.std() + 1e-8)
    # rho == 1 -> policy loss = -mean(normalised A), no clipping, k3 = (1 - 1) - 0 = 0
    torch.testing.assert_close(stats["policy_loss"], -norm.mean(), rtol=0, atol=1e-7)
    assert stats["approx_kl"].item() == 0.0
    assert stats["clip_fraction"].item() == 0.0

    # without normalisation the same identity is visible at full scale: -mean(A)
    ppo_raw = dataclasses.replace(ppo.cfg, norm_adv=False)
    old_cfg, ppo.cfg = ppo.cfg, ppo_raw
    try:
        _, stats_raw = ppo.ppo_loss(obs, rec, adv, ret, val)
    finally:
        ppo.cfg = old_cfg
    assert abs(adv.mean().item()) > 1e-3
    torch.testing.assert_close(stats_raw["policy_loss"], -adv.mean(), rtol=1e-6, atol=0)


def test_ppo_loss_nan_raises(collected: PPO) -> None:
    ppo = collected
    obs, rec, adv, ret, val = stored_batch(ppo)
    bad = ret.clone()
    bad[3] = float("nan")
    with pytest.raises(NonFiniteLossError, match="value_loss"):
        ppo.ppo_loss(obs, rec, adv, bad, val)


# -- PPO.update: lr annealing and target-KL early stop ---------------------------------------------
def test_learning_rate_is_annealed_linearly() -> None:
    lr0 = 1e-3
    ppo = make_ppo(total_steps=64, learning_rate=lr0)  # 64 / 16 = 4 iterations
    try:
        assert ppo.n_iterations == 4
        # update in iteration i sets lr = (1 - i / 4) * lr0: i = 0, 1, 2 -> lr0, 0.75 lr0, 0.5 lr0
        for i, frac in enumerate((1.0, 0.75, 0.5)):
            ppo.collect()
            out = ppo.update()
            assert ppo.iteration == i + 1
            assert math.isclose(out["train/learning_rate"], frac * lr0, rel_tol=1e-12)
            assert math.isclose(ppo.optimizer.param_groups[0]["lr"], frac * lr0, rel_tol=1e-12)
    finally:
        ppo.env.close()


def test_target_kl_early_stop() -> None:
    ppo = make_ppo(n_epochs=5, target_kl=1e-9, learning_rate=1e-3)
    try:
        ppo.collect()
        out = ppo.update()
        # first minibatch: rho == 1 -> approx_kl = 0 <= 1.5e-9, one step is taken; the next
        # minibatch sees the moved policy (approx_kl > 1.5e-9) and stops the epoch loop.
        assert out["train/early_stop"] == 1.0
        assert 1 <= out["train/n_updates"] < 5 * 2
    finally:
        ppo.env.close()

    ppo = make_ppo(n_epochs=5, target_kl=None, learning_rate=1e-3)
    try:
        ppo.collect()
        out = ppo.update()
        assert out["train/early_stop"] == 0.0 and out["train/n_updates"] == 10.0
    finally:
        ppo.env.close()

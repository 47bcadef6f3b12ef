"""Flow-GRPO / G2RPO / GRPO-Guard maths on plain tensors: SDE step, log-probs, KL, advantages."""

from __future__ import annotations

import math

import pytest
import torch

from genrl.advantages import aggregate_advantages, group_advantages
from genrl.algos.grpo import GRPOConfig, continuation_indices, trained_steps
from genrl.errors import ConfigError
from genrl_policies.t2i import SDEStep, guard_log_ratio, kl_to_reference, sde_std, sde_step


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sde_log_prob_is_the_gaussian_density_of_the_step() -> None:
    x, v, noise = _rand(5, 2, 3, 3, seed=1), _rand(5, 2, 3, 3, seed=2), _rand(5, 2, 3, 3, seed=3)
    sigma, sigma_next = torch.full((5,), 0.6, dtype=torch.float64), torch.full((5,), 0.45, dtype=torch.float64)
    st = sde_step(v, x, sigma, sigma_next, 0.7, noise)
    dist = torch.distributions.Normal(st.mean, st.std.reshape(5, 1, 1, 1).expand_as(st.mean))
    expected = dist.log_prob(st.x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(st.log_prob, expected, rtol=0, atol=1e-12)
    # the std is std_s * sqrt(|dt|) with std_s = eta sqrt(s / (1 - s))
    torch.testing.assert_close(st.std, 0.7 * math.sqrt(0.6 / 0.4) * math.sqrt(0.15) * torch.ones(5, dtype=torch.float64))
    # scoring the stored transition gives the same log-prob; x_next = mean + std * noise
    again = sde_step(v, x, sigma, sigma_next, 0.7, x_next=st.x_next)
    assert torch.equal(again.log_prob, st.log_prob)
    torch.testing.assert_close(st.x_next, st.mean + st.std.reshape(5, 1, 1, 1) * noise)


def test_sde_mean_is_the_euler_step_plus_the_drift_correction() -> None:
    x, v = _rand(4, 1, 4, 4, seed=4), _rand(4, 1, 4, 4, seed=5)
    s, s2, eta = 0.8, 0.7, 0.5
    st = sde_step(v, x, torch.tensor(s), torch.tensor(s2), eta)
    dt = s2 - s
    std2 = eta**2 * s / (1 - s)
    expected = x + v * dt + std2 / (2 * s) * (x + (1 - s) * v) * dt  # dx = [v + std^2/(2s) (x + (1-s) v)] dt
    torch.testing.assert_close(st.mean, expected)


def test_zero_noise_level_is_the_ode_euler_step_and_zero_noise_sde_reproduces_the_ode_sampler() -> None:
    x, v = _rand(3, 1, 2, 2, seed=6), _rand(3, 1, 2, 2, seed=7)
    st = sde_step(v, x, torch.tensor(0.5), torch.tensor(0.25), 0.0)
    assert torch.equal(st.x_next, x + (0.25 - 0.5) * v)
    assert torch.equal(st.log_prob, torch.zeros(3, dtype=torch.float64))
    # a whole chain: eta = 0 with any noise equals plain Euler
    sigmas = torch.linspace(1, 0, 6, dtype=torch.float64)
    field = lambda z, s: -z * 0.3 + s  # noqa: E731
    a = b = _rand(3, 1, 2, 2, seed=8)
    for i in range(5):
        a = sde_step(field(a, sigmas[i]), a, sigmas[i], sigmas[i + 1], 0.0, _rand(3, 1, 2, 2, seed=i)).x_next
        b = b + (sigmas[i + 1] - sigmas[i]) * field(b, sigmas[i])
    assert torch.equal(a, b)


def test_sigma_one_guard() -> None:
    s = torch.tensor([1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma_guard"):
        sde_std(s, 0.7)
    std = sde_std(s, 0.7, sigma_guard=0.9)
    assert torch.isfinite(std).all()
    torch.testing.assert_close(std[0], 0.7 * torch.sqrt(torch.tensor(1.0 / 0.1, dtype=torch.float64)))
    st = sde_step(_rand(2, 1, 2, 2), _rand(2, 1, 2, 2, seed=1), s, torch.tensor([0.9, 0.4], dtype=torch.float64), 0.7, sigma_guard=0.9)
    assert torch.isfinite(st.log_prob).all()


def test_sde_and_ode_samplers_share_the_marginals_of_a_gaussian_target() -> None:
    """x0 ~ N(m, s^2) per element has an analytic velocity; SDE and ODE end at the same moments."""
    m, sd = 1.5, 0.5

    def velocity(x: torch.Tensor, sig: float) -> torch.Tensor:
        a = 1 - sig
        var = a * a * sd * sd + sig * sig
        e_eps = sig / var * (x - a * m)
        e_x0 = m + a * sd * sd / var * (x - a * m)
        return e_eps - e_x0

    g = torch.Generator().manual_seed(0)
    n, steps = 20000, 60
    sig = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x_ode = x_sde = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    for i in range(steps):
        s, s2 = float(sig[i]), float(sig[i + 1])
        x_ode = x_ode + (s2 - s) * velocity(x_ode, s)
        x_sde = sde_step(velocity(x_sde, s), x_sde, sig[i], sig[i + 1], 0.7, sigma_guard=sig[1], generator=g).x_next
    for x in (x_ode, x_sde):
        assert abs(float(x.mean()) - m) < 0.03
        assert abs(float(x.std()) - sd) < 0.03


def test_kl_forms() -> None:
    mean, ref = _rand(4, 1, 3, 3, seed=1), _rand(4, 1, 3, 3, seed=2)
    std = torch.full((4,), 0.2, dtype=torch.float64)
    dt = torch.full((4,), -0.1, dtype=torch.float64)
    sq = ((mean - ref) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl_to_reference(mean, ref, std, dt, "exact"), sq / (2 * 0.04))
    torch.testing.assert_close(kl_to_reference(mean, ref, std, dt, "flow_grpo"), sq / (2 * 0.04 / 0.1))
    # the exact form is the closed-form KL of two equal-std Gaussians (torch.distributions)
    p = torch.distributions.Normal(mean, 0.2)
    q = torch.distributions.Normal(ref, 0.2)
    torch.testing.assert_close(kl_to_reference(mean, ref, std, dt, "exact"), torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3)))
    assert torch.equal(kl_to_reference(mean, mean, std, dt, "exact"), torch.zeros(4, dtype=torch.float64))


def test_guard_log_ratio_is_mean_noise_times_mean_shift_and_removes_the_left_shift() -> None:
    x, v_old = _rand(2000, 1, 2, 2, seed=1), _rand(2000, 1, 2, 2, seed=2)
    v_new = v_old + 0.3 * _rand(2000, 1, 2, 2, seed=3)
    s, s2 = torch.tensor(0.7), torch.tensor(0.6)
    xi = _rand(2000, 1, 2, 2, seed=4)
    old = sde_step(v_old, x, s, s2, 0.7, xi)
    new = sde_step(v_new, x, s, s2, 0.7, x_next=old.x_next)
    guard = guard_log_ratio(new, old.mean, old.log_prob)
    torch.testing.assert_close(guard, (xi * (new.mean - old.mean)).mean(dim=(1, 2, 3)))
    same = sde_step(v_old, x, s, s2, 0.7, x_next=old.x_next)
    assert torch.equal(guard_log_ratio(same, old.mean, old.log_prob), torch.zeros(2000, dtype=torch.float64))
    standard = new.log_prob - old.log_prob
    bias = -(((new.mean - old.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * new.std**2)).mean()
    assert float(standard.mean()) < 0 and float(bias) < 0  # the standard ratio is left-shifted ...
    assert abs(float(standard.mean() - bias)) < 5 * float(standard.std()) / math.sqrt(2000)  # ... by its bias term
    assert abs(float(guard.mean())) < 5 * float(guard.std()) / math.sqrt(2000)  # the guard ratio is centred


def test_group_advantages_conventions() -> None:
    r = _rand(3, 6, seed=9)
    a = group_advantages(r, std_scope="group", ddof=0, eps=0.0)
    torch.testing.assert_close(a.mean(dim=1), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(a.std(dim=1, correction=0), torch.ones(3, dtype=torch.float64))
    a1 = group_advantages(r, std_scope="group", ddof=1, eps=0.0)
    torch.testing.assert_close(a1.std(dim=1), torch.ones(3, dtype=torch.float64))
    glob = group_advantages(r, std_scope="global", ddof=0, eps=0.0)
    torch.testing.assert_close(glob.mean(dim=1), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(glob, (r - r.mean(1, keepdim=True)) / r.std(correction=0))
    const = group_advantages(torch.ones(2, 4), std_scope="group")
    assert torch.equal(const, torch.zeros(2, 4))
    with pytest.raises(ValueError):
        group_advantages(r, std_scope="batch")


def test_gdpo_decouples_reward_scales_and_sum_does_not() -> None:
    a, b = _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    w = {"a": 1.0, "b": 1.0}
    gdpo = aggregate_advantages({"a": a, "b": 1000 * b}, w, mode="gdpo", eps=0.0)
    gdpo_small = aggregate_advantages({"a": a, "b": b}, w, mode="gdpo", eps=0.0)
    torch.testing.assert_close(gdpo, gdpo_small)  # invariant to one reward's scale
    torch.testing.assert_close(gdpo.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(gdpo.std(correction=0), torch.tensor(1.0, dtype=torch.float64))
    summed = aggregate_advantages({"a": a, "b": 1000 * b}, w, mode="sum", eps=0.0)
    torch.testing.assert_close(summed, group_advantages(b, eps=0.0), atol=1e-2, rtol=0)  # b dominates the plain sum
    per = aggregate_advantages({"a": a, "b": b}, w, mode="per_reward", eps=0.0)
    torch.testing.assert_close(per, group_advantages(a, eps=0.0) + group_advantages(b, eps=0.0))


def test_continuation_schedules() -> None:
    assert continuation_indices(0, 1, 10, "extended") == list(range(1, 11))  # lambda = 1: the original schedule
    assert continuation_indices(2, 2, 10, "extended") == [3, 4, 6, 8, 10]
    assert continuation_indices(0, 3, 10, "extended") == [1, 2, 5, 8, 10]  # stride skips sigma = 0: final x0 jump
    assert continuation_indices(8, 2, 10, "extended") == [9, 10]
    assert continuation_indices(9, 2, 10, "extended") == [10]


def test_trained_steps_and_config_validation() -> None:
    assert trained_steps(GRPOConfig(n_steps=10)) == list(range(9))  # 0.99 * 10 -> 9
    assert trained_steps(GRPOConfig(n_steps=10, sde_steps=(3, 1))) == [1, 3]
    for bad in ({"clip_coef": 0}, {"group_size": 1}, {"ratio": "x"}, {"sde_steps": (10,)}, {"noise_level": 0.0}, {"kl": "nope"}):
        with pytest.raises(ConfigError):
            GRPOConfig(n_steps=10, **bad)


def test_sde_step_record_shapes() -> None:
    st = sde_step(_rand(2, 1, 2, 2), _rand(2, 1, 2, 2, seed=1), torch.tensor(0.5), torch.tensor(0.4), 0.7)
    assert isinstance(st, SDEStep)
    assert st.log_prob.shape == (2,) and st.std.shape == (2,) and st.mean.shape == (2, 1, 2, 2)

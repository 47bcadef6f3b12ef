"""Flow building blocks (policies.flow): integrators, time grids, CFM loss, exact CNF likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from genrl_policies.flow import (
    VelocityNet,
    cfm_loss,
    cnf_log_prob,
    conditional_log_prob,
    divergence,
    flow_map,
    integrate,
    time_grid,
)

OBS, ACT, B = 3, 2, 6
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


class Field(nn.Module):
    """A velocity given as a plain function f(x (B, A), t (B, 1), obs (B, O)) -> (B, A)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.fn(x, t.reshape(-1, 1), obs)


def gaussian_target_field(c: float) -> Field:
    """Rectified-flow velocity from N(0, I) to N(0, c^2 I): x (t c^2 - (1 - t)) / ((1 - t)^2 + t^2 c^2)."""
    return Field(lambda x, t, obs: x * (t * c * c - (1 - t)) / ((1 - t) ** 2 + t * t * c * c))


def smooth_in_t_(net: VelocityNet) -> VelocityNet:
    """Give the time embedding low frequencies (0.1 to 1 cycle per unit t).

    The default features reach 1000 cycles per unit t, so a randomised net oscillates in t far
    faster than a K-step grid (or an adaptive solver, cheaply) resolves; the checks below are
    about the solvers, not about that aliasing.
    """
    half = net.time_embed.freqs.numel()
    net.time_embed.freqs = torch.exp(torch.linspace(math.log(0.1), 0.0, half, dtype=F64))
    return net


def random_velocity(seed: int = 0) -> VelocityNet:
    """A VelocityNet moved off its zero last layer, with a coupled (non-diagonal) Jacobian."""
    torch.manual_seed(seed)
    net = smooth_in_t_(VelocityNet(OBS, ACT, (16, 16), "tanh", 8).double())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=gen(seed + 1), dtype=F64))
    return net


# -- integrators -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_constant_velocity_is_integrated_exactly(method: str, k: int) -> None:
    z, obs = randn(B, ACT, seed=1), randn(B, OBS, seed=2)
    c = obs[:, :ACT]  # constant in x and t, different per sample
    x1 = integrate(Field(lambda x, t, s: s[:, :ACT].clone()), z, obs, k, method)
    torch.testing.assert_close(x1, z + c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_midpoint_is_exact_for_velocity_linear_in_t(k: int) -> None:
    z, obs = randn(B, ACT, seed=3), randn(B, OBS, seed=4)
    alpha, beta = obs[:, :ACT], 2.0 * obs[:, 1:]
    field = Field(lambda x, t, s: s[:, :ACT] + 2.0 * s[:, 1:] * t)
    exact = z + alpha + beta / 2  # int_0^1 (alpha + beta t) dt
    torch.testing.assert_close(integrate(field, z, obs, k, "midpoint"), exact, rtol=0, atol=1e-12)
    # Euler is a left Riemann sum: it misses beta / (2K), so midpoint's exactness is not vacuous
    euler = integrate(field, z, obs, k, "euler")
    torch.testing.assert_close(euler, exact - beta / (2 * k), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,per", [("euler", 1), ("midpoint", 2)])
def test_time_grid_has_k_or_2k_points_and_matches_evaluations(method: str, per: int) -> None:
    k = 5
    grid = time_grid(k, method)
    assert grid.shape == (per * k,)
    torch.testing.assert_close(grid, torch.arange(per * k, dtype=F64) / (per * k), rtol=0, atol=0)
    seen: list[float] = []

    def spy(x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    integrate(Field(spy), randn(B, ACT, seed=5), randn(B, OBS, seed=6), k, method)
    assert seen == pytest.approx(grid.tolist(), abs=1e-12)


def test_integrate_noise_uses_the_generator_reproducibly() -> None:
    net, z, obs = random_velocity(), randn(B, ACT, seed=7), randn(B, OBS, seed=8)
    g = gen(9)
    before = g.get_state()
    clean = integrate(net, z, obs, 5, "midpoint", generator=g)
    assert torch.equal(g.get_state(), before)  # noise_scale 0 draws nothing
    assert torch.equal(clean, integrate(net, z, obs, 5, "midpoint"))
    noisy1 = integrate(net, z, obs, 5, "midpoint", noise_scale=0.3, generator=gen(10))
    noisy2 = integrate(net, z, obs, 5, "midpoint", noise_scale=0.3, generator=gen(10))
    noisy3 = integrate(net, z, obs, 5, "midpoint", noise_scale=0.3, generator=gen(11))
    assert torch.equal(noisy1, noisy2)
    assert not torch.equal(noisy1, noisy3) and not torch.equal(noisy1, clean)


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_bad_step_count_raises(k) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        integrate(random_velocity(), randn(B, ACT, seed=1), randn(B, OBS, seed=2), k)
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(k, "euler")


def test_bad_method_and_negative_noise_raise() -> None:
    net, z, obs = random_velocity(), randn(B, ACT, seed=1), randn(B, OBS, seed=2)
    with pytest.raises(ValueError, match="rk4"):
        integrate(net, z, obs, 4, "rk4")
    with pytest.raises(ValueError, match="rk4"):
        time_grid(4, "rk4")
    with pytest.raises(ValueError, match="noise_scale"):
        integrate(net, z, obs, 4, noise_scale=-0.1)
    with pytest.raises(ValueError, match="ODE method"):
        cnf_log_prob(net, z, obs, method="leapfrog")


# -- conditional flow matching ---------------------------------------------------------------------
def point_mass_field(target: Tensor) -> Field:
    """The CFM-optimal velocity for the point-mass target a*: (a* - x) / (1 - t)."""
    return Field(lambda x, t, obs: (target - x) / (1.0 - t))


def test_cfm_loss_vanishes_at_the_point_mass_optimum() -> None:
    target, z, obs = randn(B, ACT, seed=12), randn(B, ACT, seed=13), randn(B, OBS, seed=14)
    t = 0.99 * torch.rand(B, generator=gen(15), dtype=F64)
    field = point_mass_field(target)
    loss = cfm_loss(field, target, z, t, obs)
    assert loss.shape == (B,)
    torch.testing.assert_close(loss, torch.zeros(B, dtype=F64), rtol=0, atol=1e-20)
    # any other field has a positive loss
    assert (cfm_loss(Field(lambda x, t, s: torch.zeros_like(x)), target, z, t, obs) > 0).all()


@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("k", [1, 7])
def test_point_mass_field_transports_every_noise_to_the_target(method: str, k: int) -> None:
    target, obs = randn(1, ACT, seed=16).expand(64, ACT), randn(64, OBS, seed=17)
    z = 3.0 * randn(64, ACT, seed=18)
    x1 = integrate(point_mass_field(target), z, obs, k, method)
    torch.testing.assert_close(x1, target, rtol=0, atol=1e-12)


# -- exact CNF likelihood --------------------------------------------------------------------------
def test_cnf_log_prob_of_zero_field_is_standard_normal() -> None:
    action, obs = randn(B, ACT, seed=19), randn(B, OBS, seed=20)
    got = cnf_log_prob(Field(lambda x, t, s: torch.zeros_like(x)), action, obs)
    expected = Normal(0.0, 1.0).log_prob(action).sum(-1)
    assert got.shape == (B,)
    torch.testing.assert_close(got, expected.to(F64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_cnf_log_prob_of_gaussian_rectified_flow(c: float) -> None:
    """The analytic field maps N(0, I) to N(0, c^2 I); its likelihood must be that Gaussian's."""
    action, obs = 1.5 * randn(B, 3, seed=21), randn(B, OBS, seed=22)
    got = cnf_log_prob(gaussian_target_field(c), action, obs)
    torch.testing.assert_close(got, Normal(0.0, c).log_prob(action).sum(-1), rtol=0, atol=1e-5)
    # and the flow map itself sends z to c z
    z = randn(B, 3, seed=23)
    torch.testing.assert_close(flow_map(gaussian_target_field(c), z, obs), c * z, rtol=0, atol=1e-6)


def test_hutchinson_divergence_agrees_with_exact() -> None:
    net, x, obs = random_velocity(1), randn(B, ACT, seed=24), randn(B, OBS, seed=25)
    t = torch.full((B,), 0.3, dtype=F64)
    v, exact = divergence(net, x, t, obs)
    torch.testing.assert_close(v, net(x, t, obs).detach())
    single = lambda xi, ti, oi: net(xi[None], ti[None], oi[None])[0]  # noqa: E731
    jac = torch.func.vmap(torch.func.jacrev(single))(x, t, obs)  # (B, A, A)
    torch.testing.assert_close(exact, jac.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=0, atol=1e-12)
    off = jac.square().sum((-2, -1)) - jac.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    assert (off > 1e-3).all()  # coupled dims: a single Rademacher probe is not already exact
    n_probes = 4000
    probes = (2 * torch.randint(0, 2, (n_probes, B, ACT), generator=gen(26)) - 1).to(F64)
    _, estimate = divergence(net, x, t, obs, probes)
    sd = (2 * off / n_probes).sqrt()  # Rademacher variance of the P-probe mean
    assert ((estimate - exact).abs() < 5 * sd).all()
    _, one = divergence(net, x, t, obs, probes[:1])
    assert not torch.allclose(one, exact, atol=1e-6)


def test_cnf_log_prob_hutchinson_agrees_with_exact_divergence() -> None:
    net, action, obs = random_velocity(2), randn(B, ACT, seed=27), randn(B, OBS, seed=28)
    ode = dict(method="rk4", n_steps=20)
    exact = cnf_log_prob(net, action, obs, exact_divergence=True, **ode)
    hutch = cnf_log_prob(net, action, obs, exact_divergence=False, n_probes=400, generator=gen(29), **ode)
    one = cnf_log_prob(net, action, obs, exact_divergence=False, n_probes=1, generator=gen(29), **ode)
    assert (hutch - exact).abs().max() < 0.05 < (one - exact).abs().max()
    # default: exact trace for A <= 8 (no probes drawn), Hutchinson above
    g = gen(30)
    state = g.get_state()
    torch.testing.assert_close(cnf_log_prob(net, action, obs, generator=g, **ode), exact, rtol=0, atol=1e-12)
    assert torch.equal(g.get_state(), state)


def test_conditional_log_prob_is_gaussian_around_the_flow_map() -> None:
    net, z, obs = random_velocity(3), randn(B, ACT, seed=31), randn(B, OBS, seed=32)
    log_std = torch.tensor([-0.5, 0.2], dtype=F64)
    phi1 = flow_map(net, z, obs)
    # the K-step sampler converges to the CNF's own map
    torch.testing.assert_close(integrate(net, z, obs, 400, "midpoint"), phi1.detach(), rtol=0, atol=1e-5)
    action = phi1.detach() + 0.3 * randn(B, ACT, seed=33)
    got = conditional_log_prob(net, action, z, obs, log_std)
    expected = Normal(phi1, log_std.exp()).log_prob(action).sum(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_conditioned_fast_path_matches_the_plain_forward(method: str) -> None:
    """integrate() precomputes the obs/time part of the first layer; it must equal forward()."""
    from genrl_policies.flow import VelocityNet, integrate, time_grid

    torch.manual_seed(0)
    net = VelocityNet(4, 3, (32, 32)).double()
    for p in net.parameters():  # leave the zero-initialised output layer: make the field non-trivial
        torch.nn.init.normal_(p, std=0.3)
    obs, z = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    times = time_grid(5, method)
    fast = net.conditioned(obs, times)
    for k, t in enumerate(times):
        torch.testing.assert_close(fast(z, k), net(z, t.expand(6).double(), obs), rtol=1e-12, atol=1e-12)

    class Plain(torch.nn.Module):  # the generic path of integrate(), same weights
        def forward(self, x, t, o):
            return net(x, t, o)

    torch.testing.assert_close(integrate(net, z, obs, 5, method), integrate(Plain(), z, obs, 5, method), rtol=1e-12, atol=1e-12)

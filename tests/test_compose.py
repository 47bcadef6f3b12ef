"""GPC test-time composition (policies.compose, policies.denoisers): design notes §9.5."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from genrl_policies import denoisers as dn
from genrl_policies.base import PolicyModule
from genrl_policies.compose import ComposedPolicy, combine, coverage_weights
from genrl_policies.diffusion import DiffusionConfig, DiffusionPolicy, cosine_beta_schedule
from genrl_policies.fpo import FPOConfig, FPOPolicy
from genrl_policies.gaussian import GaussianPolicy
from genrl_policies.policyflow import PolicyFlowConfig, PolicyFlowPolicy

OBS, ACT, B = 5, 3, 6
H = (32, 32)
CONFIGS = {
    "diffusion": lambda **kw: DiffusionConfig(hidden_sizes=H, **kw),
    "diffusion_ft": lambda **kw: DiffusionConfig(hidden_sizes=H, ft_denoising_steps=4, **kw),
    "policyflow": lambda **kw: PolicyFlowConfig(hidden_sizes=H, **kw),
    "fpo": lambda **kw: FPOConfig(hidden_sizes=H, **{"exploration_noise": 0.2, **kw}),
}
CLASSES = {"diffusion": DiffusionPolicy, "diffusion_ft": DiffusionPolicy, "policyflow": PolicyFlowPolicy, "fpo": FPOPolicy}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(kind: str, seed: int, obs_dim: int = OBS, action_dim: int = ACT, **cfg: object) -> PolicyModule:
    """A parent with parameters moved off the zero-init heads (every parent different)."""
    torch.manual_seed(seed)
    policy = CLASSES[kind](obs_dim, action_dim, CONFIGS[kind](**cfg))
    g = gen(seed + 100)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


def observations(obs_dim: int = OBS, seed: int = 1) -> Tensor:
    return torch.randn(B, obs_dim, generator=gen(seed))


def act(policy: nn.Module, obs: Tensor, deterministic: bool, seed: int = 7) -> Tensor:
    return policy.act(obs, deterministic=deterministic, generator=gen(seed))[0]


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- endpoints, self-composition, simplex ----------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_endpoint_weights_reproduce_each_parent_bitwise(kind: str, deterministic: bool) -> None:
    a, b = make(kind, 0), make(kind, 1)
    obs = observations()
    assert not torch.equal(act(a, obs, deterministic), act(b, obs, deterministic))
    assert torch.equal(act(ComposedPolicy([a, b], (1.0, 0.0)), obs, deterministic), act(a, obs, deterministic))
    assert torch.equal(act(ComposedPolicy([a, b], (0.0, 1.0)), obs, deterministic), act(b, obs, deterministic))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_policy_composed_with_itself_is_that_policy(kind: str) -> None:
    a, obs = make(kind, 0), observations()
    for w in (0.3, 0.5, 0.9):
        for deterministic in (False, True):
            torch.testing.assert_close(act(ComposedPolicy([a, a], (w, 1 - w)), obs, deterministic), act(a, obs, deterministic), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["diffusion", "policyflow"])
def test_three_parents_on_the_simplex(kind: str) -> None:
    parents, obs = [make(kind, s) for s in range(3)], observations()
    for i in range(3):
        w = [0.0, 0.0, 0.0]
        w[i] = 1.0
        assert torch.equal(act(ComposedPolicy(parents, w), obs, False), act(parents[i], obs, False))
    mixed = act(ComposedPolicy(parents, (0.2, 0.3, 0.5)), obs, False)
    assert all(not torch.allclose(mixed, act(p, obs, False)) for p in parents)


def test_interior_weights_mix_eps_in_one_ddpm_step() -> None:
    parents = [make("diffusion", s, n_denoising_steps=1, denoised_clip=None) for s in range(3)]
    obs, w = observations(), (0.2, 0.3, 0.5)
    x, k = torch.zeros(B, ACT), torch.zeros(B, dtype=torch.long)
    eps = sum(wi * p.predict_eps(x, k, obs) for wi, p in zip(w, parents, strict=True))
    expected = parents[0].mean_from_eps(x, k, eps)
    torch.testing.assert_close(act(ComposedPolicy(parents, w), obs, True), expected, atol=1e-6, rtol=1e-5)


def test_interior_weights_mix_velocities_in_one_euler_step() -> None:
    parents = [make("policyflow", s, n_steps=1, method="euler") for s in range(2)]
    obs, w = observations(), (0.4, 0.6)
    x, t = torch.zeros(B, ACT), torch.zeros(B)
    expected = x + sum(wi * p.velocity(x, t, obs) for wi, p in zip(w, parents, strict=True))
    torch.testing.assert_close(act(ComposedPolicy(parents, w), obs, True), expected, atol=1e-6, rtol=1e-5)


def test_flow_families_mix_and_each_endpoint_is_its_parent() -> None:
    pf = make("policyflow", 0, method="euler")
    fpo = make("fpo", 1, exploration_noise=0.0)
    obs = observations()
    assert torch.equal(act(ComposedPolicy([pf, fpo], (1.0, 0.0)), obs, False), act(pf, obs, False))
    # PolicyFlow leads (same Euler grid and random start); its action noise gets weight 0
    assert torch.equal(act(ComposedPolicy([pf, fpo], (0.0, 1.0)), obs, False), act(fpo, obs, False))


# -- cross-family ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flow", ["policyflow", "fpo"])
def test_cross_family_endpoint_reproduces_the_leading_diffusion_parent(flow: str) -> None:
    d, f, obs = make("diffusion", 0), make(flow, 1), observations()
    for deterministic in (False, True):
        assert torch.equal(act(ComposedPolicy([d, f], (1.0, 0.0)), obs, deterministic), act(d, obs, deterministic))
        assert torch.equal(act(ComposedPolicy([f, d], (0.0, 1.0)), obs, deterministic), act(d, obs, deterministic))  # DDPM leads
    assert ComposedPolicy([f, d], (0.5, 0.5)).lead == 1


class GaussianEps(nn.Module):
    """The exact eps-prediction of a DDPM whose actions are N(m(s), S^2 I), m(s) = s * M."""

    def __init__(self, alphas_cumprod: Tensor, mean: Tensor, std: float) -> None:
        super().__init__()
        self.abar, self.mean, self.var, self.K = alphas_cumprod, mean, std**2, alphas_cumprod.numel()

    def forward(self, x: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        abar = self.abar[torch.round(t * self.K).long()].unsqueeze(-1)
        m = obs[:, :1] * self.mean
        return (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * self.var + 1 - abar)


class GaussianVelocity(nn.Module):
    """The exact rectified-flow velocity E[a - z | x_t] for the same Gaussian actions."""

    def __init__(self, mean: Tensor, std: float) -> None:
        super().__init__()
        self.mean, self.var = mean, std**2

    def forward(self, y: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        t = t.reshape(-1, 1)
        m = obs[:, :1] * self.mean
        denom = t * t * self.var + (1 - t) ** 2
        return m + t * self.var * (y - t * m) / denom - (1 - t) * (y - t * m) / denom


def test_vp_to_rf_map_turns_an_exact_velocity_into_the_exact_eps() -> None:
    mean, std = torch.tensor([0.5, -0.6], dtype=torch.float64), 0.3
    abar = torch.cumprod(1 - cosine_beta_schedule(10), 0)
    eps_net, vel_net = GaussianEps(abar, mean, std), GaussianVelocity(mean, std)
    obs = torch.tensor([[1.0], [-1.0], [0.5]], dtype=torch.float64)
    x = torch.randn(3, 2, generator=gen(0), dtype=torch.float64)
    for k in range(10):
        y, t = dn.vp_to_rf(x, float(abar[k]))
        eps_flow = dn.velocity_to_eps(y, vel_net(y, torch.full((3,), t, dtype=torch.float64), obs), t)
        eps_ddpm = eps_net(x, torch.full((3,), k / 10, dtype=torch.float64), obs)
        torch.testing.assert_close(eps_flow, eps_ddpm, atol=1e-12, rtol=1e-10)


def test_cross_family_composition_of_exact_parents_is_the_ddpm_sampler() -> None:
    mean, std = torch.tensor([0.5, -0.6], dtype=torch.float64), 0.3
    d = DiffusionPolicy(1, 2, DiffusionConfig(hidden_sizes=(8,), denoised_clip=None, noise_clamp=None)).double()
    d.net = GaussianEps(torch.cumprod(1 - cosine_beta_schedule(10), 0), mean, std)
    f = PolicyFlowPolicy(1, 2, PolicyFlowConfig(hidden_sizes=(8,))).double()
    f.velocity = GaussianVelocity(mean, std)
    obs = torch.tensor([[1.0], [-1.0], [0.5], [0.0]], dtype=torch.float64)
    for deterministic in (False, True):
        ref = act(d, obs, deterministic)
        for w in ((0.5, 0.5), (0.0, 1.0)):
            torch.testing.assert_close(act(ComposedPolicy([d, f], w), obs, deterministic), ref, atol=1e-9, rtol=0)


# -- conversions -------------------------------------------------------------------------------------
def test_conversions_are_exact_inverses() -> None:
    g = gen(3)
    x, p = (torch.randn(64, 4, generator=g, dtype=torch.float64) for _ in range(2))
    abar = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    t = torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01

    def close(a: Tensor, b: Tensor) -> None:
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)

    close(dn.score_to_eps(dn.eps_to_score(p, sigma), sigma), p)
    close(dn.x0_to_eps(x, dn.eps_to_x0(x, p, alpha, sigma), alpha, sigma), p)
    close(dn.vpred_to_eps(x, dn.eps_to_vpred(x, p, alpha, sigma), alpha, sigma), p)
    close(dn.velocity_to_eps(x, dn.eps_to_velocity(x, p, t), t), p)
    close(dn.eps_to_velocity(x, dn.velocity_to_eps(x, p, t), t), p)
    close(dn.x0_to_velocity(x, dn.velocity_to_x0(x, p, t), t), p)
    close(dn.velocity_to_x0(x, p, t), dn.eps_to_x0(x, dn.velocity_to_eps(x, p, t), t, 1 - t))  # RF is alpha = t
    for a in (1e-4, 0.3, 0.9, 1.0):
        y, tt = dn.vp_to_rf(x, a)
        back, a2 = dn.rf_to_vp(y, tt)
        close(back, x)
        assert math.isclose(a2, a, rel_tol=1e-12)
    with pytest.raises(ValueError, match="alpha_bar"):
        dn.vp_to_rf(x, 0.0)


def test_convex_velocity_mix_equals_convex_eps_mix_only_when_weights_sum_to_one() -> None:
    g = gen(4)
    x, v1, v2 = (torch.randn(16, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t, dt = 0.35, 0.1

    def step_via_eps(w: tuple[float, float]) -> Tensor:
        eps = w[0] * dn.velocity_to_eps(x, v1, t) + w[1] * dn.velocity_to_eps(x, v2, t)
        return x + dt * dn.eps_to_velocity(x, eps, t)

    def step_via_x0(w: tuple[float, float]) -> Tensor:
        x0 = w[0] * dn.velocity_to_x0(x, v1, t) + w[1] * dn.velocity_to_x0(x, v2, t)
        return x + dt * dn.x0_to_velocity(x, x0, t)

    for w in ((0.3, 0.7), (1.0, 0.0), (0.5, 0.5)):
        by_velocity = x + dt * (w[0] * v1 + w[1] * v2)
        torch.testing.assert_close(step_via_eps(w), by_velocity, atol=1e-12, rtol=0)
        torch.testing.assert_close(step_via_x0(w), by_velocity, atol=1e-12, rtol=0)
    w = (0.7, 0.6)  # CFG / AND-like sums differ by (sum w - 1) times an x-dependent term
    assert (step_via_eps(w) - (x + dt * (w[0] * v1 + w[1] * v2))).abs().max() > 1e-2
    # eps- and score-space mixes agree on a shared sigma (VP): s = -eps / sigma is linear
    e1, e2, sigma = v1, v2, 0.6
    mix_eps = 0.3 * e1 + 0.7 * e2
    mix_score = 0.3 * dn.eps_to_score(e1, sigma) + 0.7 * dn.eps_to_score(e2, sigma)
    torch.testing.assert_close(dn.score_to_eps(mix_score, sigma), mix_eps, atol=1e-12, rtol=0)


# -- chunks of different horizons, observation views -------------------------------------------------
def test_coverage_weights_mix_the_shared_prefix_and_keep_the_longer_tail() -> None:
    w = coverage_weights((0.25, 0.75), (4, 2))
    assert w[0].tolist() == [0.25, 0.25, 1.0, 1.0] and w[1].tolist() == [0.75, 0.75]
    assert coverage_weights((0.0, 1.0), (4, 2))[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert coverage_weights((0.5, 0.5), (3, 3)) == [0.5, 0.5]
    a, b = torch.ones(2, 4), torch.full((2, 2), 3.0)
    assert combine([a, b], w, 4).tolist() == [[2.5, 2.5, 1.0, 1.0]] * 2


def test_heterogeneous_chunks_compose_on_the_prefix() -> None:
    long_ = make("diffusion", 0, action_dim=4, n_denoising_steps=1, denoised_clip=None)
    short = make("diffusion", 1, action_dim=2, n_denoising_steps=1, denoised_clip=None)
    obs = observations()
    with pytest.raises(ValueError, match="action_step_dim") as exc:
        ComposedPolicy([long_, short], (0.5, 0.5))
    one_line_error(exc)
    with pytest.raises(ValueError, match="whole chunks"):
        ComposedPolicy([long_, short], (0.5, 0.5), action_step_dim=3)
    assert torch.equal(act(ComposedPolicy([long_, short], (1.0, 0.0), action_step_dim=2), obs, False), act(long_, obs, False))
    x, k = torch.zeros(B, 4), torch.zeros(B, dtype=torch.long)
    eps = long_.predict_eps(x, k, obs)
    eps = torch.cat([0.5 * eps[:, :2] + 0.5 * short.predict_eps(x[:, :2], k, obs), eps[:, 2:]], dim=1)
    composed = ComposedPolicy([long_, short], (0.5, 0.5), action_step_dim=2)
    torch.testing.assert_close(act(composed, obs, True), long_.mean_from_eps(x, k, eps), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["policyflow", "fpo"])
def test_heterogeneous_flow_chunks_keep_the_endpoints_and_the_long_tail(kind: str) -> None:
    long_, short, obs = make(kind, 0, action_dim=4), make(kind, 1, action_dim=2), observations()
    for deterministic in (False, True):
        composed = ComposedPolicy([long_, short], (1.0, 0.0), action_step_dim=2)
        assert torch.equal(act(composed, obs, deterministic), act(long_, obs, deterministic))
    mixed = act(ComposedPolicy([long_, short], (0.0, 1.0), action_step_dim=2), obs, False)
    assert mixed.shape == (B, 4) and torch.isfinite(mixed).all()
    assert not torch.allclose(mixed[:, :2], act(long_, obs, False)[:, :2])


def test_each_parent_gets_its_own_observation_view() -> None:
    a, b = make("diffusion", 0, obs_dim=5), make("diffusion", 1, obs_dim=3)
    obs = observations(obs_dim=8)
    fns = [lambda o: o[:, :5], lambda o: o[:, 5:]]
    assert torch.equal(act(ComposedPolicy([a, b], (1.0, 0.0), fns), obs, False), act(a, obs[:, :5], False))
    assert torch.equal(act(ComposedPolicy([a, b], (0.0, 1.0), fns, obs_dim=8), obs, False), act(b, obs[:, 5:], False))
    with pytest.raises(ValueError, match="obs_fns") as exc:
        ComposedPolicy([a, b], (0.5, 0.5))
    one_line_error(exc)
    with pytest.raises(ValueError, match=r"parent 1 sees obs of shape \(1, 2\)"):
        ComposedPolicy([a, b], (0.5, 0.5), [None, lambda o: o[:, :2]], obs_dim=5)
    with pytest.raises(ValueError, match="parent 1 sees obs"):
        act(ComposedPolicy([a, b], (0.5, 0.5), [None, lambda o: o[:, :2]]), obs[:, :5], False)


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("weights", "match"),
    [((1.0,), "1 weights for 2"), ((0.6, 0.6), "sum to 1"), ((-0.1, 1.1), ">= 0"), ((math.nan, 1.0), ">= 0"), (("a", 1.0), "numbers"), ((0.5, 0.4999), "sum to 1")],
)
def test_bad_weights_are_refused(weights: tuple, match: str) -> None:
    a, b = make("diffusion", 0), make("diffusion", 1)
    with pytest.raises(ValueError, match=match) as exc:
        ComposedPolicy([a, b], weights)
    one_line_error(exc)


def test_weights_are_used_as_given() -> None:
    a, b = make("diffusion", 0), make("diffusion", 1)
    assert ComposedPolicy([a, b], (0.5, 0.5 + 5e-7)).weights == (0.5, 0.5 + 5e-7)


def test_incompatible_parents_are_refused() -> None:
    d = make("diffusion", 0)
    cases = [
        ([d, GaussianPolicy(OBS, ACT)], "gaussian policy has no denoiser"),
        ([d, make("diffusion", 1, n_denoising_steps=5)], "n_denoising_steps"),
        ([d, make("diffusion", 1, min_sampling_std=0.2)], "min_sampling_std"),
        ([d, make("diffusion", 1, denoised_clip=None)], "denoised_clip"),
        ([d, make("diffusion", 1, action_dim=ACT + 1)], "action dims"),
        ([d, nn.Linear(2, 2)], "Linear"),
        ([], "at least one parent"),
    ]
    for parents, match in cases:
        with pytest.raises(ValueError, match=match) as exc:
            ComposedPolicy(parents, [1.0] + [0.0] * (len(parents) - 1) if parents else [])
        one_line_error(exc)


def test_superposition_operators_are_refused_with_a_reason() -> None:
    a, b = make("diffusion", 0), make("diffusion", 1)
    for op in ("and", "or"):
        with pytest.raises(ValueError, match="not supported: it needs Itô log-density") as exc:
            ComposedPolicy([a, b], (0.5, 0.5), operator=op)
        one_line_error(exc)
    with pytest.raises(ValueError, match="unknown operator"):
        ComposedPolicy([a, b], (0.5, 0.5), operator="mean")


def test_composition_looks_like_a_policy_to_evaluation_code() -> None:
    c = ComposedPolicy([make("diffusion", 0), make("fpo", 1)], (0.5, 0.5))
    assert next(c.parameters()) is not None and c.obs_dim == OBS and c.action_dim == ACT
    c.eval()
    action, record = c.act(observations(), deterministic=True)
    assert action.shape == (B, ACT) and record is None and torch.isfinite(action).all()
    assert c.describe() == {"family": "composed", "parents": ["diffusion", "fpo"], "weights": [0.5, 0.5], "lead": 0}

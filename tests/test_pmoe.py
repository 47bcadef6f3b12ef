"""PMOE policy: K = 1 reduces to the Gaussian, mixture log-prob, the three mixing estimators."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from genrl_policies.base import load_pretrained
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy
from genrl_policies.pmoe import (
    PMOEConfig,
    PMOEPolicy,
    PMOERecord,
    gumbel_softmax_weights,
    score_function_surrogate,
)

OBS, ACT = 3, 2


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> PMOEPolicy:
    torch.manual_seed(seed)
    return PMOEPolicy(OBS, ACT, PMOEConfig(hidden_sizes=(8, 8), q_hidden_sizes=(8,), **kw)).to(dtype)


def randomise_(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    """Move every parameter away from its (near-zero) init so experts and alpha differ."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


class FixedQ(nn.Module):
    """Parameter-free stand-in for the auxiliary Q: q(s, a) = -sum_a (a - target)^2."""

    def __init__(self, obs_dim: int, target: float) -> None:
        super().__init__()
        self.obs_dim, self.target = obs_dim, target

    def forward(self, x: Tensor) -> Tensor:
        return -(x[..., self.obs_dim :] - self.target).square().sum(-1, keepdim=True)


# -- 1. K = 1 is the Gaussian policy ---------------------------------------------------------------
def test_single_expert_equals_gaussian() -> None:
    torch.manual_seed(0)
    gauss = GaussianPolicy(OBS, ACT, GaussianConfig(hidden_sizes=(8, 8))).double()
    pmoe = make(1, n_experts=1)
    randomise_(gauss, 1)
    with torch.no_grad():  # copy the Gaussian mean net and log std into the single expert
        for i in (0, 2):
            pmoe.trunk[i].load_state_dict(gauss.net[i].state_dict())
        pmoe.mean_head.load_state_dict(gauss.net[4].state_dict())
        pmoe.log_std.copy_(gauss.log_std[None])
    obs = torch.randn(16, OBS, generator=gen(2), dtype=torch.float64)
    actions = torch.randn(16, ACT, generator=gen(3), dtype=torch.float64)

    torch.testing.assert_close(pmoe.log_prob(obs, actions), gauss.log_prob(obs, actions), rtol=0, atol=1e-12)
    assert torch.equal(pmoe.mixture(obs)[0].exp(), torch.ones(16, 1, dtype=torch.float64))
    for estimator in ("pmoe", "score"):
        pmoe_e = make(1, n_experts=1, estimator=estimator)
        pmoe_e.load_state_dict(pmoe.state_dict())
        assert pmoe_e.mixing_loss(obs, generator=gen(4)).item() == 0.0
    torch.testing.assert_close(pmoe.regularizer(obs, None), gauss.regularizer(obs, None), rtol=0, atol=1e-12)

    # Same generator -> same action and record; then a PPO step's ratio and its gradient agree.
    a_g, rec_g = gauss.act(obs, generator=gen(5))
    a_p, rec_p = pmoe.act(obs, generator=gen(5))
    torch.testing.assert_close(a_p, a_g, rtol=0, atol=1e-12)
    torch.testing.assert_close(rec_p.log_prob, rec_g.log_prob, rtol=0, atol=1e-12)
    randomise_(gauss, 6, scale=0.1)  # a PPO update moved the parameters; mirror it in the expert
    with torch.no_grad():
        for i in (0, 2):
            pmoe.trunk[i].load_state_dict(gauss.net[i].state_dict())
        pmoe.mean_head.load_state_dict(gauss.net[4].state_dict())
        pmoe.log_std.copy_(gauss.log_std[None])
    adv = torch.randn(16, generator=gen(8), dtype=torch.float64)

    def ppo_loss(policy, record) -> Tensor:
        ratio = policy.log_ratio(obs, record).exp()
        return -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()

    lr_g, lr_p = gauss.log_ratio(obs, rec_g), pmoe.log_ratio(obs, rec_p)
    assert lr_g.abs().max() > 1e-3  # the parameters really moved
    torch.testing.assert_close(lr_p, lr_g, rtol=0, atol=1e-12)
    g_grads = torch.autograd.grad(ppo_loss(gauss, rec_g), list(gauss.net.parameters()) + [gauss.log_std])
    p_params = [*pmoe.trunk[0].parameters(), *pmoe.trunk[2].parameters(), *pmoe.mean_head.parameters()]
    p_grads = torch.autograd.grad(ppo_loss(pmoe, rec_p), p_params + [pmoe.log_std])
    for gg, pg in zip(g_grads, p_grads):
        torch.testing.assert_close(pg.reshape(gg.shape), gg, rtol=0, atol=1e-12)
    mix_grad = torch.autograd.grad(ppo_loss(pmoe, rec_p), list(pmoe.mixing_head.parameters()))
    assert all(torch.all(g == 0) for g in mix_grad)


# -- 2. mixture log-prob ---------------------------------------------------------------------------
def test_mixture_log_prob_matches_torch_and_is_stable() -> None:
    policy = make(0)
    randomise_(policy, 1)
    obs = torch.randn(32, OBS, generator=gen(2), dtype=torch.float64)
    log_alpha, means, log_std = policy.mixture(obs)
    reference = MixtureSameFamily(
        Categorical(logits=log_alpha),
        Independent(Normal(means, log_std.exp().expand_as(means)), 1),
    )
    actions = torch.randn(32, ACT, generator=gen(3), dtype=torch.float64)
    torch.testing.assert_close(policy.log_prob(obs, actions), reference.log_prob(actions), rtol=0, atol=1e-6)

    far = torch.full((32, ACT), 1e3, dtype=torch.float64)
    ours = policy.log_prob(obs, far)
    per_expert = Normal(means, log_std.exp()).log_prob(far[:, None]).sum(-1)
    naive = torch.log((log_alpha.exp() * per_expert.exp()).sum(-1))
    assert torch.all(torch.isinf(naive)) and torch.all(torch.isfinite(ours))
    assert torch.all(ours < -1e4)
    torch.testing.assert_close(ours, reference.log_prob(far), rtol=1e-9, atol=1e-6)


# -- 3. ratio is exactly zero right after act ------------------------------------------------------
@pytest.mark.parametrize("estimator", ["pmoe", "gumbel", "score"])
@pytest.mark.parametrize("mixing_input", ["obs", "features"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_log_ratio_zero_at_act(estimator: str, mixing_input: str, deterministic: bool) -> None:
    policy = make(0, dtype=torch.float32, estimator=estimator, mixing_input=mixing_input)
    randomise_(policy, 1)
    obs = torch.randn(64, OBS, generator=gen(2))
    action, record = policy.act(obs, deterministic=deterministic, generator=gen(3))
    assert isinstance(record, PMOERecord)
    assert record.action.shape == (64, ACT) and record.log_prob.shape == (64,)
    assert not action.requires_grad and not record.action.requires_grad and not record.log_prob.requires_grad
    ratio = policy.log_ratio(obs, record)
    assert ratio.requires_grad
    assert torch.equal(ratio, torch.zeros(64))
    loss, stats = policy.auxiliary_loss(obs, record, torch.randn(64, generator=gen(4)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(stats) >= {"pmoe/q_loss", "pmoe/mixing_loss", "pmoe/alpha_entropy"}
    assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())


def test_deterministic_expert_choice() -> None:
    obs = torch.randn(200, OBS, generator=gen(2), dtype=torch.float64)
    argmax_policy = make(0, deterministic_expert="argmax")
    randomise_(argmax_policy, 1, scale=2.0)
    log_alpha, means, _ = argmax_policy.mixture(obs)
    expected = means[torch.arange(200), log_alpha.argmax(-1)]
    a1, _ = argmax_policy.act(obs, deterministic=True, generator=gen(3))
    a2, _ = argmax_policy.act(obs, deterministic=True, generator=gen(4))
    assert torch.equal(a1, expected) and torch.equal(a2, expected)

    sample_policy = make(0)  # default "sample": a = mu_k, k ~ alpha (official code)
    sample_policy.load_state_dict(argmax_policy.state_dict())
    a, _ = sample_policy.act(obs, deterministic=True, generator=gen(3))
    is_a_mean = (a[:, None] == means).all(-1)  # (B, M)
    assert torch.all(is_a_mean.sum(-1) == 1)
    assert not torch.equal(a, expected)  # some rows picked a non-argmax expert


# -- 4. frequency property of the PMOE estimator ---------------------------------------------------
def test_pmoe_mixing_converges_to_win_frequency() -> None:
    torch.manual_seed(0)
    policy = PMOEPolicy(1, 1, PMOEConfig(n_experts=2, hidden_sizes=(4,), q_hidden_sizes=(4,))).double()
    with torch.no_grad():  # experts N(0, 1) and N(0.5, 0.5^2); alpha starts far off, at ~(0.98, 0.02)
        policy.mean_head.weight.zero_()
        policy.mean_head.bias.copy_(torch.tensor([0.0, 0.5]))
        policy.log_std.copy_(torch.tensor([[0.0], [math.log(0.5)]]))
        policy.mixing_head.weight.zero_()
        policy.mixing_head.bias.copy_(torch.tensor([2.0, -2.0]))
    policy.q = FixedQ(obs_dim=1, target=0.5)  # the expert sample closer to 0.5 wins
    g = gen(123)  # Monte Carlo win frequency of expert 1
    x0 = torch.randn(400_000, generator=g, dtype=torch.float64)
    x1 = 0.5 + 0.5 * torch.randn(400_000, generator=g, dtype=torch.float64)
    freq1 = ((x1 - 0.5).abs() < (x0 - 0.5).abs()).double().mean().item()
    assert 0.6 < freq1 < 0.8  # far from both the start (0.02) and uniform

    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not n.startswith("mixing_head")}
    opt = torch.optim.SGD(policy.mixing_head.parameters(), lr=1.0)
    obs = torch.full((512, 1), 0.7, dtype=torch.float64)
    g = gen(7)
    alphas = []
    for step in range(250):
        opt.zero_grad()
        policy.mixing_loss(obs, generator=g).backward()
        opt.step()
        if step >= 100:
            alphas.append(policy.mixture(obs[:1])[0].exp()[0, 1].item())
    assert abs(sum(alphas) / len(alphas) - freq1) < 0.015
    for n, p in policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


# -- 5. only alpha learns from the mixing loss -----------------------------------------------------
@pytest.mark.parametrize("estimator", ["pmoe", "gumbel", "score"])
@pytest.mark.parametrize("mixing_input", ["obs", "features"])
def test_mixing_loss_trains_only_alpha(estimator: str, mixing_input: str) -> None:
    policy = make(0, estimator=estimator, mixing_input=mixing_input)
    randomise_(policy, 1)
    obs = torch.randn(32, OBS, generator=gen(2), dtype=torch.float64)
    loss = policy.mixing_loss(obs, generator=gen(3))
    names, params = zip(*policy.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for name, grad in zip(names, grads):
        if name.startswith("mixing_head"):
            assert grad is not None and grad.abs().sum() > 0, name
        else:  # trunk (detached features), mean head, log std, Q
            assert grad is None or torch.all(grad == 0), name


def test_auxiliary_loss_q_regression_and_coefs() -> None:
    policy = make(0, mixing_coef=0.0, q_coef=2.0)
    obs = torch.randn(32, OBS, generator=gen(2), dtype=torch.float64)
    _, record = policy.act(obs, generator=gen(3))
    returns = torch.randn(32, generator=gen(4), dtype=torch.float64)
    loss, stats = policy.auxiliary_loss(obs, record, returns)
    q = policy.q(torch.cat([obs, record.action], -1)).squeeze(-1)
    torch.testing.assert_close(loss, 2.0 * (q - returns).square().mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["pmoe/q_loss"], (q - returns).square().mean().detach(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="returns"):
        policy.auxiliary_loss(obs, record, returns[:, None])


def test_regularizer_is_entropy_upper_bound() -> None:
    """sum_k alpha_k H(N_k) <= H(mixture) <= regularizer = H(alpha) + sum_k alpha_k H(N_k)."""
    policy = make(0)
    randomise_(policy, 1)
    obs = torch.randn(4, OBS, generator=gen(2), dtype=torch.float64)
    bound = policy.regularizer(obs, None)
    assert bound.requires_grad and bound.shape == (4,)
    log_alpha, _, log_std = policy.mixture(obs)
    alpha = log_alpha.exp()
    mean_expert_entropy = (alpha * Normal(0.0, log_std.exp()).entropy().sum(-1)).sum(-1)
    torch.testing.assert_close(bound, mean_expert_entropy - (alpha * log_alpha).sum(-1), rtol=1e-12, atol=0)
    many = obs.repeat_interleave(10_000, 0)
    _, record = policy.act(many, generator=gen(3))
    mc_entropy = -policy.log_prob(many, record.action).detach().view(4, -1).mean(-1)
    assert torch.all(bound >= mc_entropy - 0.05)
    assert torch.all(mc_entropy >= mean_expert_entropy.detach() - 0.05)
    assert torch.all(bound - mean_expert_entropy > 0.1)  # the two sides are really different


# -- 6. Gumbel-Softmax -----------------------------------------------------------------------------
def test_gumbel_weights_low_temperature_and_straight_through() -> None:
    logits = torch.randn(64, 4, generator=gen(0), dtype=torch.float64)
    # Same Gumbel draw (same seed) at falling temperatures: the distance to one-hot shrinks to 0.
    # A row is within 1e-3 of one-hot once tau << its top-2 gap; at tau = 1e-3 one of these 64
    # rows has a gap of ~4e-3 (weights 0.989 / 0.011), so the all-rows check uses tau = 1e-4.
    dist = {}
    for tau in (3.0, 1.0, 0.1, 1e-3, 1e-4):
        y = gumbel_softmax_weights(logits, tau, generator=gen(1))
        torch.testing.assert_close(y.sum(-1), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-12)
        dist[tau] = 1 - y.max(-1).values  # (B,)
    assert dist[3.0].mean() > dist[1.0].mean() > dist[0.1].mean() > dist[1e-3].mean() > 0
    assert (dist[1e-3] < 1e-3).double().mean() > 0.95
    assert torch.all(dist[1e-4] < 1e-3)

    logits.requires_grad_(True)
    hard = gumbel_softmax_weights(logits, 0.5, hard=True, generator=gen(2))
    soft = gumbel_softmax_weights(logits, 0.5, hard=False, generator=gen(2))
    one_hot = torch.nn.functional.one_hot(soft.argmax(-1), 4).to(soft.dtype)
    assert torch.equal(hard.detach(), one_hot)  # exactly one-hot forward
    w = torch.randn(64, 4, generator=gen(3), dtype=torch.float64)
    g_hard = torch.autograd.grad((hard * w).sum(), logits)[0]
    g_soft = torch.autograd.grad((soft * w).sum(), logits)[0]
    torch.testing.assert_close(g_hard, g_soft, rtol=0, atol=1e-12)  # straight-through backward


# -- 7. score-function estimator is unbiased -------------------------------------------------------
def test_score_function_gradient_unbiased() -> None:
    n = 20_000
    logits = torch.tensor([0.4, -0.6], dtype=torch.float64)
    q = torch.tensor([1.0, 3.0], dtype=torch.float64)
    batch_logits = logits.expand(n, 2).clone().requires_grad_(True)
    surrogate = score_function_surrogate(torch.log_softmax(batch_logits, -1), q.expand(n, 2), gen(0))
    per_sample = torch.autograd.grad(surrogate.sum(), batch_logits)[0]  # (n, 2)
    estimate, stderr = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)

    exact_logits = logits.clone().requires_grad_(True)
    exact = torch.autograd.grad((torch.softmax(exact_logits, -1) * q).sum(), exact_logits)[0]
    assert torch.all(stderr > 0)
    assert torch.all((estimate - exact).abs() < 4 * stderr)
    assert torch.all(exact.abs() > 10 * stderr)  # the test can tell a wrong sign or scale


# -- 8. save/load and input validation -------------------------------------------------------------
def test_save_load_round_trip(tmp_path) -> None:
    policy = make(0, dtype=torch.float32, estimator="gumbel", mixing_input="features", n_experts=3)
    randomise_(policy, 1)
    policy.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, family="pmoe")
    assert isinstance(loaded, PMOEPolicy) and loaded.config == policy.config
    obs = torch.randn(10, OBS, generator=gen(2))
    for deterministic in (True, False):
        a1, r1 = policy.act(obs, deterministic=deterministic, generator=gen(3))
        a2, r2 = loaded.act(obs, deterministic=deterministic, generator=gen(3))
        assert torch.equal(a1, a2) and torch.equal(r1.log_prob, r2.log_prob)


def test_bad_obs_shape_raises() -> None:
    policy = make(0, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        policy.act(torch.zeros(4, OBS + 1))
    with pytest.raises(ValueError):
        policy.act(torch.zeros(OBS))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_experts": 0}, "n_experts"),
        ({"estimator": "reinforce"}, "reinforce"),
        ({"gumbel_tau": 0.0}, "gumbel_tau"),
        ({"gumbel_tau": -1.0}, "gumbel_tau"),
        ({"mixing_input": "hidden"}, "hidden"),
        ({"deterministic_expert": "mode"}, "mode"),
        ({"hidden_sizes": ()}, "hidden_sizes"),
        ({"activation": "gelu2"}, "gelu2"),
        ({"mixing_coef": -1.0}, "mixing_coef"),
    ],
)
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PMOEConfig(**kwargs)

"""PMOE-SAC (``--algo sac --policy pmoe``, genrl.algos.pmoe_sac): K = 1 is Gaussian SAC, the actor
gradient reaches only the best expert, the mixing head, its frequency property, the critic
target's sampled expert, a transcription of the official formulas, the Gumbel / score-ratio
variants, config errors, and a CLI run with bitwise resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compare import assert_same_nested, assert_same_tensors
from torch import Tensor, nn
from torch.distributions import AffineTransform, Categorical, Independent, MixtureSameFamily, Normal, TanhTransform, TransformedDistribution

from genrl import cli
from genrl.agent import Agent
from genrl.algos import pmoe_sac
from genrl.algos.sac import SAC, SACConfig, soft_q_target, temperature_loss
from genrl.checkpoint import checkpoint_steps
from genrl.config import config_from_dict
from genrl.errors import ConfigError
from genrl.logger import read_csv
from genrl.replay import Batch
from genrl.trainer import train
from genrl_envs.base import EnvSpec
from genrl_policies.base import load_pretrained
from genrl_policies.gaussian import GaussianConfig, GaussianPolicy
from genrl_policies.pmoe import PMOEConfig, PMOEPolicy

OBS, ACT = 3, 2
LOW, HIGH = np.array([-2.0, -1.0], np.float32), np.array([2.0, 3.0], np.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class BoxEnv:
    """Only what SAC's constructor needs: a spec with a finite box, and reset."""

    def __init__(self, low: np.ndarray = LOW, high: np.ndarray = HIGH, obs_dim: int = OBS) -> None:
        self.spec = EnvSpec("box", 1, obs_dim, len(low), low, high, max_episode_steps=None, backend="test")

    def reset(self, seed: int | None = None) -> Tensor:
        return torch.zeros(1, self.spec.obs_dim)

    def close(self) -> None:
        pass


class FixedCritic(nn.Module):
    """A parameter-free twin critic: both heads q(s, a) = -sum_a (a - target)^2."""

    def __init__(self, target: float = 0.0) -> None:
        super().__init__()
        self.target = target

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        q = -(action - self.target).square().sum(-1)
        return q, q


def pmoe(k: int, seed: int = 0, **kw: Any) -> PMOEPolicy:
    torch.manual_seed(seed)
    cfg = {"n_experts": k, "hidden_sizes": (16, 16), "activation": "relu", **pmoe_sac.SAC_SETTINGS, **kw}
    return PMOEPolicy(OBS, ACT, PMOEConfig(**cfg))


def randomise_(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def sac(policy: Any, **cfg: Any) -> SAC:
    config = SACConfig(batch_size=16, buffer_size=64, critic_hidden=(16, 16), policy_frequency=1, **cfg)
    return SAC(policy, BoxEnv(), config, total_steps=100, seed=0)  # type: ignore[arg-type]


def batch(seed: int, n: int = 16) -> Batch:
    g = gen(seed)
    return Batch(torch.randn(n, OBS, generator=g), torch.rand(n, ACT, generator=g), torch.randn(n, generator=g),
                 torch.randn(n, OBS, generator=g), torch.full((n,), 0.99))  # fmt: skip


def fill(algo: SAC, seed: int, steps: int = 4) -> None:
    g = gen(seed)
    for _ in range(steps):
        obs, act = torch.randn(1, OBS, generator=g), torch.rand(1, ACT, generator=g)
        algo.buffer.add(obs, act, torch.randn(1, generator=g), torch.randn(1, OBS, generator=g), torch.tensor([False]), torch.tensor([False]))


# -- the squashed mixture policy -----------------------------------------------------------------------
def test_squashed_mixture_log_prob_matches_torch_and_acts_in_the_box(tmp_path: Path) -> None:
    policy = pmoe(3).double()
    randomise_(policy, 1, scale=0.1)  # |u| moderate: the references' naive tanh Jacobians stay exact
    policy.set_action_box(LOW, HIGH)
    obs = torch.randn(64, OBS, generator=gen(2), dtype=torch.float64)
    action, record = policy.act(obs, generator=gen(3))
    assert torch.all(action >= torch.as_tensor(LOW, dtype=torch.float64)) and torch.all(action <= torch.as_tensor(HIGH, dtype=torch.float64))
    assert torch.equal(policy.log_ratio(obs, record), torch.zeros(64, dtype=torch.float64))
    log_alpha, means, log_std = policy.mixture(obs)
    assert log_std.shape == (64, 3, ACT) and log_std.max() <= 2.0  # state-dependent, clamped
    scale, offset = policy.action_scale, policy.action_offset
    expert = TransformedDistribution(Independent(Normal(means, log_std.exp()), 1), [TanhTransform(), AffineTransform(offset, scale)])
    reference = MixtureSameFamily(Categorical(logits=log_alpha), expert)
    # log-probs of tanh(u) in [-1, 1]^A, as the Gaussian family's: the box's constant log-scale is left out
    torch.testing.assert_close(record.log_prob, reference.log_prob(action) + scale.log().sum(), rtol=0, atol=1e-6)
    torch.testing.assert_close(policy.log_prob(obs, action), record.log_prob, rtol=0, atol=1e-6)
    experts, own, _ = policy.rsample_experts(obs, gen(4))  # each expert's own density of its own action
    u = means + torch.randn(64, 3, ACT, generator=gen(4), dtype=torch.float64) * log_std.exp()  # no inverse tanh
    torch.testing.assert_close(experts, torch.tanh(u) * scale + offset, rtol=0, atol=1e-12)
    torch.testing.assert_close(own, Independent(Normal(means, log_std.exp()), 1).log_prob(u) - torch.log1p(-(torch.tanh(u) ** 2)).sum(-1), rtol=0, atol=1e-6)
    policy.save_pretrained(tmp_path / "p")
    loaded = load_pretrained(tmp_path / "p")
    assert loaded.config == policy.config and torch.equal(loaded.action_scale, scale.float())


# -- K = 1 is Gaussian SAC -------------------------------------------------------------------------
def test_single_expert_pmoe_sac_equals_gaussian_sac() -> None:
    torch.manual_seed(0)
    gauss = GaussianPolicy(OBS, ACT, GaussianConfig(hidden_sizes=(16, 16), activation="relu", squash="tanh", state_dependent_std=True))
    randomise_(gauss, 1)
    mix = pmoe(1)
    with torch.no_grad():  # one expert = the Gaussian: trunk = its hidden layers, heads = its last layer's halves
        for i in (0, 2):
            mix.trunk[i].load_state_dict(gauss.net[i].state_dict())
        mix.mean_head.weight.copy_(gauss.net[4].weight[:ACT]), mix.mean_head.bias.copy_(gauss.net[4].bias[:ACT])
        mix.log_std_head.weight.copy_(gauss.net[4].weight[ACT:]), mix.log_std_head.bias.copy_(gauss.net[4].bias[ACT:])
    a, b = sac(gauss), sac(mix)
    randomise_(a.critic_target, 2)  # the target critic differs from the critic
    b.critic.load_state_dict(a.critic.state_dict()), b.critic_target.load_state_dict(a.critic_target.state_dict())
    with torch.no_grad():
        a.log_alpha.fill_(math.log(0.3)), b.log_alpha.fill_(math.log(0.3))
    alpha = a.log_alpha.detach().exp()
    data = batch(3)

    a.generator.manual_seed(5), b.generator.manual_seed(5)
    torch.testing.assert_close(b.td_target(data, alpha), a.td_target(data, alpha), rtol=1e-6, atol=1e-6)

    a.generator.manual_seed(6), b.generator.manual_seed(6)
    loss_a, logp_a, _ = a.actor_loss(data.obs, alpha)
    loss_b, logp_b, stats = b.actor_loss(data.obs, alpha)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-6, atol=1e-6)
    assert stats["mixing_loss"] == 0 and stats["win_freq_0"] == 1
    torch.testing.assert_close(temperature_loss(b.log_alpha, logp_b, -2.0), temperature_loss(a.log_alpha, logp_a, -2.0), rtol=1e-6, atol=1e-6)
    grads_a = dict(zip([n for n, _ in gauss.named_parameters()], torch.autograd.grad(loss_a, list(gauss.parameters())), strict=True))
    grads_b = dict(zip([n for n, _ in mix.named_parameters()], torch.autograd.grad(loss_b, list(mix.parameters()), allow_unused=True), strict=True))
    for i in (0, 2):
        for p in ("weight", "bias"):
            torch.testing.assert_close(grads_b[f"trunk.{i}.{p}"], grads_a[f"net.{i}.{p}"], rtol=1e-5, atol=1e-6)
    for p in ("weight", "bias"):
        torch.testing.assert_close(grads_b[f"mean_head.{p}"], grads_a[f"net.4.{p}"][:ACT], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads_b[f"log_std_head.{p}"], grads_a[f"net.4.{p}"][ACT:], rtol=1e-5, atol=1e-6)
        assert torch.all(grads_b[f"mixing_head.{p}"] == 0)  # alpha = 1: the mixing loss is identically 0
    assert all(grads_b[n] is None for n in grads_b if n.startswith("q."))  # the auxiliary Q is not used
    assert not ({id(p) for p in mix.q.parameters()} & {id(p) for p in b.actor_params})  # nor optimised

    for algo in (a, b):  # a whole update (critic, actor, temperature, target) from the same buffer
        fill(algo, 7)
        algo.generator.manual_seed(8)
        algo.update({})
    torch.testing.assert_close(b.log_alpha, a.log_alpha, rtol=1e-6, atol=1e-7)
    for pa, pb in zip(a.critic.parameters(), b.critic.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mix.mean_head.weight, gauss.net[4].weight[:ACT], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mix.log_std_head.weight, gauss.net[4].weight[ACT:], rtol=1e-5, atol=1e-6)


# -- the actor gradient reaches only the best expert -----------------------------------------------
def spread_experts(policy: PMOEPolicy) -> None:
    """Experts' means at u = -0.2, 0.3 and 2.5 (far up in the box), small stds."""
    with torch.no_grad():
        policy.mean_head.weight.mul_(0.01)
        policy.mean_head.bias.copy_(torch.tensor([-0.2, 0.3, 2.5]).repeat_interleave(ACT))
        policy.log_std_head.weight.mul_(0.01)
        policy.log_std_head.bias.fill_(math.log(0.3))


def expert_rows(grad: Tensor, k: int) -> Tensor:
    return grad[k * ACT : (k + 1) * ACT]


def test_actor_gradient_reaches_only_the_best_expert() -> None:
    policy = pmoe(3)
    randomise_(policy, 1)
    spread_experts(policy)
    critic = FixedCritic(0.0)  # the box centre (0, 1) is at u = (0, 0.5): expert 2 never wins
    heads = [policy.mean_head.weight, policy.mean_head.bias, policy.log_std_head.weight, policy.log_std_head.bias]
    obs = torch.randn(64, OBS, generator=gen(2))
    loss, _, stats = pmoe_sac.frequency_loss(policy, critic, obs, torch.tensor(0.2), gen(3))
    grads = torch.autograd.grad(loss, heads)
    assert stats["win_freq_2"] == 0 and stats["win_freq_0"] > 0 and stats["win_freq_1"] > 0
    for g in grads:
        assert torch.all(expert_rows(g, 2) == 0) and expert_rows(g, 0).abs().sum() > 0 and expert_rows(g, 1).abs().sum() > 0

    for i in range(6):  # one state at a time: only k*'s rows
        one = obs[i : i + 1]
        action, _, _ = policy.rsample_experts(one, gen(10 + i))
        best = int(pmoe_sac.expert_q(critic, one, action).argmax(-1))
        loss, _, _ = pmoe_sac.frequency_loss(policy, critic, one, torch.tensor(0.2), gen(10 + i))
        for g in torch.autograd.grad(loss, heads):
            for k in range(3):
                assert (expert_rows(g, k).abs().sum() > 0) == (k == best), (i, k, best)


@pytest.mark.parametrize("estimator", ["pmoe", "score"])
def test_mixing_loss_trains_only_the_mixing_head_and_leaves_the_trunk_alone(estimator: str) -> None:
    with_mix, without = pmoe(3, estimator=estimator), pmoe(3, estimator=estimator, mixing_coef=0.0)
    randomise_(with_mix, 1)
    without.load_state_dict(with_mix.state_dict())
    critic = FixedCritic(0.1)
    obs = torch.randn(32, OBS, generator=gen(2))
    grads = {}
    for name, policy in (("with", with_mix), ("without", without)):
        loss, _, _ = pmoe_sac.actor_loss(policy, critic, obs, torch.tensor(0.1), gen(3))
        names, params = zip(*policy.named_parameters(), strict=True)
        grads[name] = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True), strict=True))
    for n, g in grads["with"].items():
        if n.startswith("mixing_head"):
            assert g.abs().sum() > 0 and torch.all(grads["without"][n] == 0), n  # only the mixing loss trains alpha
        elif not n.startswith("q."):
            assert torch.equal(g, grads["without"][n]), n  # the trunk and the experts: unchanged


# -- frequency property --------------------------------------------------------------------------
def test_mixing_weights_converge_to_the_win_frequencies() -> None:
    torch.manual_seed(0)
    policy = PMOEPolicy(1, 1, PMOEConfig(n_experts=2, hidden_sizes=(4,), **pmoe_sac.SAC_SETTINGS))
    with torch.no_grad():  # experts tanh(N(0, 1)) and tanh(N(0.5, 0.5^2)); alpha starts at ~(0.98, 0.02)
        policy.mean_head.weight.zero_(), policy.mean_head.bias.copy_(torch.tensor([0.0, 0.5]))
        policy.log_std_head.weight.zero_(), policy.log_std_head.bias.copy_(torch.tensor([0.0, math.log(0.5)]))
        policy.mixing_head.weight.zero_(), policy.mixing_head.bias.copy_(torch.tensor([2.0, -2.0]))
    critic = FixedCritic(0.4)  # the action closer to 0.4 wins
    g = gen(123)
    x0 = torch.tanh(torch.randn(400_000, generator=g, dtype=torch.float64))
    x1 = torch.tanh(0.5 + 0.5 * torch.randn(400_000, generator=g, dtype=torch.float64))
    freq1 = ((x1 - 0.4).abs() < (x0 - 0.4).abs()).double().mean().item()
    assert 0.6 < freq1 < 0.8  # far from the start and from uniform

    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not n.startswith("mixing_head")}
    opt = torch.optim.SGD(policy.mixing_head.parameters(), lr=1.0)
    obs, g, alphas = torch.full((512, 1), 0.7), gen(7), []
    for step in range(250):
        opt.zero_grad()
        loss, _, _ = pmoe_sac.frequency_loss(policy, critic, obs, torch.tensor(0.2), g)
        loss.backward(inputs=list(policy.mixing_head.parameters()))
        opt.step()
        if step >= 100:
            alphas.append(policy.mixture(obs[:1])[0].exp()[0, 1].item())
    assert abs(sum(alphas) / len(alphas) - freq1) < 0.015
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)


# -- the critic target's expert is sampled from the mixture ------------------------------------------
def test_critic_target_uses_an_expert_sampled_from_alpha() -> None:
    policy = pmoe(3)
    randomise_(policy, 1)
    algo = sac(policy)
    alpha, data = torch.tensor(0.3), batch(2)
    with torch.no_grad():  # alpha one-hot on expert 1
        policy.mixing_head.weight.zero_(), policy.mixing_head.bias.copy_(torch.tensor([-1e4, 0.0, -1e4]))
    algo.generator.manual_seed(5)
    got = algo.td_target(data, alpha)
    g = gen(5)  # by hand: the same draws, expert 1's sample and its own log-density
    log_alpha, means, log_std = policy.mixture(data.next_obs)
    assert torch.equal(torch.multinomial(log_alpha.exp(), 1, generator=g).squeeze(-1), torch.ones(16, dtype=torch.long))
    u = means[:, 1] + torch.randn(16, ACT, generator=g) * log_std[:, 1].exp()
    log_prob = Normal(means[:, 1], log_std[:, 1].exp()).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u.double()) ** 2).sum(-1).float()
    action = torch.tanh(u) * policy.action_scale + policy.action_offset
    want = soft_q_target(data.reward, data.discount, *algo.critic_target(data.next_obs, action), alpha, log_prob)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # alpha = (0.3, 0.7, 0): experts far apart, the action tells which was drawn
        policy.mixing_head.bias.copy_(torch.tensor([math.log(0.3), math.log(0.7), -1e4]))
        policy.mean_head.weight.zero_(), policy.mean_head.bias.copy_(torch.tensor([-3.0, -3.0, 3.0, 3.0, 0.0, 0.0]))
        policy.log_std_head.weight.mul_(0.1), policy.log_std_head.bias.fill_(-1.0)
    obs = torch.randn(20_000, OBS, generator=gen(3))
    action, log_prob = policy.rsample(obs, gen(4))
    upper = action[:, 0] > 0  # box [-2, 2]: expert 1 acts near +2, expert 0 near -2
    assert abs(upper.float().mean().item() - 0.7) < 0.015
    _, means, log_std = policy.mixture(obs)  # the log-prob is the drawn expert's own, not the mixture's
    k = upper.long()
    u = torch.atanh(((action - policy.action_offset) / policy.action_scale).double()).float()
    rows = torch.arange(20_000)
    own = Normal(means[rows, k], log_std[rows, k].exp()).log_prob(u).sum(-1) - torch.log(1 - torch.tanh(u.double()) ** 2).sum(-1).float()
    torch.testing.assert_close(log_prob.detach(), own.detach(), rtol=1e-3, atol=1e-2)
    assert (policy.log_prob(obs[:100], action[:100]) - log_prob[:100]).abs().max() > 0.1  # differs from the mixture's


# -- transcription of the official formulas ----------------------------------------------------------
def test_transcription_of_the_official_pmoe_sac_losses() -> None:
    """rlkit-pmoe PMOEsac.py on a hand-made state: K = 2 constant experts, A = 1, box [-1, 1]."""
    torch.manual_seed(0)
    policy = PMOEPolicy(2, 1, PMOEConfig(n_experts=2, hidden_sizes=(4,), **pmoe_sac.SAC_SETTINGS))
    mu, log_std, logits = torch.tensor([-0.5, 0.4]), torch.tensor([-1.0, -0.5]), torch.tensor([0.3, -0.2])
    with torch.no_grad():
        policy.mean_head.weight.zero_(), policy.mean_head.bias.copy_(mu)
        policy.log_std_head.weight.zero_(), policy.log_std_head.bias.copy_(log_std)
        policy.mixing_head.weight.zero_(), policy.mixing_head.bias.copy_(logits)
    obs, ent = torch.tensor([[0.1, -0.2], [0.5, 0.0], [-1.0, 2.0]]), torch.tensor(0.25)
    critic = FixedCritic(0.2)
    loss, log_pi, stats = pmoe_sac.frequency_loss(policy, critic, obs, ent, gen(9))
    # the reference: TanhNormal(mean, std).rsample per expert, log_prob summed over A
    xi = torch.randn(3, 2, 1, generator=gen(9))
    pre = mu[None, :, None] + log_std.exp()[None, :, None] * xi
    new_actions = torch.tanh(pre)
    ref_log_pi = (Normal(mu[None, :, None], log_std.exp()[None, :, None]).log_prob(pre) - torch.log(1 - new_actions**2 + 1e-6)).sum(2)
    q_new_actions, best_index = torch.max(-((new_actions - 0.2) ** 2).sum(2), 1)  # min(qf1, qf2), then the best expert
    ref_log_pi = torch.gather(ref_log_pi, 1, best_index.unsqueeze(-1)).squeeze(1)
    mixing_coefficient = torch.softmax(logits, 0).expand(3, 2)
    mixing_coefficient_loss = F.mse_loss(F.one_hot(best_index, 2).float(), mixing_coefficient)
    policy_loss = (ent * ref_log_pi - q_new_actions).mean() + mixing_coefficient_loss
    torch.testing.assert_close(log_pi, ref_log_pi, rtol=0, atol=1e-4)
    torch.testing.assert_close(loss, policy_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats["mixing_loss"], mixing_coefficient_loss, rtol=0, atol=1e-7)
    assert 0 < float(stats["win_freq_0"]) < 1  # both experts win somewhere: the test sees the argmax


# -- the two baseline estimators -----------------------------------------------------------------------
def test_gumbel_estimator_blends_the_experts_and_uses_the_mixture_log_density() -> None:
    hard = pmoe(3, estimator="gumbel", gumbel_hard=True, gumbel_tau=0.5)
    randomise_(hard, 1)
    hard.set_action_box(LOW, HIGH)
    obs = torch.randn(32, OBS, generator=gen(2))
    action, log_prob, log_alpha = hard.rsample_relaxed(obs, 0.5, True, gen(3))
    experts, _, _ = hard.rsample_experts(obs, gen(3))  # the same expert noise comes first
    picked = (action[:, None] - experts).abs().amax(-1) < 1e-5  # hard: the action is one expert's
    assert torch.all(picked.sum(-1) == 1)
    _, means, log_std = hard.mixture(obs)  # the mixture's density at the picked expert's u (no inverse tanh)
    u = (means + torch.randn(32, 3, ACT, generator=gen(3)) * log_std.exp())[torch.arange(32), picked.long().argmax(-1)]
    per_expert = Normal(means, log_std.exp()).log_prob(u[:, None]).sum(-1)  # (B, K)
    mixture = torch.logsumexp(log_alpha + per_expert, -1) - torch.log(1 - torch.tanh(u.double()) ** 2).sum(-1).float()
    torch.testing.assert_close(log_prob, mixture, rtol=1e-5, atol=1e-4)
    loss, log_pi, stats = pmoe_sac.actor_loss(hard, FixedCritic(0.5), obs, torch.tensor(0.2), gen(3))
    q = FixedCritic(0.5)(obs, action)[0]
    torch.testing.assert_close(loss, (0.2 * log_prob - q).mean(), rtol=1e-6, atol=1e-6)
    assert set(stats) == {"mixing_loss", "mixing_entropy"}
    grads = torch.autograd.grad(loss, [hard.mixing_head.bias, hard.mean_head.weight])
    assert all(g.abs().sum() > 0 for g in grads)  # alpha learns through y and log alpha


def test_score_estimator_trains_the_sampled_expert_and_alpha_by_reinforce() -> None:
    policy = pmoe(3, estimator="score")
    randomise_(policy, 1)
    spread_experts(policy)
    obs = torch.randn(1, OBS, generator=gen(2))
    critic = FixedCritic(0.0)
    counts = torch.zeros(3)
    for seed in range(200):
        g = gen(seed)
        action, log_probs, log_alpha = policy.rsample_experts(obs, g)
        k = int(policy.sample_expert(log_alpha.detach(), g))
        counts[k] += 1
        loss, log_pi, stats = pmoe_sac.score_loss(policy, critic, obs, torch.tensor(0.2), gen(seed))
        assert torch.equal(log_pi, log_probs[:, k])
        q = pmoe_sac.expert_q(critic, obs, action)
        alpha = log_alpha.exp()
        surrogate = log_alpha[0, k] * (q[0, k] - (alpha * q).sum()).detach()
        torch.testing.assert_close(stats["mixing_loss"], -surrogate.detach())
        if seed < 5:
            g_mean = torch.autograd.grad(loss, policy.mean_head.weight)[0]
            assert [bool(expert_rows(g_mean, j).abs().sum() > 0) for j in range(3)] == [j == k for j in range(3)]
    alpha = policy.mixture(obs)[0].exp()[0]
    assert torch.all((counts / 200 - alpha).abs() < 0.1)  # k ~ Cat(alpha)


@pytest.mark.parametrize("estimator", ["pmoe", "gumbel", "score"])
def test_sac_updates_with_every_estimator(estimator: str) -> None:
    policy = pmoe(3, estimator=estimator)
    algo = sac(policy)
    fill(algo, 1, steps=20)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    sums: dict[str, Tensor] = {}
    for _ in range(3):
        assert algo.update(sums) == 1
    keys = {"critic_loss", "q_value", "actor_loss", "entropy", "alpha_loss", "mixing_loss", "mixing_entropy"}
    assert keys <= set(sums) and all(torch.isfinite(v) for v in sums.values())
    assert ({f"win_freq_{k}" for k in range(3)} <= set(sums)) == (estimator != "gumbel")
    moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert {"mixing_head.bias", "mean_head.weight", "log_std_head.bias", "trunk.0.weight"} <= moved
    assert not any(n.startswith("q.") for n in moved)  # the auxiliary Q of PMOE-PPO stays out


# -- configuration ---------------------------------------------------------------------------------------
def test_sac_defaults_for_the_pmoe_family() -> None:
    cfg = config_from_dict({"algo": "sac", "env": {"env_id": "Pendulum-v1"}, "policy": "pmoe"}).policy_config_object()
    assert (cfg.n_experts, tuple(cfg.hidden_sizes), cfg.activation) == (4, (256, 256), "relu")
    assert (cfg.squash, cfg.state_dependent_std, cfg.mixing_input, cfg.estimator) == ("tanh", True, "features", "pmoe")
    ppo = PMOEPolicy(OBS, ACT)  # the family's PPO defaults: SAC sets the squashed settings itself
    squashed = pmoe_sac.squashed_pmoe(ppo)
    assert (squashed.config.squash, squashed.config.state_dependent_std, squashed.config.mixing_input) == ("tanh", True, "features")
    keep = pmoe(2, mixing_input="obs")
    assert pmoe_sac.squashed_pmoe(keep) is keep


@pytest.mark.parametrize(
    ("policy_config", "match"),
    [
        ({"estimator": "reinforce"}, "unknown estimator 'reinforce'"),
        ({"squash": "sigmoid"}, "unknown squash 'sigmoid'"),
        ({"squash": "none"}, "squash = 'tanh'"),
        ({"state_dependent_std": False}, "state_dependent_std = true"),
    ],
)
def test_bad_pmoe_sac_configs_are_one_line_errors(policy_config: dict[str, Any], match: str, tmp_path: Path) -> None:
    cfg = {"algo": "sac", "env": {"env_id": "Pendulum-v1"}, "policy": "pmoe", "policy_config": policy_config, "run": {"out": str(tmp_path / "r")}}
    with pytest.raises(ConfigError, match=match) as info:
        train(config_from_dict(cfg))
    assert "\n" not in str(info.value) and not (tmp_path / "r").exists()


# -- a CLI run and bitwise resume -------------------------------------------------------------------------
def test_cli_trains_pmoe_sac_and_resumes_bitwise(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cli.main(["train", "--algo", "sac", "--policy", "pmoe", "--env", "Pendulum-v1", "--steps", "600", "--out", str(out),
                     "--eval-episodes", "1", "--no-progress", "--save-every", "200", "--seed", "2",
                     "--set", "algo_config.learning_starts=200", "--set", "algo_config.steps_per_iter=200",
                     "--set", "algo_config.batch_size=32", "--set", "algo_config.critic_hidden=[64,64]",
                     "--set", "policy_config.hidden_sizes=[64,64]", "--set", "run.keep_checkpoints=0"])  # fmt: skip
    assert code == 0
    assert checkpoint_steps(out) == [200, 400, 600]
    log = read_csv(out / "progress.csv")
    assert log["train/n_updates"][-1] == 200 and 0 < log["train/alpha"][-1] < 1
    wins = sum(log[f"train/win_freq_{k}"][-1] for k in range(4))
    assert math.isclose(wins, 1.0, abs_tol=1e-5) and log["train/mixing_loss"][-1] >= 0 and log["train/mixing_entropy"][-1] > 0
    agent = Agent.load(out / "final")
    assert agent.policy.family == "pmoe" and agent.policy.n_experts == 4 and torch.equal(agent.policy.action_scale, torch.tensor([2.0]))

    last = out / "checkpoints" / "600"
    for step in (200, 400):
        run = tmp_path / f"from-{step}"
        shutil.copytree(out, run)
        for later in (400, 600):
            if later > step:
                shutil.rmtree(run / "checkpoints" / str(later))
        train(resume=run)
        got = run / "checkpoints" / "600"
        names = sorted(str(f.relative_to(last)) for f in last.rglob("*.safetensors"))
        assert names == sorted(str(f.relative_to(got)) for f in got.rglob("*.safetensors"))
        for name in names:
            assert_same_tensors(last / name, got / name)
        opt_a = torch.load(last / "optimizer.pt", weights_only=True)
        opt_b = torch.load(got / "optimizer.pt", weights_only=True)
        assert_same_nested(opt_a, opt_b, f"optimizer (resumed from {step})")

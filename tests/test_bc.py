"""Behaviour cloning losses of the generative families (``bc_loss``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from genrl_policies.base import PolicyModule
from genrl_policies.diffusion import DiffusionConfig, DiffusionPolicy
from genrl_policies.fpo import FPOConfig, FPOPolicy
from genrl_policies.gaussian import GaussianPolicy
from genrl_policies.policyflow import PolicyFlowConfig, PolicyFlowPolicy

H = (64, 64)
UNIMODAL = torch.tensor([0.5, -0.6])  # obs +1: action = UNIMODAL + N(0, 0.05^2)
MODE = torch.tensor([0.6, 0.6])  # obs -1: action = +-MODE + N(0, 0.05^2), each half the time
FAMILIES = {
    "diffusion": lambda: DiffusionPolicy(1, 2, DiffusionConfig(hidden_sizes=H)),
    "policyflow": lambda: PolicyFlowPolicy(1, 2, PolicyFlowConfig(hidden_sizes=H, sigma_init=0.01)),
    "fpo": lambda: FPOPolicy(1, 2, FPOConfig(hidden_sizes=H)),
}


def demonstrations(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """obs in {-1, +1} (O = 1); a unimodal expert at +1 and a bimodal one at -1 (A = 2)."""
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
    a = torch.where(s > 0, UNIMODAL, sign * MODE) + 0.05 * torch.randn(n, 2, generator=g)
    return s, a


def clone(policy: PolicyModule, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        obs, actions = demonstrations(256, g)
        loss = policy.bc_loss(obs, actions, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    policy.finish_bc()
    return losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bc_reproduces_the_expert(family: str) -> None:
    """1500 Adam steps. Tolerances: at obs +1 the deterministic action is within 0.1 of the expert
    mean and the stochastic mean within 0.05 (spread <= 0.15: DPPO's std floor 0.1 included); at
    obs -1 stochastic samples fall within 0.35 of each mode at least 30 % of the time, 85 % in all."""
    policy = FAMILIES[family]()
    losses = clone(policy, 1500)
    assert sum(losses[-100:]) / 100 < 0.5 * sum(losses[:20]) / 20
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        det, _ = policy.act(torch.ones(200, 1), deterministic=True, generator=g)
        sto, _ = policy.act(torch.ones(1000, 1), generator=g)
        bi, _ = policy.act(-torch.ones(1000, 1), generator=g)
    assert (det - UNIMODAL).norm(dim=1).mean() < 0.1
    assert (sto.mean(0) - UNIMODAL).abs().max() < 0.05 and sto.std(0).max() < 0.15
    near = torch.stack([(bi - MODE).norm(dim=1) < 0.35, (bi + MODE).norm(dim=1) < 0.35])
    share = near.float().mean(1)
    assert share.min() > 0.3 and share.sum() > 0.85, share


def test_bc_trains_only_the_velocity_of_policyflow() -> None:
    policy = FAMILIES["policyflow"]()
    obs, actions = demonstrations(32, torch.Generator().manual_seed(0))
    policy.bc_loss(obs, actions).backward()
    assert policy.log_std.grad is None and policy.velocity.net[-1].weight.grad is not None


def test_diffusion_bc_refreshes_the_frozen_base_after_cloning() -> None:
    torch.manual_seed(0)
    policy = DiffusionPolicy(1, 2, DiffusionConfig(hidden_sizes=(16,), ft_denoising_steps=3))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(5):
        loss = policy.bc_loss(*demonstrations(64, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert policy.base_net is not None
    stale = policy.base_net.state_dict()
    assert any(not torch.equal(stale[k], v) for k, v in policy.net.state_dict().items())
    policy.finish_bc()
    base = policy.base_net.state_dict()
    assert all(torch.equal(base[k], v) for k, v in policy.net.state_dict().items())
    assert not any(b.requires_grad for b in policy.base_net.buffers())


def test_bc_loss_is_seeded_by_its_generator() -> None:
    policy = FAMILIES["fpo"]()
    obs, actions = demonstrations(16, torch.Generator().manual_seed(0))
    first = policy.bc_loss(obs, actions, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, policy.bc_loss(obs, actions, generator=torch.Generator().manual_seed(5)))


def test_bad_bc_input_is_refused_in_one_line() -> None:
    policy = FAMILIES["diffusion"]()
    obs = torch.ones(4, 1)
    cases = [
        (obs, torch.zeros(4, 3), r"expected \(4, 2\)"),
        (torch.ones(4, 2), torch.zeros(4, 2), r"expected \(B, 1\)"),
        (obs, torch.full((4, 2), float("nan")), "NaN"),
        (obs, torch.full((4, 2), 1.5), "beyond denoised_clip=1.0"),
    ]
    for o, a, match in cases:
        with pytest.raises(ValueError, match=match) as exc:
            policy.bc_loss(o, a)
        assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="gaussian policy cannot be behaviour-cloned"):
        GaussianPolicy(1, 2).bc_loss(obs, torch.zeros(4, 2))

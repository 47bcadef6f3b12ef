"""GAE (genrl.advantages.gae): hand-computed trajectory, lambda limits, per-env independence."""

from __future__ import annotations

import pytest
import torch

from genrl.advantages import gae

F64 = torch.float64


def col(*xs: float, dtype: torch.dtype = F64) -> torch.Tensor:
    """A (T, 1) column: one env."""
    return torch.tensor(xs, dtype=dtype).unsqueeze(-1)


def bools(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.bool).unsqueeze(-1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- 1. hand-computed 5-step trajectory ------------------------------------------------------------
def test_hand_computed_termination_and_truncation() -> None:
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = col(1.0, 2.0, 0.0, 1.0, 3.0)
    values = col(0.5, 1.0, 2.0, 1.5, 1.0)
    # next_values[t] = V(obs after step t in the same episode):
    #   t=0: V(s_1) = 1.0; t=1: terminated, 10.0 must be ignored; t=2: V(s_3) = 1.5;
    #   t=3: truncated, V(final obs) = 4.0 (NOT V(s_4) = 1.0, the reset obs); t=4: bootstrap 0.5.
    next_values = col(1.0, 10.0, 1.5, 4.0, 0.5)
    terminated = bools(0, 1, 0, 0, 0)
    truncated = bools(0, 0, 0, 1, 0)

    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma, lam)

    # delta_t = r_t + gamma * (1 - term_t) * nv_t - v_t
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
    # delta_1 = 2 + 0 (terminal: no bootstrap) - 1.0 = 1.0
    # delta_2 = 0 + 0.9 * 1.5 - 2.0 = -0.65
    # delta_3 = 1 + 0.9 * 4.0 - 1.5 = 3.1        (truncated: bootstraps from the final obs)
    # delta_4 = 3 + 0.9 * 0.5 - 1.0 = 2.45       (end of rollout: bootstraps)
    # A_t = delta_t + 0.72 * (1 - done_t) * A_{t+1}
    # A_4 = 2.45
    # A_3 = 3.1                                   (truncated: recursion cut)
    # A_2 = -0.65 + 0.72 * 3.1 = -0.65 + 2.232 = 1.582
    # A_1 = 1.0                                   (terminated: recursion cut)
    # A_0 = 1.4 + 0.72 * 1.0 = 2.12
    expected_adv = col(2.12, 1.0, 1.582, 3.1, 2.45)
    # returns = A + V = (2.12+0.5, 1.0+1.0, 1.582+2.0, 3.1+1.5, 2.45+1.0)
    expected_ret = col(2.62, 2.0, 3.582, 4.6, 3.45)

    assert adv.shape == ret.shape == (5, 1)
    assert adv.dtype == ret.dtype == F64
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, adv + values, rtol=0, atol=0)


def test_terminal_next_value_is_ignored_truncated_is_used() -> None:
    gamma, lam = 0.9, 0.8
    rewards, values = col(1.0, 1.0), col(0.0, 0.0)
    base = dict(terminated=bools(1, 0), truncated=bools(0, 1), gamma=gamma, lam=lam)
    a1, _ = gae(rewards, values, col(0.0, 0.0), **base)
    a2, _ = gae(rewards, values, col(123.0, 2.0), **base)
    # step 0 terminated: A_0 = 1 + 0 - 0 = 1 whatever next_values[0] is (and A_1 is cut off)
    assert a1[0, 0].item() == a2[0, 0].item() == 1.0
    # step 1 truncated: A_1 = 1 + 0.9 * nv_1 - 0 -> 1.0 then 1 + 0.9 * 2 = 2.8
    torch.testing.assert_close(a1[1], col(1.0)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(a2[1], col(2.8)[0], rtol=0, atol=1e-12)


# -- 2. lambda limits ------------------------------------------------------------------------------
def test_lambda_one_is_monte_carlo_with_bootstrap() -> None:
    T, N, gamma = 6, 2, 0.9
    rewards = torch.randn(T, N, generator=gen(0), dtype=F64)
    values = torch.randn(T, N, generator=gen(1), dtype=F64)
    last = torch.randn(1, N, generator=gen(2), dtype=F64)
    next_values = torch.cat([values[1:], last])  # consistent: nv_t = V(s_{t+1})
    no = torch.zeros(T, N, dtype=torch.bool)

    adv, ret = gae(rewards, values, next_values, no, no, gamma, 1.0)

    # A_t = sum_{k=t}^{T-1} gamma^(k-t) r_k + gamma^(T-t) V(s_T) - V(s_t)   (telescoped deltas)
    expected = torch.empty(T, N, dtype=F64)
    for t in range(T):
        g = sum(gamma ** (k - t) * rewards[k] for k in range(t, T))
        expected[t] = g + gamma ** (T - t) * last[0] - values[t]
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    # returns are then the bootstrapped discounted reward-to-go
    torch.testing.assert_close(ret, expected + values, rtol=0, atol=1e-12)


def test_lambda_zero_is_one_step_td_error() -> None:
    T, N, gamma = 7, 3, 0.95
    rewards = torch.randn(T, N, generator=gen(3), dtype=F64)
    values = torch.randn(T, N, generator=gen(4), dtype=F64)
    next_values = torch.randn(T, N, generator=gen(5), dtype=F64)
    terminated = torch.rand(T, N, generator=gen(6)) < 0.3
    truncated = (torch.rand(T, N, generator=gen(7)) < 0.3) & ~terminated
    assert terminated.any() and truncated.any()  # the test exercises both kinds of done

    adv, _ = gae(rewards, values, next_values, terminated, truncated, gamma, 0.0)

    # A_t = delta_t = r_t + gamma * (1 - term_t) * nv_t - v_t  (no recursion at lambda = 0)
    delta = rewards + gamma * (~terminated).to(F64) * next_values - values
    torch.testing.assert_close(adv, delta, rtol=0, atol=1e-12)


# -- 3. envs are independent -----------------------------------------------------------------------
def test_multi_env_equals_per_column() -> None:
    T, N, gamma, lam = 9, 3, 0.97, 0.9
    rewards = torch.randn(T, N, generator=gen(8), dtype=F64)
    values = torch.randn(T, N, generator=gen(9), dtype=F64)
    next_values = torch.randn(T, N, generator=gen(10), dtype=F64)
    terminated = torch.rand(T, N, generator=gen(11)) < 0.2
    truncated = (torch.rand(T, N, generator=gen(12)) < 0.2) & ~terminated

    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    for n in range(N):
        s = slice(n, n + 1)
        a_n, r_n = gae(rewards[:, s], values[:, s], next_values[:, s], terminated[:, s], truncated[:, s], gamma, lam)
        torch.testing.assert_close(adv[:, s], a_n, rtol=0, atol=0)
        torch.testing.assert_close(ret[:, s], r_n, rtol=0, atol=0)
    # and the columns differ (otherwise the comparison above proves little)
    assert not torch.allclose(adv[:, 0], adv[:, 1])


def test_float32_inputs_keep_dtype() -> None:
    z = torch.zeros(4, 2)
    no = torch.zeros(4, 2, dtype=torch.bool)
    adv, ret = gae(z + 1.0, z, z, no, no, 0.5, 1.0)
    assert adv.dtype == ret.dtype == torch.float32
    # A_3 = 1; A_2 = 1 + 0.5 = 1.5; A_1 = 1 + 0.75 = 1.75; A_0 = 1 + 0.875 = 1.875
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.875, 1.75, 1.5, 1.0]), rtol=0, atol=1e-6)


# -- 4. shape checks -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["values", "next_values", "terminated", "truncated", "rewards"])
def test_shape_mismatch_raises(bad: str) -> None:
    T, N = 4, 2
    args = {
        "rewards": torch.zeros(T, N),
        "values": torch.zeros(T, N),
        "next_values": torch.zeros(T, N),
        "terminated": torch.zeros(T, N, dtype=torch.bool),
        "truncated": torch.zeros(T, N, dtype=torch.bool),
    }
    args[bad] = torch.zeros(T, N + 1, dtype=args[bad].dtype)
    with pytest.raises(ValueError, match="share one"):
        gae(**args, gamma=0.99, lam=0.95)


def test_gae_on_an_accelerator_path_equals_the_numpy_path() -> None:
    """The torch recursion (used when the rollout lives on a GPU) gives the numpy path's values."""
    from genrl.advantages import gae, gae_torch

    g = torch.Generator().manual_seed(0)
    T, N = 17, 5
    r, v, nv = (torch.randn(T, N, generator=g) for _ in range(3))
    term, trunc = torch.rand(T, N, generator=g) < 0.1, torch.rand(T, N, generator=g) < 0.1
    a_np, ret_np = gae(r, v, nv, term, trunc, 0.99, 0.95)
    a_t, ret_t = gae_torch(r, v, nv, term, trunc, 0.99, 0.95)
    assert torch.equal(a_np, a_t) and torch.equal(ret_np, ret_t)

"""Advantage estimators as pure functions.

Shapes: T time steps, N envs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation with termination kept apart from truncation.

    delta_t = r_t + gamma * (1 - terminated_t) * V(s'_t) - V(s_t)
    A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},   done = terminated | truncated

    ``next_values[t]`` is V of the observation that followed step t in the same episode: the
    final observation when the episode was truncated there (so time limits bootstrap, as in
    SB3 #633), the next observation otherwise (ignored when terminated).

    Args:
        rewards, values, next_values: (T, N).
        terminated, truncated: (T, N) bool.
    Returns:
        (advantages, returns) each (T, N), returns = advantages + values.
    """
    if not (rewards.shape == values.shape == next_values.shape == terminated.shape == truncated.shape):
        raise ValueError(f"gae inputs must share one (T, N) shape, got {[tuple(x.shape) for x in (rewards, values, next_values, terminated, truncated)]}")
    if rewards.device.type != "cpu":  # batched simulators on an accelerator: stay on the device
        return gae_torch(rewards, values, next_values, terminated, truncated, gamma, lam)
    # The recursion is sequential in T; numpy scalars-per-row beat torch op dispatch here.
    r = rewards.detach().cpu().double().numpy()
    v = values.detach().cpu().double().numpy()
    nv = next_values.detach().cpu().double().numpy()
    term = terminated.detach().cpu().numpy().astype(np.float64)
    done = np.logical_or(terminated.cpu().numpy(), truncated.cpu().numpy()).astype(np.float64)
    delta = r + gamma * (1.0 - term) * nv - v
    carry = gamma * lam * (1.0 - done)
    adv = np.zeros_like(delta)
    last = np.zeros(delta.shape[1:])
    for t in range(delta.shape[0] - 1, -1, -1):
        last = delta[t] + carry[t] * last
        adv[t] = last
    advantages = torch.from_numpy(adv).to(device=rewards.device, dtype=rewards.dtype)
    return advantages, advantages + values


def gae_torch(rewards: Tensor, values: Tensor, next_values: Tensor, terminated: Tensor, truncated: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """``gae`` computed with torch ops on the inputs' device (float64, as the numpy path), so a
    rollout on an accelerator never leaves it; one small op per time step."""
    r, v, nv = rewards.double(), values.double(), next_values.double()
    term = terminated.double()
    delta = r + gamma * (1.0 - term) * nv - v
    carry = gamma * lam * (1.0 - (terminated | truncated).double())
    adv = torch.empty_like(delta)
    last = torch.zeros_like(delta[0])
    for t in range(delta.shape[0] - 1, -1, -1):
        last = delta[t] + carry[t] * last
        adv[t] = last
    advantages = adv.to(rewards.dtype)
    return advantages, advantages + values


def group_advantages(rewards: Tensor, *, std_scope: str = "group", ddof: int = 0, eps: float = 1e-4) -> Tensor:
    """GRPO advantages for rewards of shape (..., G): the G samples of one prompt form a group.

    ``(r - mean_group) / (std + eps)`` with the std taken per group (``"group"``) or over every
    reward of the batch (``"global"``, Flow-GRPO's released configs); ``ddof`` 0 is the
    population std (Flow-GRPO), 1 the sample std (G2RPO, torch's default). Constant groups give
    zeros, never NaN.
    """
    if std_scope not in ("group", "global"):
        raise ValueError(f"unknown std_scope {std_scope!r}; valid: group, global")
    if rewards.shape[-1] < 1 + ddof:
        raise ValueError(f"a group needs more than {ddof} samples, got {rewards.shape[-1]}")
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if std_scope == "group":
        std = rewards.std(dim=-1, keepdim=True, correction=ddof)
    else:
        std = rewards.std(correction=ddof)
    return centred / (std + eps)


def aggregate_advantages(
    scores: dict[str, Tensor],
    weights: dict[str, float],
    *,
    mode: str = "sum",
    std_scope: str = "group",
    ddof: int = 0,
    eps: float = 1e-4,
) -> Tensor:
    """Advantages from several rewards (each (..., G)).

    ``"sum"``: normalise the weighted sum of rewards per group (plain GRPO).
    ``"per_reward"``: normalise each reward per group, then add them weighted (G2RPO's rule for
    several reward models).
    ``"gdpo"``: GDPO's decoupled normalisation: per-reward group normalisation, weighted sum, then
    one normalisation over the whole batch, so no reward's scale dominates the others.
    """
    if mode == "sum":
        total = sum(weights[k] * scores[k] for k in weights)
        return group_advantages(total, std_scope=std_scope, ddof=ddof, eps=eps)  # type: ignore[arg-type]
    if mode not in ("per_reward", "gdpo"):
        raise ValueError(f"unknown reward aggregation {mode!r}; valid: sum, per_reward, gdpo")
    adv = sum(weights[k] * group_advantages(scores[k], std_scope=std_scope, ddof=ddof, eps=eps) for k in weights)
    if mode == "gdpo":
        adv = batch_normalize(adv, ddof=ddof, eps=eps)  # type: ignore[arg-type]
    return adv  # type: ignore[return-value]


def batch_normalize(adv: Tensor, *, ddof: int = 0, eps: float = 1e-4) -> Tensor:
    """GDPO's last step: one normalisation over the whole batch, (A - mean) / (std + eps)."""
    return (adv - adv.mean()) / (adv.std(correction=ddof) + eps)

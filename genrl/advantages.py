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
        raise ValueError(
            "gae inputs must share one (T, N) shape, got "
            f"{[tuple(x.shape) for x in (rewards, values, next_values, terminated, truncated)]}"
        )
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


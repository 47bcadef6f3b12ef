"""PPO-family loss terms as pure functions returning (loss, detached diagnostics).

Shapes: B batch, K per-sample chain steps (a log-ratio may be (B,) or (B, K); a (B,) advantage
is broadcast over K, as TorchRL does).
"""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, clip_coef: float | Tensor, step_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """L = -E[min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)] with rho = exp(log_ratio).

    For a (B, K) per-step log-ratio, ``clip_coef`` may be a (K,) tensor of per-step
    coefficients and ``step_weights`` (K,) multiplies the broadcast advantage (DPPO).

    Returns the loss and {"clip_fraction", "approx_kl"}; approx_kl is the k3 estimator
    E[(rho - 1) - log rho] (Schulman, "Approximating KL divergence").
    """
    adv = advantages.reshape(advantages.shape[0], *([1] * (log_ratio.ndim - 1)))
    if step_weights is not None:
        adv = adv * step_weights
    ratio = log_ratio.exp()
    unclipped = ratio * adv
    if isinstance(clip_coef, Tensor):
        clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef) * adv
    else:
        clipped = ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_fraction": ((ratio - 1.0).abs() > clip_coef).float().mean(),
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
        }
    return loss, stats


def value_loss(values: Tensor, returns: Tensor, old_values: Tensor, clip_coef: float | None, mode: str = "max") -> Tensor:
    """0.5 * E[(V - R)^2]; with ``clip_coef`` the prediction is clipped to old +- clip_coef and
    ``mode`` "max" takes the pessimistic maximum of both losses (PPO2), "clipped" the clipped
    prediction's loss alone (skrl / PolicyFlow)."""
    if clip_coef is None:
        return 0.5 * (values - returns).square().mean()
    clipped = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
    if mode == "clipped":
        return 0.5 * (clipped - returns).square().mean()
    return 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square()).mean()


def explained_variance(pred: Tensor, target: Tensor) -> float:
    """1 - Var[target - pred] / Var[target]; nan when the target is constant."""
    var = target.var()
    return float("nan") if var == 0 else float(1.0 - (target - pred).var() / var)

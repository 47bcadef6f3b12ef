"""General Policy Composition (GPC; Cao et al., arXiv 2510.01068): several pretrained diffusion and/or
flow policies combined at test time, without training.

At every step of **one** sampler, all parents are queried on the **same** noisy action and the same
time, each with its own observation view; their predictions are converted to one parametrisation
and combined convexly, and one sampler step is taken with one shared noise draw (paper Eq. 7;
conversions in ``policies.denoisers``). The released code (``SageCao1125/GPC``,
``envs/base_task.py``) does this for two DDPM parents with identical schedulers.

Shapes: B batch, O obs dim (each parent its own after ``obs_fns``), A action dim, K steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from genrl_policies.denoisers import Denoiser, EpsDenoiser, VelocityDenoiser, vp_to_rf_coefficients
from genrl_policies.flow import time_grid

OPERATORS = ("convex",)
SUPERPOSITION_OPERATORS = ("and", "or")
WEIGHT_TOLERANCE = 1e-6

ObsFn = Callable[[Tensor], Tensor]


def check_weights(weights: Sequence[float], n_parents: int) -> tuple[float, ...]:
    """The weights as floats; a one-line ValueError unless there is one per parent, each finite and
    >= 0, summing to 1 within 1e-6. Nothing is renormalised."""
    try:
        ws = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a sequence of numbers, got {weights!r}") from None
    if len(ws) != n_parents:
        raise ValueError(f"got {len(ws)} weights for {n_parents} parents")
    if not all(math.isfinite(w) and w >= 0 for w in ws):
        raise ValueError(f"weights must be finite and >= 0, got {list(ws)}")
    total = math.fsum(ws)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"weights must sum to 1 within {WEIGHT_TOLERANCE:g} (nothing is renormalised), got sum {total:.9g}")
    return ws


def coverage_weights(weights: Sequence[float], dims: Sequence[int]) -> list[float | Tensor]:
    """Per-parent weights for ``combine``: the weights themselves when every parent covers the whole
    action; otherwise (d_i,) float64 vectors. A coordinate covered by all parents gets w_i; one
    on the tail covered only by the longer parents S gets w_i / sum_S w (uniform over S when that
    sum is 0): with two parents the tail is the longer parent's prediction, as in GPC; more
    parents are genrl's generalisation."""
    dim = max(dims)
    if all(d == dim for d in dims):
        return list(weights)
    w = torch.tensor(weights, dtype=torch.float64)
    covers = torch.arange(dim).unsqueeze(0) < torch.tensor(dims).unsqueeze(1)  # (P, D)
    per = w.unsqueeze(1) * covers
    total = per.sum(0, keepdim=True)
    full = covers.all(0, keepdim=True)
    uniform = covers / covers.sum(0, keepdim=True)
    coef = torch.where(full, per, torch.where(total > 0, per / total.clamp(min=1e-300), uniform))
    return [coef[i, :d] for i, d in enumerate(dims)]


def combine(preds: Sequence[Tensor], coefs: Sequence[float | Tensor], dim: int) -> Tensor:
    """sum_i coef_i * pred_i over each parent's action prefix: preds (N, d_i) -> (N, dim)."""
    if all(p.shape[-1] == dim for p in preds):
        out = coefs[0] * preds[0]
        for c, p in zip(coefs[1:], preds[1:], strict=True):
            out = out + c * p
        return out
    out = preds[0].new_zeros(*preds[0].shape[:-1], dim)
    for c, p in zip(coefs, preds, strict=True):
        d = p.shape[-1]
        c = c.to(dtype=p.dtype, device=p.device) if isinstance(c, Tensor) else c
        out = torch.cat([out[..., :d] + c * p, out[..., d:]], dim=-1)
    return out


class ComposedPolicy(nn.Module):
    """A test-time convex composition of diffusion and/or flow policies (GPC).

    ``act(obs, deterministic=..., generator=...)`` returns ``(action, None)`` like a policy's
    ``act`` (no record: a composition is not trained). Parent i sees ``obs_fns[i](obs)`` (default:
    obs itself), so parents can take different observation views.

    Weights: one per parent, >= 0, summing to 1 within 1e-6; they are used as given, nothing is
    silently renormalised. Weights (1, 0, ...) reproduce the first parent's ``act`` bit for bit
    under the same generator, when that parent's sampler leads (below).

    The one sampler:

    * all diffusion parents: their common DDPM ancestral sampler (they must share the schedule,
      K and the sampler settings: std floor, noise clamp, x0 and action clips; a DDPM network
      is trained only at its own K noise levels, so no other alignment is offered). The convex
      mix is taken in eps-space (equivalently score-space: the parents share sigma_k).
    * all flow parents: the first parent's integrator (Euler or midpoint) on its own grid, from
      its own start; the others are queried at those times (a velocity field is defined for
      every t). The mix is taken in velocity space, equal to the eps- or x0-space mix on the
      shared interpolant. The stochastic extras that are part of a parent's policy are mixed
      with the same weights: FPO's per-step feather noise scale and PolicyFlow's terminal
      action std (0 for a parent without them); one noise draw each, shared.
    * mixed families: the first *diffusion* parent's DDPM sampler leads, whatever the order. A
      flow parent is queried at the DDPM state mapped to its own path, y = x_k / (sqrt(abar_k) +
      sqrt(1 - abar_k)) at t_k = sqrt(abar_k) / (sqrt(abar_k) + sqrt(1 - abar_k)), and its
      velocity converted to the same eps, eps = y - t_k v (derivation: ``policies.denoisers``).
      The flow parents' own samplers and noise are not used.

    Chunks of different horizons (``action_step_dim`` = A, the per-step action size; a parent's
    action is horizon x A, time-major): the composed action is the longest; each parent predicts
    on its own prefix (its first horizon_i steps), the convex mix is taken where all parents
    overlap and the longer parents' predictions alone on the tail (``coverage_weights``).

    Superposition operators (paper Table 4, after SuperDiff, Skreta et al. 2024: OR mixes with
    weights softmax(T log q_i + l), AND picks the weights that keep d log q_i equal across
    parents) are refused: ``operator="and"`` / ``"or"`` raise. Both need each parent's
    log-density log q_i along the sampled path, which the Itô density estimator tracks from the
    scores alone, d log q_i = <dx, s_i> + (div f + <f - (g^2/2) s_i, s_i>) dt, only when the
    path solves a reverse SDE driven by g dW, g the forward process's diffusion coefficient (the
    Itô correction then cancels the Laplacian of log q_i). genrl's samplers are not such paths:
    DPPO's ancestral DDPM step draws noise of variance beta~_k = beta_k (1 - abar_{k-1}) /
    (1 - abar_k) instead of beta_k, floored at ``min_sampling_std`` and clamped at
    ``noise_clamp``, after clipping x0 at ``denoised_clip``; with K ~ 10 steps the estimator's
    discretisation error is large; ``deterministic`` acting has no noise, where the density
    change needs div s_i (a trace estimate, not the Itô estimator); and flow parents integrate an
    ODE (the paper: "not directly applicable to flow-based models"). A faithful AND/OR needs its
    own Euler-Maruyama sampler, under which weights (1, 0) would no longer reproduce a parent.
    """

    family = "composed"

    def __init__(
        self,
        parents: Sequence[nn.Module],
        weights: Sequence[float],
        obs_fns: Sequence[ObsFn | None] | None = None,
        *,
        obs_dim: int | None = None,
        action_step_dim: int | None = None,
        operator: str = "convex",
    ) -> None:
        super().__init__()
        if operator in SUPERPOSITION_OPERATORS:
            raise ValueError(
                f"operator '{operator}' (SuperDiff superposition) is not supported: it needs Itô log-density estimates genrl's samplers cannot give faithfully (ComposedPolicy doc)"
            )
        if operator not in OPERATORS:
            raise ValueError(f"unknown operator '{operator}'; valid: {', '.join(OPERATORS)}")
        parents = list(parents)
        if not parents:
            raise ValueError("a composition needs at least one parent policy")
        self.parents = nn.ModuleList(parents)
        self.weights = check_weights(weights, len(parents))
        dens = self._denoisers()  # raises for a family without one
        if obs_fns is not None and len(obs_fns) != len(parents):
            raise ValueError(f"got {len(obs_fns)} obs_fns for {len(parents)} parents")
        self.obs_fns: list[ObsFn | None] = list(obs_fns) if obs_fns is not None else [None] * len(parents)
        self.action_dim = self._check_actions([d.action_dim for d in dens], action_step_dim)
        self.obs_dim: int | None = None
        self.obs_dim = self._check_obs_dims([d.obs_dim for d in dens], obs_dim)
        eps = [i for i, d in enumerate(dens) if isinstance(d, EpsDenoiser)]
        self.lead = eps[0] if eps else 0
        for i in eps[1:]:
            _check_same_sampler(dens[eps[0]], dens[i], eps[0], i)
        self._coefs = coverage_weights(self.weights, [d.action_dim for d in dens])

    # -- checks -------------------------------------------------------------------------------
    def _denoisers(self) -> list[Denoiser]:
        dens = []
        for i, parent in enumerate(self.parents):
            if not hasattr(parent, "denoiser"):
                raise ValueError(f"parent {i} ({type(parent).__name__}) has no denoiser: only diffusion and flow policies can be composed")
            dens.append(cast(Any, parent).denoiser())
        return dens

    def _check_actions(self, dims: list[int], step_dim: int | None) -> int:
        if all(d == dims[0] for d in dims):
            return dims[0]
        if step_dim is None:
            raise ValueError(f"parents act in different action dims {dims}; pass action_step_dim (the per-step action size) to compose chunks of different horizons")
        if not isinstance(step_dim, int) or step_dim < 1 or any(d % step_dim for d in dims):
            raise ValueError(f"action dims {dims} are not all whole chunks of action_step_dim={step_dim!r}")
        return max(dims)

    def _check_obs_dims(self, dims: list[int], obs_dim: int | None) -> int | None:
        if all(fn is None for fn in self.obs_fns):
            if any(d != dims[0] for d in dims):
                raise ValueError(f"parents expect different obs dims {dims}; pass obs_fns to give each its own view")
            if obs_dim is not None and obs_dim != dims[0]:
                raise ValueError(f"obs_dim={obs_dim} but the parents expect {dims[0]}")
            return dims[0]
        if obs_dim is not None:  # check every view once, on a dummy observation
            if isinstance(obs_dim, bool) or not isinstance(obs_dim, int) or obs_dim < 1:
                raise ValueError(f"obs_dim must be a positive integer, got {obs_dim!r}")
            self.obs_dim = obs_dim
            self.views(torch.zeros(1, obs_dim, dtype=torch.get_default_dtype()))
        return obs_dim

    def views(self, obs: Tensor) -> list[Tensor]:
        """Each parent's observation view (B, O_i), checked against the parent's obs dim."""
        if not isinstance(obs, Tensor) or obs.ndim != 2:
            raise ValueError(f"obs must be a (B, O) tensor, got {getattr(obs, 'shape', type(obs).__name__)}")
        if self.obs_dim is not None and obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs has shape {tuple(obs.shape)}, expected (B, {self.obs_dim}) for this composition")
        out = []
        for i, (fn, parent) in enumerate(zip(self.obs_fns, self.parents, strict=True)):
            view = obs if fn is None else fn(obs)
            want = (obs.shape[0], parent.obs_dim)
            if not isinstance(view, Tensor) or tuple(view.shape) != want:
                raise ValueError(f"parent {i} sees obs of shape {tuple(getattr(view, 'shape', ()))}, expected {want}")
            out.append(view)
        return out

    def describe(self) -> dict[str, Any]:
        """Families, weights and the leading sampler, for logs."""
        families = [getattr(p, "family", type(p).__name__) for p in self.parents]
        return {"family": self.family, "parents": families, "weights": list(self.weights), "lead": self.lead}

    # -- sampling -----------------------------------------------------------------------------
    def act(self, obs: Tensor, *, deterministic: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, None]:
        """Sample (or, ``deterministic``, follow the leading sampler's noise-free path to) one
        composed action per row: (B, A) and no record."""
        views = self.views(obs)
        dens = self._denoisers()
        with torch.no_grad():
            if isinstance(dens[self.lead], EpsDenoiser):
                return self._sample_ddpm(dens, views, deterministic, generator), None
            return self._sample_flow(dens, views, deterministic, generator), None

    def _coefs_for(self, like: Tensor) -> list[float | Tensor]:
        return [c.to(dtype=like.dtype, device=like.device) if isinstance(c, Tensor) else c for c in self._coefs]

    def _sample_ddpm(self, dens: list[Denoiser], views: list[Tensor], deterministic: bool, generator: torch.Generator | None) -> Tensor:
        lead = dens[self.lead]
        assert isinstance(lead, EpsDenoiser)
        K, B, D = lead.n_steps, views[0].shape[0], self.action_dim
        dtype, device = views[0].dtype, views[0].device
        x = torch.zeros(B, D, dtype=dtype, device=device) if deterministic else torch.randn(B, D, generator=generator, dtype=dtype, device=device)
        coefs = self._coefs_for(x)
        maps = [vp_to_rf_coefficients(float(a)) for a in lead.alphas_cumprod]  # (c_k, t_k) per k
        steps = list(range(K - 1, -1, -1))
        times = torch.tensor([maps[k][1] for k in steps], dtype=torch.float64)
        flows = {i: d.bind(views[i], times) for i, d in enumerate(dens) if isinstance(d, VelocityDenoiser)}
        for j, k in enumerate(steps):
            preds = []
            for i, d in enumerate(dens):
                xi = x if d.action_dim == D else x[:, : d.action_dim]
                if isinstance(d, EpsDenoiser):
                    preds.append(d.predict(xi, k, views[i]))
                else:  # flow parent: its state on its own path, its eps = y - t v
                    c, t = maps[k]
                    y = xi * c
                    preds.append(y - t * flows[i](y, j))
            x = lead.mean_fn(x, k, combine(preds, coefs, D))
            if not deterministic:
                noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=device)
                if lead.noise_clamp is not None:
                    noise = noise.clamp(-lead.noise_clamp, lead.noise_clamp)
                x = x + lead.sampling_std[k] * noise
            if k == 0 and lead.final_action_clip is not None:
                x = x.clamp(-lead.final_action_clip, lead.final_action_clip)
        return x

    def _sample_flow(self, dens: list[Denoiser], views: list[Tensor], deterministic: bool, generator: torch.Generator | None) -> Tensor:
        flows = [d for d in dens if isinstance(d, VelocityDenoiser)]  # all of them: no DDPM parent
        lead = flows[0]
        B, D, n = views[0].shape[0], self.action_dim, lead.n_steps
        x = lead.start_fn((B, D), deterministic, generator, views[0].dtype, views[0].device)
        coefs = self._coefs_for(x)
        fns = [d.bind(views[i], time_grid(n, lead.method)) for i, d in enumerate(flows)]

        def v(x: Tensor, j: int) -> Tensor:
            preds = [fn(x if d.action_dim == D else x[:, : d.action_dim], j) for fn, d in zip(fns, flows, strict=True)]
            return combine(preds, coefs, D)

        dt = 1.0 / n
        feather = self._mix_scalars([d.feather_std for d in flows])
        scale = feather * math.sqrt(dt) if isinstance(feather, float) else (feather * math.sqrt(dt)).to(x)  # as integrate rounds it
        for k in range(n):  # the arithmetic of flow.integrate, so a lone parent is reproduced exactly
            if lead.method == "euler":
                x = x + dt * v(x, k)
            else:
                x = x + dt * v(x + 0.5 * dt * v(x, 2 * k), 2 * k + 1)
            if not deterministic and bool((torch.as_tensor(feather) > 0).any()):
                xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + scale * xi
        if not deterministic and any(d.terminal_std is not None for d in flows):
            stds = [x.new_zeros(d.action_dim) if d.terminal_std is None else d.terminal_std.to(x) for d in flows]
            x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * combine(stds, coefs, D)
        return x

    def _mix_scalars(self, values: list[float]) -> float | Tensor:
        """A per-parent scalar mixed with the weights: a float, or a float64 (D,) with chunks of
        different lengths."""
        if all(not isinstance(c, Tensor) for c in self._coefs):
            return sum((w * v for w, v in zip(self.weights, values, strict=True)), 0.0)
        full = [torch.full((c.shape[0],), v, dtype=torch.float64) for c, v in zip(self._coefs, values, strict=True) if isinstance(c, Tensor)]
        return combine(full, self._coefs, self.action_dim)


def _check_same_sampler(a: EpsDenoiser, b: EpsDenoiser, i: int, j: int) -> None:
    """One-line ValueError unless two DDPM parents can share one sampler."""
    for key, value in a.sampler_settings.items():
        other = b.sampler_settings.get(key)
        if other != value:
            raise ValueError(f"diffusion parents {i} and {j} differ in {key} ({value} vs {other}); GPC needs one common DDPM sampler")
    if a.alphas_cumprod.shape != b.alphas_cumprod.shape or not torch.equal(a.alphas_cumprod, b.alphas_cumprod):
        raise ValueError(f"diffusion parents {i} and {j} have different noise schedules; GPC needs one common DDPM sampler")


__all__ = ["OPERATORS", "SUPERPOSITION_OPERATORS", "ComposedPolicy", "check_weights", "combine", "coverage_weights"]

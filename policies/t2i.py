"""A text-to-image flow-matching model as a policy: SDE steps with exact per-step log-probs.

Convention (diffusers ``FlowMatchEulerDiscreteScheduler``, SD3, Flux): ``x_s = (1 - s) x0 + s eps``
with ``s`` = sigma in [0, 1] (1 = pure noise), the transformer predicts ``v = eps - x0`` and the
deterministic (ODE) Euler step is ``x' = x + (s' - s) v``.

Flow-GRPO turns each step into a Gaussian transition with the same marginals:

    std_s  = eta * sqrt(s / (1 - s))                       (eta = noise_level)
    mean   = x (1 + std_s^2 dt / (2 s)) + v (1 + std_s^2 (1 - s) / (2 s)) dt,   dt = s' - s < 0
    x'     = mean + std_s sqrt(-dt) xi,                    xi ~ N(0, I)

and ``log pi(x' | x)`` is the Gaussian log-density **averaged** over the latent elements
(``sde_step``). The policy here wraps a diffusers transformer (SD3-style call signature),
or a FLUX.1 transformer (2x2-packed tokens, distilled guidance), applies classifier-free
guidance, adds LoRA adapters through peft and exposes the frozen reference (the adapters
disabled) for the KL term.

Shapes: B batch, C/H/W latent channels and size, L context tokens, D embedding width, T steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
CFG_GRADIENTS = ("conditional", "both")
"""What classifier-free guidance trains: the text-conditioned branch only (Flow-GRPO's reference
code detaches the unconditional prediction), or both branches."""


class SDEStep(NamedTuple):
    """One transition: the next latent, its per-sample log-prob (B,), the mean and the std."""

    x_next: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor
    """(B,) the transition's standard deviation ``std_s * sqrt(-dt)`` (0 for an ODE step)."""


def sde_std(sigma: Tensor, noise_level: float, sigma_guard: float | Tensor | None = None) -> Tensor:
    """Flow-GRPO's ``std_s = eta sqrt(s / (1 - s))``; at ``s = 1`` the denominator uses ``sigma_guard``.

    ``sigma_guard`` is the schedule's second sigma (Flow-GRPO's ``sigma_max = sigmas[1]``); without
    one, ``s = 1`` raises instead of dividing by zero.
    """
    one = sigma >= 1.0
    if bool(one.any()):
        if sigma_guard is None:
            raise ValueError("sde_std at sigma = 1 needs sigma_guard (the schedule's next sigma)")
        denom_sigma = torch.where(one, torch.as_tensor(sigma_guard, dtype=sigma.dtype, device=sigma.device), sigma)
    else:
        denom_sigma = sigma
    return noise_level * torch.sqrt(sigma / (1 - denom_sigma))


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))) if t.dim() == 1 else t


def sde_step(
    velocity: Tensor,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float,
    noise: Tensor | None = None,
    *,
    x_next: Tensor | None = None,
    sigma_guard: float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """One Flow-GRPO SDE step from ``x`` at ``sigma`` to ``sigma_next`` (both (B,) or scalars).

    Pass ``x_next`` to score a stored transition instead of sampling one (its log-prob under the
    current velocity), or ``noise`` to sample with a given xi. ``noise_level = 0`` is the ODE
    Euler step; its log-prob is returned as zeros (a Dirac has no density).
    """
    b = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(b)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device).expand(b)
    dt = _bcast(sigma_next - sigma, x)
    if noise_level == 0.0:
        mean = x + velocity * dt
        zeros = torch.zeros(b, dtype=x.dtype, device=x.device)
        return SDEStep(mean if x_next is None else x_next, zeros, mean, zeros)
    std_s = _bcast(sde_std(sigma, noise_level, sigma_guard), x)
    s = _bcast(sigma, x)
    mean = x * (1 + std_s**2 / (2 * s) * dt) + velocity * (1 + std_s**2 * (1 - s) / (2 * s)) * dt
    std = std_s * torch.sqrt(-dt)
    if x_next is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_next = mean + std * noise
    log_prob = -((x_next.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return SDEStep(x_next, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, std.reshape(b))


def kl_to_reference(mean: Tensor, ref_mean: Tensor, std: Tensor, dt: Tensor, kind: str = "flow_grpo") -> Tensor:
    """Per-sample KL between the policy's and the reference's step Gaussians (equal std), (B,).

    ``"exact"``: mean_d (mu - mu_ref)^2 / (2 std^2) with the transition std (``SDEStep.std``).
    ``"flow_grpo"``: Flow-GRPO's form, the same without the ``|dt|`` factor in the variance,
    i.e. divided by ``std_s^2 = std^2 / |dt|``.
    """
    sq = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.dim())))
    if kind == "exact":
        return sq / (2 * std**2)
    if kind == "flow_grpo":
        return sq / (2 * std**2 / dt.abs())
    raise ValueError(f"unknown kl kind {kind!r}; valid: exact, flow_grpo")


def guard_log_ratio(new: SDEStep, old_mean: Tensor, old_log_prob: Tensor) -> Tensor:
    """GRPO-Guard's normalised log-ratio ``std (lp_new - lp_old) + mean_d (mu_new - mu_old)^2 / (2 std)``.

    Algebraically ``mean_d(xi * (mu_new - mu_old))`` with ``xi`` the realised step noise: the
    standard log-ratio's negative bias ``-mean_d(dmu^2) / (2 std^2)`` is removed and its ``1/std``
    scale (which lets low-noise steps dominate the gradient) is cancelled.
    """
    std = new.std
    sq = ((new.mean - old_mean) ** 2).mean(dim=tuple(range(1, old_mean.dim())))
    return std * (new.log_prob - old_log_prob) + sq / (2 * std)


class Conditioning(NamedTuple):
    """Prompt conditioning of an SD3-style transformer; the ``negative_*`` pair only for CFG."""

    prompt_embeds: Tensor
    pooled: Tensor
    negative_prompt_embeds: Tensor | None = None
    negative_pooled: Tensor | None = None

    def index(self, idx: Tensor | slice) -> "Conditioning":
        return Conditioning(*(None if t is None else t[idx] for t in self))

    def repeat_interleave(self, n: int) -> "Conditioning":
        return Conditioning(*(None if t is None else t.repeat_interleave(n, dim=0) for t in self))


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters on the attention projections (Flow-GRPO: rank 32, alpha 64)."""

    rank: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    init: str = "gaussian"
    """peft's ``init_lora_weights``: "gaussian" (A random, B zero: the model starts unchanged)."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"invalid LoRA rank/alpha {self.rank}/{self.alpha}")


class FlowImagePolicy(nn.Module):
    """A diffusers flow transformer as a stochastic policy over denoising steps.

    ``finetune="lora"`` adds peft adapters (only they train; the reference is the same module
    with adapters disabled); ``"full"`` trains every weight and keeps a frozen deep copy as the
    reference (only built when a KL term asks for it).
    """

    def __init__(
        self,
        transformer: nn.Module,
        *,
        guidance_scale: float = 1.0,
        finetune: str = "lora",
        lora: LoraSpec | None = None,
        noise_level: float = 0.7,
        cfg_gradient: str = "conditional",
        timestep_levels: int | None = None,
    ) -> None:
        super().__init__()
        if cfg_gradient not in CFG_GRADIENTS:
            raise ValueError(f"unknown cfg_gradient {cfg_gradient!r}; valid: {', '.join(CFG_GRADIENTS)}")
        if finetune not in ("lora", "full"):
            raise ValueError(f"unknown finetune mode {finetune!r}; valid: lora, full")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        self.finetune = finetune
        self.noise_level = float(noise_level)
        self.cfg_gradient = cfg_gradient
        self.timestep_levels = timestep_levels
        self.autocast: torch.dtype | None = None
        """torch.autocast dtype of the transformer's forward (None: the weights' own dtype)."""
        self._reference: nn.Module | None = None
        transformer.requires_grad_(finetune == "full")
        if finetune == "lora":
            from peft import LoraConfig

            spec = lora or LoraSpec()
            present = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()} | {".".join(name.split(".")[-2:]) for name, _ in transformer.named_modules()}
            targets = [t for t in spec.target_modules if t in present]
            if not targets:
                raise ValueError(f"none of the LoRA target modules {spec.target_modules} exist in {type(transformer).__name__}")
            cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights=spec.init, target_modules=targets)
            transformer.add_adapter(cfg)  # diffusers' peft integration: only lora_* parameters require grad
            for name, p in transformer.named_parameters():  # adapters train in float32 even on a bf16/fp16 model
                if "lora_" in name and p.dtype != torch.float32:
                    p.data = p.data.float()

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The (guided) velocity at ``x`` (B,C,H,W) and ``sigma`` (B,); one batched forward with CFG
        (under ``torch.autocast(self.autocast)`` when set; the result is float32 either way)."""
        if self.autocast is None:
            return self._velocity(x, sigma, cond)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self._velocity(x, sigma, cond).float()

    def _velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        g = self.guidance_scale
        if self.is_flux:
            return self._flux_velocity(x, sigma, cond)
        t = self.model_sigma(sigma) * 1000.0  # diffusers' timestep = sigma * num_train_timesteps
        dtype = self.transformer.dtype  # latents and SDE maths stay float32; the model may run in bf16/fp16
        if g == 1.0:
            return self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled, return_dict=False)[0].to(
                x.dtype
            )
        if cond.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative prompt embeddings in the conditioning")
        out = self.transformer(
            hidden_states=torch.cat([x, x]).to(dtype),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]),
            pooled_projections=torch.cat([cond.negative_pooled, cond.pooled]),
            return_dict=False,
        )[0].to(x.dtype)
        return self._guide(*out.chunk(2))

    def _guide(self, uncond: Tensor, text: Tensor) -> Tensor:
        """``uncond + g (text - uncond)``; with ``cfg_gradient="conditional"`` (Flow-GRPO's
        ``compute_log_prob``) the unconditional prediction is detached, so only the
        text-conditioned branch is trained. Forward values are identical either way."""
        if self.cfg_gradient == "conditional":
            uncond = uncond.detach()
        return uncond + self.guidance_scale * (text - uncond)

    def model_sigma(self, sigma: Tensor) -> Tensor:
        """The noise level the transformer is told: ``sigma``, or with ``timestep_levels`` n,
        ``int(sigma * n) / n`` with the product rounded in float32 as the reference's tensors are
        (G2RPO / DanceGRPO feed Flux ``int(sigma * 1000) / 1000``; float64 would turn 0.9 into 0.899)."""
        if self.timestep_levels is None:
            return sigma
        n = self.timestep_levels
        return (torch.floor(sigma.float() * n) / n).to(sigma.dtype)

    @property
    def is_flux(self) -> bool:
        return hasattr(self.transformer.config, "axes_dims_rope")

    def _flux_velocity(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """FLUX.1: 2x2-packed latent tokens with positional ids, timestep = sigma, and either the
        distilled guidance embedding (``guidance_embeds``) or true CFG with negative prompts."""
        b, c, h, w = x.shape
        dtype = self.transformer.dtype
        tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(dtype)
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device, dtype=dtype)
        distilled = bool(getattr(self.transformer.config, "guidance_embeds", False))
        true_cfg = self.guidance_scale > 1.0 and not distilled
        if true_cfg and cond.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative prompt embeddings in the conditioning")
        n = 2 if true_cfg else 1
        out = self.transformer(
            hidden_states=tokens.repeat(n, 1, 1).to(dtype),
            timestep=self.model_sigma(sigma).repeat(n).to(dtype),
            guidance=torch.full((b * n,), self.guidance_scale, device=x.device, dtype=torch.float32) if distilled else None,
            pooled_projections=torch.cat([cond.negative_pooled, cond.pooled]) if true_cfg else cond.pooled,
            encoder_hidden_states=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]) if true_cfg else cond.prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0].to(x.dtype)
        if true_cfg:
            out = self._guide(*out.chunk(2))
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def ode(self, x: Tensor, sigmas: Tensor, cond: Conditioning, indices: list[int] | None = None) -> Tensor:
        """Deterministic Euler steps ``x + (s_b - s_a) v(x, s_a)`` along ``indices`` of ``sigmas``
        (default: every step); a last step that skips indices is a jump (G2RPO's x0 prediction
        when it lands on sigma = 0)."""
        idx = list(range(len(sigmas))) if indices is None else indices
        for a, b in zip(idx[:-1], idx[1:]):
            v = self.velocity(x, sigmas[a].expand(x.shape[0]), cond)
            x = x + (sigmas[b] - sigmas[a]) * v
        return x

    def step(
        self,
        x: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        cond: Conditioning,
        *,
        noise_level: float | None = None,
        noise: Tensor | None = None,
        x_next: Tensor | None = None,
        sigma_guard: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SDEStep:
        """Velocity forward + ``sde_step`` (sample, or score ``x_next``)."""
        v = self.velocity(x, sigma, cond)
        eta = self.noise_level if noise_level is None else noise_level
        return sde_step(v, x, sigma, sigma_next, eta, noise, x_next=x_next, sigma_guard=sigma_guard, generator=generator)

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen pre-fine-tuning model as a context: LoRA disabled, or the stored full copy."""
        if self.finetune == "lora":
            self.transformer.disable_adapters()
            try:
                yield self
            finally:
                self.transformer.enable_adapters()
        else:
            if self._reference is None:
                raise RuntimeError("full fine-tuning keeps a reference only after keep_reference()")
            live, self.transformer = self.transformer, self._reference
            try:
                yield self
            finally:
                self.transformer = live

    def keep_reference(self) -> None:
        """Full fine-tuning: freeze a copy of the current weights as the KL reference."""
        if self.finetune == "full" and self._reference is None:
            ref = copy.deepcopy(self.transformer).requires_grad_(False).eval()
            object.__setattr__(self, "_reference", ref)  # not a submodule: outside state_dict/optimizer

    @property
    def reference_transformer(self) -> nn.Module | None:
        """The frozen full copy ``keep_reference`` made (None for LoRA or before it)."""
        return self._reference

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """What fine-tuning changed: the LoRA weights (peft naming), or the full transformer."""
        if self.finetune == "lora":
            from peft.utils import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.transformer).items()}
        return {k: v.detach().clone() for k, v in self.transformer.state_dict().items()}

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.finetune == "lora":
            from peft.utils import set_peft_model_state_dict

            res = set_peft_model_state_dict(self.transformer, state)
            if getattr(res, "unexpected_keys", None):
                raise ValueError(f"unexpected LoRA keys: {res.unexpected_keys[:3]}")
        else:
            self.transformer.load_state_dict(state)

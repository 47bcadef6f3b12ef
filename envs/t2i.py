"""The text-to-image "environment": a diffusers flow-matching pipeline, prompts and rewards.

An episode is one image: the observation is a prompt's conditioning, the actions are the
denoising steps (taken by the policy), and the reward comes once, on the decoded image. This
module owns everything except the transformer's steps: loading the pipeline from a local folder
(``StableDiffusion3Pipeline`` with its SD3 / SD3.5 checkpoints, ``FluxPipeline`` with FLUX.1;
``--model digits`` is the small SD3-architecture model shipped in ``assets/digits-sd3``), prompt
sets, ``encode_prompt`` (cached per prompt), the sigma schedule (Flux's resolution-dependent
shift included), initial noise, VAE decoding and the reward registry (``envs.rewards``).
Latents are always (B, C, H, W); Flux's 2x2 packing is the policy's business.

diffusers / transformers are imported lazily: ``import genrl_envs`` stays light for control users.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genrl_envs.base import EnvError
from genrl_envs.rewards import RewardSet

#: ``--model digits``: the SD3-architecture digits model built by scripts/pretrain_digits.py
try:  # installed package data (genrl_assets), which is the repository's assets/ in a clone
    from genrl_assets import DIGITS_MODEL_DIR
except ImportError:  # pragma: no cover - a source tree without the install
    DIGITS_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "digits-sd3"
SIDECAR = "genrl_t2i.json"
SUPPORTED_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-model sampling defaults, read from ``<model>/genrl_t2i.json`` when present."""

    resolution: int = 512
    guidance_scale: float = 4.5
    num_inference_steps: int = 40
    max_sequence_length: int = 256
    prompts: str | None = None

    @classmethod
    def read(cls, model_dir: Path) -> "SamplingDefaults":
        path = model_dir / SIDECAR
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EnvError(f"corrupt {path}: {exc}") from None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def resolve_model_dir(model: str | Path) -> Path:
    """``"digits"`` -> the shipped digits model; otherwise a local diffusers pipeline folder."""
    if str(model) == "digits":
        path = DIGITS_MODEL_DIR
        if not (path / "model_index.json").is_file():
            raise EnvError(f"the digits model is missing at {path}; reinstall genrl, or in a clone rebuild it: python scripts/pretrain_digits.py")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise EnvError(f"model folder {path} does not exist (give a local diffusers pipeline folder or 'digits')")
    if not (path / "model_index.json").is_file():
        raise EnvError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    return path


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """Load a flow-matching text-to-image pipeline from a local folder, offline."""
    path = resolve_model_dir(model)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as exc:
        raise EnvError(f"corrupt {path / 'model_index.json'}: {exc}") from None
    cls_name = index.get("_class_name")
    if cls_name not in SUPPORTED_PIPELINES:
        raise EnvError(f"{path} holds a {cls_name}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars and processor notices drown genrl's own lines
    transformers.utils.logging.set_verbosity_error()

    missing = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    try:
        pipe = getattr(diffusers, cls_name).from_pretrained(str(path), dtype=dtype, **missing)
    except (OSError, ValueError, RuntimeError) as exc:
        raise EnvError(f"cannot load the pipeline in {path}: {str(exc).splitlines()[0]}") from None
    if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise EnvError(f"{path}: scheduler is {type(pipe.scheduler).__name__}, a FlowMatchEulerDiscreteScheduler is required")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(source: str | Path | list[str] | None, default: str | None = None) -> list[str]:
    """Prompts from a list, a text file (one per line, '#' comments), a JSON list, or a built-in set."""
    if isinstance(source, list):
        prompts = [str(p) for p in source]
    else:
        name = str(source) if source is not None else default
        if name is None:
            raise EnvError("no prompts: give a prompts file (one prompt per line) or a built-in set ('digits')")
        if name == "digits":
            from genrl_envs.digits import digit_prompts

            prompts = digit_prompts()
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise EnvError(f"prompts file {path} does not exist (built-in sets: digits)")
            try:
                text = path.read_text(encoding="utf-8", errors="strict")
            except UnicodeDecodeError:
                raise EnvError(f"prompts file {path} is not UTF-8 text (one prompt per line, or a JSON list)") from None
            if path.suffix == ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise EnvError(f"prompts file {path} is not valid JSON: {exc}") from None
                if not (isinstance(data, list) and all(isinstance(p, str) for p in data)):
                    raise EnvError(f"prompts file {path} must hold a JSON list of strings")
                prompts = data
            else:
                prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise EnvError(f"no prompts in {source}")
    return prompts


class TextToImageEnv:
    """Prompts + pipeline + rewards; the policy supplies the denoising steps.

    Args:
        model: "digits" or a local diffusers pipeline folder (e.g. an SD3.5 snapshot).
        prompts: a prompts file, a list, or a built-in set name; default: the model's own set.
        rewards: a reward spec (``envs.rewards.parse_reward_spec``).
        resolution, guidance_scale, max_sequence_length: default to the model's sidecar values.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        prompts: str | Path | list[str] | None = None,
        rewards: str | dict[str, float] | list[str] = "digit",
        resolution: int | None = None,
        guidance_scale: float | None = None,
        max_sequence_length: int | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        pipeline: Any = None,
    ) -> None:
        # prompts and rewards are checked before the (possibly large) pipeline is loaded
        if pipeline is None:
            self.model_dir: Path | None = resolve_model_dir(model)
            defaults = SamplingDefaults.read(self.model_dir)
        else:  # an already built pipeline (tests, notebooks)
            self.model_dir, defaults = None, SamplingDefaults()
        self.prompts = read_prompts(prompts, defaults.prompts)
        self.rewards = RewardSet(rewards, device)  # unknown reward names fail here, before any work
        self.pipe = load_pipeline(self.model_dir, dtype) if pipeline is None else pipeline
        self.device = torch.device(device)
        self.dtype = dtype
        self.defaults = defaults
        self.guidance_scale = float(defaults.guidance_scale if guidance_scale is None else guidance_scale)
        self.max_sequence_length = int(defaults.max_sequence_length if max_sequence_length is None else max_sequence_length)
        res = int(defaults.resolution if resolution is None else resolution)
        vae = self.pipe.vae
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.flux = type(self.pipe).__name__.startswith("Flux")
        tcfg = self.pipe.transformer.config
        if self.flux and vae is None:
            raise EnvError("a Flux pipeline needs its VAE")
        # Flux packs 2x2 latent patches into tokens; SD3 patchifies inside the transformer
        patch = 2 if self.flux else int(getattr(tcfg, "patch_size", 1))
        if res % (self.vae_scale * patch):
            raise EnvError(f"resolution {res} must be a multiple of {self.vae_scale * patch} for this model")
        self.resolution = res
        channels = int(tcfg.in_channels) // 4 if self.flux else int(tcfg.in_channels)
        self.latent_shape = (channels, res // self.vae_scale, res // self.vae_scale)
        # Flux-dev distils guidance into an embedding: no negative prompts, no doubled batch
        self.true_cfg = self.guidance_scale > 1.0 and not (self.flux and getattr(tcfg, "guidance_embeds", False))
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(self.device).requires_grad_(False).eval()
        self.pipe.transformer.to(self.device)
        self._cache: dict[str, tuple[Tensor, ...]] = {}

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(prompt_embeds, pooled, negative_prompt_embeds, negative_pooled)`` for ``prompts``.

        Each distinct prompt is encoded once, on its own (text encoders are frozen), so an
        embedding never depends on which prompts shared its batch: runs resume bitwise. The
        negatives (empty prompt) are only returned when ``guidance_scale > 1``.
        """
        cfg = self.true_cfg
        for p in dict.fromkeys(prompts):
            if p in self._cache:
                continue
            if self.flux:
                pe, pp, _ = self.pipe.encode_prompt(prompt=[p], prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
                npe, npp = self.pipe.encode_prompt(prompt=[""], prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)[:2] if cfg else (None, None)
            else:
                pe, npe, pp, npp = self.pipe.encode_prompt(
                    prompt=[p], prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                    do_classifier_free_guidance=cfg, max_sequence_length=self.max_sequence_length,
                )  # fmt: skip
            self._cache[p] = (pe[0], pp[0], npe[0] if cfg else None, npp[0] if cfg else None)
        rows = [self._cache[p] for p in prompts]
        stack = [torch.stack([r[j] for r in rows]).to(self.dtype) if rows[0][j] is not None else None for j in range(4)]
        return stack[0], stack[1], stack[2], stack[3]  # type: ignore[return-value]

    def sigmas(self, num_steps: int) -> Tensor:
        """The scheduler's sigma schedule for ``num_steps`` steps: (T+1,), from ~1 down to 0."""
        if num_steps < 1:
            raise EnvError(f"num_steps must be >= 1, got {num_steps}")
        sched = self.pipe.scheduler
        if getattr(sched.config, "use_dynamic_shifting", False):  # Flux: the shift depends on the token count
            import numpy as np
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = sched.config
            tokens = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
            mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps).tolist(), mu=mu, device=self.device)
        else:
            sched.set_timesteps(num_steps, device=self.device)
        return sched.sigmas.to(self.device, torch.float32).clone()

    def initial_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial latents (float32 whatever the model's dtype: the SDE log-probs need the precision)."""
        return torch.randn((n, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images (B, C, H, W) in [0, 1] (through the VAE when the model has one)."""
        vae = self.pipe.vae
        if vae is None:
            x = latents
        else:
            z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            x = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def score(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Every reward's scores (B,) for the decoded images."""
        return self.rewards(images, prompts)

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn uniformly (with replacement) from the prompt set."""
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in idx.tolist()]

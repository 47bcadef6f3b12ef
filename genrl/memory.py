"""Peak memory per device of a text-to-image GRPO run, estimated before anything is loaded
(``genrl train --env t2i ... --dry-run``).

Parameter counts are exact: every component of the diffusers pipeline folder (transformer, text
encoders, VAE) is instantiated from its own config on the ``meta`` device, which allocates
nothing, so a folder with configs and no weights (an architecture with random weights) works too.
The rest is arithmetic, per device (rank) of a ``W``-process run:

* **weights**: all components in ``t2i.dtype`` (genrl keeps the text encoders and the VAE on the
  device to encode prompts and decode images every iteration); full fine-tuning with a KL term
  keeps a frozen copy of the transformer;
* **trainable state**: LoRA adapters (r (in + out) per targeted ``nn.Linear``) train in float32:
  weight, gradient and AdamW's two moments, 16 bytes each, 4 more with the EMA; full
  fine-tuning: gradient and two moments in the weights' dtype;
* **activations** of one training forward, the largest term: a micro-batch of b rows (Flow-GRPO:
  P·G / updates_per_epoch / W images, at most ``grpo.micro_batch``; G2RPO: P / W prompts; twice
  that under CFG > 1) over s =
  s_image + s_text tokens, per transformer block ``34 s b h`` bytes at 16 bits (Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models", with flash /
  memory-efficient attention, so no s² term), doubled for float32 activations; with
  ``grpo.gradient_checkpointing`` each block keeps only its input (``s b h`` values) and one block
  is recomputed at a time; with ``grpo.activation_offload`` on a GPU the saved activations live in
  host memory (about one block's worth counted on the device);
* **rollout storage**: x_t, x_t+1 and the mean of every trained step for the rank's images.

An estimate, not a measurement: allocator fragmentation, CUDA context (~0.5 GiB) and kernels'
workspaces come on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_components(folder: Path) -> dict[str, nn.Module]:
    """Each component of a diffusers pipeline folder, built from its config on the meta device."""
    index = json.loads((folder / "model_index.json").read_text())
    out: dict[str, nn.Module] = {}
    for name, spec in index.items():
        if not isinstance(spec, list) or len(spec) != 2 or spec[1] is None or not (folder / name / "config.json").is_file():
            continue
        library, cls_name = spec
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, cls_name)
            with torch.device("meta"):
                out[name] = cls.from_config(cls.load_config(folder / name))
        elif library == "transformers":
            import transformers

            cls = getattr(transformers, cls_name)
            config = transformers.AutoConfig.from_pretrained(folder / name)
            with torch.device("meta"):
                out[name] = cls(config)
    return out


def _lora_params(transformer: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    n = 0
    for name, m in transformer.named_modules():
        tail1, tail2 = name.rsplit(".", 1)[-1], ".".join(name.split(".")[-2:])
        if isinstance(m, nn.Linear) and (tail1 in targets or tail2 in targets):
            n += rank * (m.in_features + m.out_features)
    return n


def estimate_image_memory(cfg: Any, world_size: int = 1) -> dict[str, Any]:
    """The estimate (bytes per term and in total, and the quantities behind it) for ``cfg``, a
    text-to-image ``TrainConfig``, on each of ``world_size`` processes."""
    from genrl.algos.grpo import trained_steps
    from genrl_envs.t2i import resolve_model_dir
    from genrl_policies.t2i import LoraSpec

    folder = resolve_model_dir(cfg.t2i.model)
    g = cfg.grpo
    parts = _meta_components(folder)
    if "transformer" not in parts:
        raise ValueError(f"{folder} has no transformer/config.json")
    tr = parts["transformer"]
    tc = tr.config
    wbytes = _BYTES[cfg.t2i.dtype]
    counts = {k: _count(m) for k, m in parts.items()}
    weights = sum(counts.values()) * wbytes
    if g.finetune == "full" and g.kl_coef > 0:
        weights += counts["transformer"] * wbytes  # the frozen reference copy
    if g.finetune == "lora":
        trainable = _lora_params(tr, g.lora_rank, LoraSpec().target_modules)
        state = trainable * (16 + (4 if g.ema else 0))
    else:
        trainable = counts["transformer"]
        state = trainable * wbytes * 3 + (trainable * 4 if g.ema else 0)
    if g.fsdp and world_size > 1:  # FSDP2: 1/N of the transformer('s copies) and its state, plus the units being gathered
        blocks = [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(tr, name, None) or []]
        block = max((_count(b) for b in blocks), default=0)
        root = counts["transformer"] - sum(_count(b) for b in blocks)  # embeddings, norms, projections: gathered for the whole forward
        copies = 2 if g.kl_coef > 0 else 1
        weights -= copies * counts["transformer"] * wbytes
        weights += copies * (counts["transformer"] * wbytes // world_size) + (root + 2 * block) * wbytes  # a block computed, the next prefetched
        state //= world_size
    # tokens: image patches of the latent, text (CLIP 77 + T5 max length, or the model's own)
    own = json.loads((folder / "genrl_t2i.json").read_text()) if (folder / "genrl_t2i.json").is_file() else {}  # the model's own defaults
    vae_scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1) if "vae" in parts else 1
    res = g.resolution or int(own.get("resolution", 512))  # genrl_envs.t2i.SamplingDefaults
    s_img = (res // vae_scale // int(tc.patch_size)) ** 2
    tok = folder / "tokenizer" / "tokenizer_config.json"
    clip_len = min(int(json.loads(tok.read_text()).get("model_max_length", 77)), 77) if tok.is_file() else 77
    s_txt = (clip_len if "text_encoder" in parts else 0) + (int(own.get("max_sequence_length", 256)) if "text_encoder_3" in parts else 0)
    s = s_img + s_txt
    h = int(tc.num_attention_heads) * int(tc.attention_head_dim)
    layers = int(tc.num_layers)
    guidance = g.guidance_scale if g.guidance_scale is not None else float(own.get("guidance_scale", 4.5))
    cfg_rows = 2 if guidance > 1 else 1
    if cfg.algo == "g2rpo":
        rows = -(-g.prompts_per_iter // world_size)
    else:
        rows = -(-(g.prompts_per_iter * g.group_size) // (g.updates_per_epoch * world_size))
        rows = min(rows, g.micro_batch or rows)
    b = rows * cfg_rows
    act_bytes = 2 if (g.autocast != "off" or wbytes == 2) else 4
    per_block = 34 * s * b * h * act_bytes // 2
    if g.gradient_checkpointing:
        activations = layers * s * b * h * act_bytes + per_block
    else:
        activations = layers * per_block
    if g.activation_offload and cfg.run.device.startswith("cuda"):
        activations = per_block  # the saved tensors wait in host memory; about one block's work lives on the GPU
    latent = int(tc.in_channels) * (res // vae_scale) ** 2 * 4
    n_local = -(-(g.prompts_per_iter * g.group_size) // world_size)
    trained = len(trained_steps(g)) if cfg.algo == "flow-grpo" else (g.g2rpo_steps or max(1, g.n_steps // 2))
    rollout = 3 * trained * n_local * latent
    total = weights + state + activations + rollout
    return {
        "model": str(folder), "params": counts, "trainable_params": trainable, "tokens": {"image": s_img, "text": s_txt},
        "hidden": h, "layers": layers, "micro_batch_rows": b, "resolution": res, "world_size": world_size,
        "bytes": {"weights": weights, "trainable_state": state, "activations": activations, "rollout": rollout, "total": total},
    }  # fmt: skip


def format_estimate(est: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    b = est["bytes"]
    gib = lambda x: f"{x / GIB:.2f} GiB"  # noqa: E731
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in est["params"].items())
    return "\n".join([
        f"model {est['model']}: {params}; trainable {est['trainable_params'] / 1e6:.2f}M",
        f"training forward: {est['micro_batch_rows']} rows x {est['tokens']['image']} image + {est['tokens']['text']} text tokens, "
        f"{est['layers']} blocks of width {est['hidden']}, {est['resolution']} px, {est['world_size']} process(es)",
        f"estimated peak memory per device: weights {gib(b['weights'])} + trainable state {gib(b['trainable_state'])} + "
        f"activations {gib(b['activations'])} + rollout {gib(b['rollout'])} = {gib(b['total'])} (plus allocator and CUDA context)",
    ])  # fmt: skip


__all__ = ["estimate_image_memory", "format_estimate"]

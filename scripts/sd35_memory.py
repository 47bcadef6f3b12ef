"""Estimated peak memory per GPU of Flow-GRPO on the SD3.5-Medium architecture, per GPU count.

    python scripts/sd35_memory.py                    # the table the README shows
    python scripts/sd35_memory.py --out /tmp/sd35    # keep the config-only pipeline folder

The weights cannot be downloaded here, and the estimate does not need them: this writes a
diffusers pipeline folder holding only configs with SD3.5-Medium's published architecture
(MMDiT-X transformer, 24 blocks of width 1536, dual attention in blocks 0-12, 16 latent channels,
patch 2; CLIP-L and OpenCLIP-bigG text towers with projections; a T5-XXL encoder; the 16-channel
VAE), and runs ``genrl.memory.estimate_image_memory`` on it (parameters counted on the meta
device) for the settings below, once per GPU count. The same numbers come from
``genrl train --env t2i --model <folder> --dry-run ...`` under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

CONFIGS = {
    "model_index.json": {
        "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
    "transformer/config.json": {
        "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128,
        "dual_attention_layers": list(range(13)),
    },
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_act": "quick_gelu", "hidden_size": 768,
        "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
        "max_position_embeddings": 77, "vocab_size": 49408,
    },
    "text_encoder_2/config.json": {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_act": "gelu", "hidden_size": 1280,
        "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
        "max_position_embeddings": 77, "vocab_size": 49408,
    },
    "text_encoder_3/config.json": {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64,
        "num_layers": 24, "feed_forward_proj": "gated-gelu", "vocab_size": 32128, "relative_attention_num_buckets": 32,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2,
        "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
        "use_quant_conv": False, "use_post_quant_conv": False,
    },
    "tokenizer/tokenizer_config.json": {"model_max_length": 77},
    "genrl_t2i.json": {"resolution": 512, "max_sequence_length": 256, "guidance_scale": 4.5, "num_inference_steps": 40},
}  # fmt: skip


def write_folder(folder: Path) -> Path:
    for name, data in CONFIGS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    return folder


def main() -> None:
    from genrl.config import config_from_dict
    from genrl.memory import GIB, estimate_image_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="where to write the config-only pipeline folder (default: a temporary one)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()
    folder = write_folder(Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "sd35-medium")
    rows = []
    for gpus in args.gpus:
        # Flow-GRPO's settings (the flow-grpo preset: G = 24, CFG 4.5, LoRA r 32, 10 SDE steps), 16 prompts x 24 images
        # per iteration over all GPUs, bf16 weights with bf16 autocast, micro-batches of 4 images (8 rows with CFG)
        for ckpt in (False, True):
            cfg = config_from_dict({
                "env": "t2i", "algo": "flow-grpo", "model": str(folder), "preset": "flow-grpo", "dtype": "bfloat16",
                "grpo": {"prompts_per_iter": 16, "micro_batch": 4, "autocast": "bfloat16", "gradient_checkpointing": ckpt,
                         "resolution": 512},
                "run": {"progress": False},
            })  # fmt: skip
            est = estimate_image_memory(cfg, world_size=gpus)
            rows.append((gpus, ckpt, est))
    params = rows[0][2]["params"]
    print("parameters: " + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in params.items()) + f"; LoRA r32 {rows[0][2]['trainable_params'] / 1e6:.1f}M")
    print("| GPUs | images per GPU per iteration | gradient checkpointing | weights | LoRA + Adam + EMA | activations | rollout | total per GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for gpus, ckpt, est in rows:
        b = est["bytes"]
        print(f"| {gpus} | {16 * 24 // gpus} | {'yes' if ckpt else 'no'} | {b['weights'] / GIB:.1f} GiB | {b['trainable_state'] / GIB:.2f} GiB | "
              f"{b['activations'] / GIB:.1f} GiB | {b['rollout'] / GIB:.2f} GiB | **{b['total'] / GIB:.1f} GiB** |")  # fmt: skip
    # full fine-tuning of the transformer (bf16 weights, AdamW moments and EMA), gradient checkpointing on:
    # replicated (data parallel) vs sharded (grpo.fsdp)
    print()
    print("| GPUs | full fine-tuning | weights | gradients + AdamW + EMA | activations | rollout | total per GPU |")
    print("|---|---|---|---|---|---|---|")
    for gpus in args.gpus:
        for fsdp in (False, True) if gpus > 1 else (False,):
            cfg = config_from_dict({
                "env": "t2i", "algo": "flow-grpo", "model": str(folder), "preset": "flow-grpo", "dtype": "bfloat16",
                "grpo": {"prompts_per_iter": 16, "micro_batch": 4, "autocast": "bfloat16", "gradient_checkpointing": True,
                         "resolution": 512, "finetune": "full", "fsdp": fsdp},
                "run": {"progress": False},
            })  # fmt: skip
            b = estimate_image_memory(cfg, world_size=gpus)["bytes"]
            print(f"| {gpus} | {'FSDP (grpo.fsdp)' if fsdp else 'replicated'} | {b['weights'] / GIB:.1f} GiB | {b['trainable_state'] / GIB:.1f} GiB | "
                  f"{b['activations'] / GIB:.1f} GiB | {b['rollout'] / GIB:.2f} GiB | **{b['total'] / GIB:.1f} GiB** |")  # fmt: skip


if __name__ == "__main__":
    main()

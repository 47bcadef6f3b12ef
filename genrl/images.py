"""What a text-to-image run shows and hands over: labelled image grids, the before / after
picture, the model card, and the export diffusers loads (a LoRA, or the whole pipeline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from genrl.config import TrainConfig
from genrl.distributed import replica

if TYPE_CHECKING:
    from genrl.algos.grpo import GRPO


def export_model(algo: GRPO, cfg: TrainConfig, out: Path) -> Path:
    """Write the fine-tuned model so that diffusers loads it (LoRA file, or the full pipeline)."""
    if getattr(algo, "fsdp", False):
        return _export_sharded(algo, cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = algo.env.pipe
    if cfg.grpo.finetune == "lora":
        meta = algo.policy.transformer.peft_config["default"].to_dict()  # rank, alpha, targets: loads at the trained scale
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        type(pipe).save_lora_weights(str(out), transformer_lora_layers=algo.policy.adapter_state_dict(), safe_serialization=True, transformer_lora_adapter_metadata=meta)
        # the base model by name only ("digits", or the model folder's name): no path of this machine
        base = "digits" if cfg.t2i.model == "digits" else (algo.env.model_dir.name if algo.env.model_dir is not None else None)
        (out / "genrl_model.json").write_text(json.dumps({"base_model": base, "lora": "pytorch_lora_weights.safetensors"}, indent=2))
    else:
        pipe.save_pretrained(str(out), safe_serialization=True)
        if algo.env.model_dir is not None and (algo.env.model_dir / "genrl_t2i.json").is_file():
            shutil.copy(algo.env.model_dir / "genrl_t2i.json", out / "genrl_t2i.json")
    return out


def _export_sharded(algo: GRPO, cfg: TrainConfig, out: Path) -> Path:
    """``export_model`` of an FSDP run: every rank gives its shards (a collective), rank 0 puts the
    full weights into an unsharded transformer built on the meta device (no second allocation)
    and saves the pipeline with it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from genrl.distributed import unsharded_class

    sharded = algo.policy.transformer
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not replica().is_main:
        return out
    with torch.device("meta"):
        plain = unsharded_class(sharded).from_config(sharded.config)
    plain.load_state_dict(full, assign=True)
    pipe = algo.env.pipe
    pipe.register_modules(transformer=plain)
    try:
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(str(out), safe_serialization=True)
    finally:
        pipe.register_modules(transformer=sharded)
    if algo.env.model_dir is not None and (algo.env.model_dir / "genrl_t2i.json").is_file():
        shutil.copy(algo.env.model_dir / "genrl_t2i.json", out / "genrl_t2i.json")
    return out


def save_grid(images: torch.Tensor, rows: int, path: Path, min_size: int = 96, labels: list[str] | None = None,
              title: str | None = None) -> Path:  # fmt: skip
    """A PNG grid of (rows * cols, C, H, W) images in [0, 1], upscaled (nearest) to >= min_size px,
    with an optional label left of each row (the prompts) and a title line above."""
    from PIL import Image, ImageDraw

    n, c, h, w = images.shape
    cols = n // rows
    scale = max(1, -(-min_size // h))
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    arr = arr.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    pad = 2
    H, W = h * scale + pad, w * scale + pad
    canvas = torch.full((c, rows * H + pad, cols * W + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        canvas[:, pad + r * H : pad + r * H + h * scale, pad + col * W : pad + col * W + w * scale] = arr[i]
    img = canvas.permute(1, 2, 0).numpy()
    grid = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
    left = 8 + 7 * max((len(t) for t in labels), default=0) if labels else 0
    top = 20 if title else 0
    out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    out.paste(grid, (left, top))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((4, 4), title, fill="black")
    for r, text in enumerate(labels or []):
        draw.text((4, top + pad + r * H + (H - 10) // 2), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def before_after(run_dir: Path, step: int) -> Path | None:
    """``images/before-after-<step>.png``: the base model's grid and the step's grid side by side."""
    from PIL import Image

    before, after = run_dir / "images" / "grid-0.png", run_dir / "images" / f"grid-{step}.png"
    if not (before.is_file() and after.is_file()):
        return None
    a, b = Image.open(before), Image.open(after)
    out = Image.new("RGB", (a.width + b.width + 12, max(a.height, b.height)), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + 12, 0))
    path = run_dir / "images" / f"before-after-{step}.png"
    out.save(path)
    return path


def model_card(cfg: TrainConfig, run_dir: Path, step: int, metrics: dict[str, float]) -> Path:
    """``final/README.md``: base model, algorithm, reward, budget, evaluation and a sample grid."""
    final = run_dir / "final"
    grid = run_dir / "images" / f"grid-{step}.png"
    if grid.is_file():
        shutil.copy(grid, final / "sample.png")
    base = "digits (genrl's shipped digits model)" if cfg.t2i.model == "digits" else Path(cfg.t2i.model).name
    evals = "\n".join(f"- {k}: {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("eval/"))
    kind = f"LoRA (rank {cfg.grpo.lora_rank}, alpha {cfg.grpo.lora_alpha})" if cfg.grpo.finetune == "lora" else "full fine-tuning"
    text = f"""---
library_name: diffusers
base_model: {base}
tags: [genrl, {cfg.algo}, text-to-image, reinforcement-learning]
---

# {cfg.algo} fine-tune of {base}

Trained with genrl ({kind}) for {step} scored images, reward `{cfg.t2i.reward}`, seed {cfg.run.seed}.
Full settings: the run's `config.json`; learning curves: `curves.png` beside this folder.

## Evaluation (ODE sampling, fixed prompts and seeds)

{evals or "- (none)"}

![sample](sample.png)
"""
    (final / "README.md").write_text(text)
    return final / "README.md"


def evaluate_grid(algo: GRPO, cfg: TrainConfig, run_dir: Path, step: int) -> dict[str, float]:
    """ODE images for the first (up to 10) prompts x ``run.eval_episodes`` fixed seeds: grid + rewards."""
    prompts = algo.env.prompts[:10]
    seeds = list(range(cfg.run.eval_episodes))
    images = algo.generate(prompts, seeds)
    title = "base model" if step == 0 else f"{cfg.algo}, {step} images" + (" (EMA)" if cfg.grpo.ema else "")
    if replica().is_main:  # FSDP: every rank generated (a collective), rank 0 writes
        save_grid(images, len(prompts), run_dir / "images" / f"grid-{step}.png", labels=prompts, title=title)
    scores = algo.env.score(images, [p for p in prompts for _ in seeds])
    out = {f"eval/reward_{k}": float(v.mean()) for k, v in scores.items()}
    out["eval/reward_total"] = float(algo.env.rewards.total(scores).mean())
    return out

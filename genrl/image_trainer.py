"""Text-to-image fine-tuning runs: build -> (resume) -> iterate -> log -> grids -> checkpoint -> export.

The same run folder as control runs (``config.json``, ``progress.csv``, ``tb/``, ``curves.png``,
``checkpoints/<step>/``) plus ``images/grid-<step>.png`` (fixed prompts x fixed seeds, ODE
sampling) and ``final/``: the LoRA as ``pytorch_lora_weights.safetensors`` (load with
``StableDiffusion3Pipeline.from_pretrained(base).load_lora_weights(final)``), or for full
fine-tuning the whole pipeline (``StableDiffusion3Pipeline.from_pretrained(final)``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from genrl.algos.grpo import GRPO
from genrl.checkpoint import load_checkpoint, normal_permissions, save_checkpoint
from genrl.config import TrainConfig
from genrl.distributed import replica
from genrl.errors import CheckpointError
from genrl.images import before_after, evaluate_grid, export_model, model_card, save_grid
from genrl.logger import Logger
from genrl.runs import check_same_config, seed_everything

_FILES = ("adapter.safetensors", "trainer.safetensors", "optimizer.pt", "state.json")


def build_image(cfg: TrainConfig, run_dir: Path | None = None) -> GRPO:
    """Seed, load the pipeline and rewards, wrap the transformer as a policy, build the algorithm.

    A run folder's own copy of the prompts (``prompts.json``, written when the run started) wins
    over ``cfg.t2i.prompts``, so an edited prompts file cannot change a resumed run.
    """
    from genrl_envs.t2i import TextToImageEnv
    from genrl_policies.t2i import FlowImagePolicy, LoraSpec

    seed_everything(cfg.run.seed)
    g = cfg.grpo
    prompts = cfg.t2i.prompts
    if run_dir is not None and (run_dir / "prompts.json").is_file():
        prompts = str(run_dir / "prompts.json")
    env = TextToImageEnv(
        cfg.t2i.model, prompts=prompts, rewards=cfg.t2i.reward, resolution=g.resolution,
        guidance_scale=g.guidance_scale, device=cfg.run.device, dtype=getattr(torch, cfg.t2i.dtype),
    )  # fmt: skip
    policy = FlowImagePolicy(
        env.transformer, guidance_scale=env.guidance_scale, finetune=g.finetune,
        lora=LoraSpec(rank=g.lora_rank, alpha=g.lora_alpha), noise_level=g.noise_level,
    )  # fmt: skip
    return GRPO(policy, env, g, algo=cfg.algo, seed=cfg.run.seed, total_images=cfg.run.total_steps)


def save_image_state(algo: GRPO, cfg: TrainConfig, run_dir: Path) -> Path | None:
    """Checkpoint ``checkpoints/<step>/`` through the one writer (``genrl.checkpoint``): the
    trained weights in ``adapter.safetensors``, RNGs and EMA in ``trainer.safetensors``. Several
    processes: rank 0 writes, with each other rank's sampling stream and global RNG in
    ``rank<r>.safetensors``; the other ranks return None."""
    st, rep = algo.state_dict(), replica()
    own = {"generator": st["generator"], "torch_global": torch.get_rng_state()}
    files = rep.all_gather_bytes(save_bytes(own), "gathering every rank's state for the checkpoint") if rep.world_size > 1 else []
    if not rep.is_main:
        return None
    state = {"kind": "t2i", "algo": cfg.algo, "finetune": cfg.grpo.finetune, "iteration": st["iteration"], "global_step": algo.global_step,
             "optimizer_steps": st["optimizer_steps"], "config": cfg.to_dict()}  # fmt: skip
    trainer = {**own, **st.get("ema", {})}
    if rep.world_size > 1:
        state["distributed"] = {"world_size": rep.world_size}
        trainer["shared_generator"] = st["shared_generator"]
    return save_checkpoint(
        run_dir, algo.global_step, trainer_tensors=trainer, optimizer_state=st["optimizer"], state=state,
        tensor_files={"adapter": st["adapter"], **{f"rank{r}": load_bytes(files[r]) for r in range(1, rep.world_size)}},
    )  # fmt: skip


def restore_image_state(algo: GRPO, cfg: TrainConfig, ckpt: Path) -> str | None:
    """Load ``ckpt`` into ``algo`` (each rank its own sampling stream); returns a note when the
    number of processes changed (what then does not continue exactly), else None."""
    data = load_checkpoint(ckpt, files=_FILES)
    state, trainer = data["state"], data["trainer"]
    check_same_config(state.get("config"), cfg.to_dict(), ckpt)
    if state.get("kind") != "t2i":
        raise CheckpointError(f"{ckpt} is not a genrl text-to-image checkpoint")
    if state.get("algo") != cfg.algo or state.get("finetune") != cfg.grpo.finetune:
        raise CheckpointError(f"{ckpt} holds a {state.get('algo')}/{state.get('finetune')} run, the config says {cfg.algo}/{cfg.grpo.finetune}")
    rep = replica()
    saved = int(state.get("distributed", {}).get("world_size", 1))
    own, note = trainer, None
    if rep.rank > 0:  # this rank's own streams, or fresh ones when the checkpoint has none for it
        own = data["tensors"].get(f"rank{rep.rank}") or {"generator": algo.generator.get_state(), "torch_global": torch.get_rng_state()}
    if saved != rep.world_size:
        note = (f"resuming a {saved}-process checkpoint with {rep.world_size} process{'es' if rep.world_size > 1 else ''}: the weights, optimiser "
                "and prompt stream continue exactly, the images' shares and sampling streams change; not bitwise the uninterrupted run")  # fmt: skip
    shared = trainer.get("shared_generator", trainer["generator"])  # a one-process run's single stream drew its prompts
    try:
        ema = {k: v for k, v in trainer.items() if k.startswith("ema.")} or None
        algo.load_state_dict({"adapter": data["tensors"]["adapter"], "optimizer": data["optimizer"], "generator": own["generator"],
                              "shared_generator": shared, "iteration": state["iteration"], "optimizer_steps": state.get("optimizer_steps", 0),
                              "ema": ema})  # fmt: skip
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt} does not match this run: {str(exc).splitlines()[0]}") from None
    torch.set_rng_state(own["torch_global"])
    return note


def pin_paths(cfg: TrainConfig) -> TrainConfig:
    """The model folder and reward files as absolute paths, so the run resumes from any folder."""

    def absolute(text: str) -> str:
        return str(Path(text).expanduser().resolve()) if Path(text).expanduser().exists() else text

    items = []
    for item in cfg.t2i.reward.split(","):
        head, eq, weight = item.partition("=")
        key, colon, arg = head.partition(":")
        if colon and key == "clip":
            head = f"clip:{absolute(arg)}"
        elif colon and key.endswith(".py"):
            head = f"{absolute(key)}:{arg}"
        items.append(head + eq + weight)
    model = cfg.t2i.model if cfg.t2i.model == "digits" else absolute(cfg.t2i.model)
    return replace(cfg, t2i=replace(cfg.t2i, model=model, reward=",".join(items)))


def train_image(cfg: TrainConfig | None = None, *, resume: str | Path | None = None) -> Path:
    """Train (or resume) a text-to-image run and return its folder (``genrl.trainer.train``)."""
    from genrl.trainer import train

    if cfg is not None and not (isinstance(cfg, TrainConfig) and cfg.is_image):
        raise CheckpointError("train_image() takes a text-to-image TrainConfig (genrl.config.image_config)")
    return train(cfg, resume=resume)


class ImageTask:
    """Flow-GRPO / G2RPO on a text-to-image env: grids before, during and after, a LoRA (or the
    full pipeline) in ``final/`` with a model card."""

    unit = "image"

    def __init__(self, cfg: TrainConfig, run_dir: Path, *, fresh: bool) -> None:
        self.run_dir = run_dir
        self.algo = build_image(cfg, None if fresh else run_dir)  # validates model, prompts and rewards first
        self.cfg = pin_paths(cfg) if fresh else cfg

    def restore(self, ckpt: Path) -> str | None:
        return restore_image_state(self.algo, self.cfg, ckpt)

    def prepare(self, run_dir: Path, fresh: bool) -> None:
        if fresh:  # the run keeps its own prompts: an edited file cannot change a resume
            (run_dir / "prompts.json").write_text(json.dumps(self.algo.env.prompts, indent=1))

    def start_message(self, run_dir: Path) -> str:
        return f"fine-tuning {self.cfg.t2i.model} with {self.cfg.algo}, seed {self.cfg.run.seed}, into {run_dir}"

    @property
    def collective(self) -> bool:
        """Under FSDP every rank takes part in evaluation and export (each forward all-gathers
        the weights); rank 0 alone writes."""
        return self.algo.fsdp

    def begin(self, logger: Logger) -> None:
        if replica().is_main or self.collective:  # several processes: rank 0 alone evaluates and writes
            logger.log(evaluate_grid(self.algo, self.cfg, self.run_dir, 0), 0)  # the "before" grid and rewards

    def evaluate(self, step: int) -> dict[str, float]:
        return evaluate_grid(self.algo, self.cfg, self.run_dir, step)

    def save(self, run_dir: Path) -> Path:
        return save_image_state(self.algo, self.cfg, run_dir)

    def finish(self, run_dir: Path, last_eval: dict[str, float]) -> None:
        with self.algo.ema_weights():  # the EMA weights when grpo.ema is on (Flow-GRPO saves those)
            export_model(self.algo, self.cfg, run_dir / "final")
        if not replica().is_main:
            return
        model_card(self.cfg, run_dir, self.algo.global_step, last_eval)
        before_after(run_dir, self.algo.global_step)
        normal_permissions(run_dir / "final")

    def close(self) -> None:
        pass


def evaluate_run(run: str | Path, *, step: int | None = None, seeds: int = 4, prompts: list[str] | None = None,
                 out: str | Path | None = None) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """ODE images of a text-to-image run's checkpoint (newest, or ``step``; the EMA weights when
    the run keeps them) for ``prompts`` (default: the run's first 10) x ``seeds`` fixed seeds:
    a labelled grid (``out``, default ``<run>/images/eval-<step>.png``) and the run's rewards."""
    from genrl.checkpoint import checkpoint_steps, latest_checkpoint
    from genrl.runs import load_run_config

    run = Path(run)
    cfg = load_run_config(run)
    if not cfg.is_image:
        raise CheckpointError(f"{run} is not a text-to-image run")
    ckpt = run / "checkpoints" / str(step) if step is not None else latest_checkpoint(run)
    if not ckpt.is_dir():
        raise CheckpointError(f"{run} has no checkpoint at step {step}; steps: {checkpoint_steps(run)}")
    torch.set_num_threads(cfg.run.torch_threads)
    algo = build_image(cfg, run)
    restore_image_state(algo, cfg, ckpt)
    prompts = prompts or algo.env.prompts[:10]
    images = algo.generate(prompts, list(range(seeds)))
    path = Path(out) if out is not None else run / "images" / f"eval-{ckpt.name}.png"
    save_grid(images, len(prompts), path, labels=prompts, title=f"{cfg.algo}, step {ckpt.name}" + (" (EMA)" if cfg.grpo.ema else ""))
    scores = algo.env.score(images, [p for p in prompts for _ in range(seeds)])
    result = {f"reward_{k}": float(v.mean()) for k, v in scores.items()}
    result["reward_total"] = float(algo.env.rewards.total(scores).mean())
    return path, result


def load_finetuned(run_or_final: str | Path, base_model: str | Path | None = None) -> Any:
    """The fine-tuned diffusers pipeline of a run (``<run>`` or its ``final/``), loaded offline."""
    from genrl_envs.t2i import load_pipeline

    final = Path(run_or_final)
    run_model = None
    if (final / "final").is_dir():
        if (final / "config.json").is_file():  # a run folder knows its base model's full path
            from genrl.config import upgrade_config

            run_model = upgrade_config(json.loads((final / "config.json").read_text())).get("t2i", {}).get("model")
        final = final / "final"
    if (final / "model_index.json").is_file():
        return load_pipeline(final)
    meta_path = final / "genrl_model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{final} holds no exported model (no model_index.json or genrl_model.json)")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    base = base_model or run_model or meta.get("base_model")
    if base is None:
        raise CheckpointError(f"{final}: the base model is unknown; pass base_model=")
    pipe = load_pipeline(base)
    pipe.load_lora_weights(str(final))
    return pipe

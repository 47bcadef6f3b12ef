"""The training run: build -> (resume) -> iterate -> log -> evaluate -> checkpoint.

Plumbing shared by every algorithm lives here once: seeding, the run folder, logs, periodic
evaluation and checkpoints, exact resume and the non-finite-loss guard.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from envs import make_env
from genrl.algos.ppo import PPO
from genrl.checkpoint import checkpoint_steps, latest_checkpoint, load_checkpoint, save_checkpoint
from genrl.config import TrainConfig, config_from_dict
from genrl.errors import CheckpointError, ConfigError, NonFiniteLossError
from genrl.evaluate import evaluate
from genrl.logger import Logger
from genrl.plot import plot_runs
from policies.base import PolicyLoadError, load_pretrained, resolve_family

if TYPE_CHECKING:
    from genrl.config import ImageTrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(cfg: TrainConfig) -> PPO:
    """Seed, then make the env, the policy and the algorithm for ``cfg``."""
    seed_everything(cfg.run.seed)
    e = cfg.env
    env = make_env(
        e.env_id,
        e.n_envs,
        vectorization=e.vectorization,
        normalize_obs=e.normalize_obs,
        normalize_reward=e.normalize_reward,
        gamma=cfg.ppo.gamma,
        clip_obs=e.clip_obs,
        clip_reward=e.clip_reward,
        reward_scale=e.reward_scale,
    )
    try:
        policy_cls = resolve_family(cfg.policy)
        policy = policy_cls(env.spec.obs_dim, env.spec.action_dim, cfg.policy_config_object())
        if cfg.policy == "gorl":  # GoRL: PPO on the latent encoder + decoder refinement between stages
            from genrl.algos.gorl import GoRL

            def refinement_env() -> Any:  # same env, fresh instance; GoRL copies the obs statistics in
                return make_env(e.env_id, e.n_envs, vectorization=e.vectorization, normalize_obs=e.normalize_obs, normalize_reward=False, clip_obs=e.clip_obs)

            return GoRL(
                policy, env, cfg.ppo, cfg.gorl, total_steps=cfg.run.total_steps, seed=cfg.run.seed,
                device=cfg.run.device, env_factory=refinement_env,
            )  # fmt: skip
        return PPO(policy, env, cfg.ppo, total_steps=cfg.run.total_steps, seed=cfg.run.seed, device=cfg.run.device)
    except BaseException:
        env.close()
        raise


def load_run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a genrl run (no config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt {path}: {exc}") from None
    return config_from_dict(data)


def save_state(algo: PPO, cfg: TrainConfig, run_dir: Path) -> Path:
    """Checkpoint everything that shapes the rest of the run."""
    st = algo.state_dict()
    tensors = {f"critic.{k}": v for k, v in st["critic"].items()}
    tensors["next_obs"] = st["next_obs"]
    tensors["rng.generator"] = st["generator"]
    tensors["rng.torch_global"] = torch.get_rng_state()
    return save_checkpoint(
        run_dir,
        algo.global_step,
        policy=algo.policy,
        trainer_tensors=tensors,
        optimizer_state=st["optimizer"],
        env_state=algo.env.state_dict(),
        state={
            "global_step": algo.global_step,
            "iteration": algo.iteration,
            "family": cfg.policy,
            "algo": cfg.algo,
            "env_id": cfg.env.env_id,
            "numpy_global": _np_state(),
            **({"gorl": st["gorl"]} if "gorl" in st else {}),  # GoRL's stage counter
        },
    )


def restore_state(algo: PPO, cfg: TrainConfig, ckpt_dir: Path) -> None:
    """Load a checkpoint written by ``save_state`` into a freshly built ``algo``."""
    data = load_checkpoint(ckpt_dir)
    state = data["state"]
    if state.get("family") != cfg.policy or state.get("algo") != cfg.algo:
        raise CheckpointError(
            f"{ckpt_dir} holds a {state.get('family')}/{state.get('algo')} run, the config says {cfg.policy}/{cfg.algo}"
        )
    try:
        saved = load_pretrained(ckpt_dir / "policy", family=cfg.policy)
        algo.policy.load_state_dict(saved.state_dict())
    except PolicyLoadError as exc:
        raise CheckpointError(str(exc)) from None
    t = data["trainer"]
    try:
        payload = {
            "critic": {k[len("critic.") :]: v for k, v in t.items() if k.startswith("critic.")},
            "optimizer": data["optimizer"],
            "next_obs": t["next_obs"],
            "generator": t["rng.generator"],
            "global_step": state["global_step"],
            "iteration": state["iteration"],
        }
        if cfg.policy == "gorl":
            payload["gorl"] = state["gorl"]
        algo.load_state_dict(payload)
        algo.env.load_state_dict(data["env"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_dir} does not match this run: {str(exc).splitlines()[0]}") from None
    torch.set_rng_state(t["rng.torch_global"])
    _set_np_state(state["numpy_global"])


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_np_state(s: dict[str, Any]) -> None:
    np.random.set_state((s["name"], np.array(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and now // every > prev // every


def open_run(cfg: Any, resume: str | Path | None) -> tuple[Any, Path, Path | None]:
    """``(config, run folder, checkpoint to resume or None)``: a resumed run's own config, or a
    fresh run whose folder must not already hold one."""
    if resume is not None:
        run_dir = Path(resume)
        return load_run_config(run_dir), run_dir, latest_checkpoint(run_dir)
    if cfg is None:
        raise ConfigError("train() needs a config or resume=")
    run_dir = Path(cfg.run.out)
    if checkpoint_steps(run_dir) or (run_dir / "progress.csv").exists():
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    return cfg, run_dir, None


def guarded_iterate(algo: Any, run_dir: Path) -> dict[str, float]:
    """``algo.iterate()``; a non-finite loss stops the run naming the last good checkpoint."""
    try:
        return algo.iterate()
    except NonFiniteLossError as exc:
        last = checkpoint_steps(run_dir)
        kept = f"; last good checkpoint: step {last[-1]}" if last else "; no checkpoint was written yet"
        raise NonFiniteLossError(f"{exc}{kept}") from None


def train(cfg: TrainConfig | ImageTrainConfig | None = None, *, resume: str | Path | None = None) -> Path:
    """Train (or resume) a run and return its folder.

    Args:
        cfg: the run's configuration (ignored when resuming: the run's own config.json is used).
        resume: a run folder; training continues from its newest complete checkpoint up to the
            run's own total steps, reproducing an uninterrupted run bitwise on CPU.
    Raises:
        ConfigError, CheckpointError, NonFiniteLossError (earlier checkpoints are left intact).
    """
    from genrl.config import ImageTrainConfig

    cfg, run_dir, ckpt = open_run(cfg, resume)
    if isinstance(cfg, ImageTrainConfig):
        from genrl.image_trainer import run_image

        return run_image(cfg, run_dir, ckpt)
    torch.set_num_threads(cfg.run.torch_threads)
    algo = build(cfg)  # validates everything before the run folder is touched
    if ckpt is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    else:
        restore_state(algo, cfg, ckpt)
    total = algo.n_iterations * algo.steps_per_iter
    logger = Logger(run_dir, total, resume_step=algo.global_step if ckpt is not None else None, progress=cfg.run.progress)
    if ckpt is None:
        logger.hparams(cfg.to_dict())
    else:
        logger.message(f"resuming {run_dir} from step {algo.global_step}")
    eval_seed = cfg.run.seed + 10_000
    try:
        while algo.iteration < algo.n_iterations:
            prev = algo.global_step
            metrics = guarded_iterate(algo, run_dir)
            step = algo.global_step
            final = algo.iteration == algo.n_iterations
            if final or _crossed(prev, step, cfg.run.eval_every):
                metrics.update(
                    evaluate(algo.policy, cfg.env, algo.env.obs_normalizer_state(), episodes=cfg.run.eval_episodes, seed=eval_seed)
                )
            logger.log(metrics, step)
            if final or _crossed(prev, step, cfg.run.save_every):
                save_state(algo, cfg, run_dir)
    finally:
        logger.close()
        algo.env.close()
    plot_runs([run_dir], run_dir / "curves.png")
    return run_dir

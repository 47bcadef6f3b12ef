"""The training run: build -> (resume) -> iterate -> log -> evaluate -> checkpoint.

Plumbing shared by every algorithm lives here once: seeding, the run folder, logs, periodic
evaluation and checkpoints, exact resume and the non-finite-loss guard.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from genrl_envs import make_env
from genrl.algos.ppo import PPO
from genrl.checkpoint import load_checkpoint, save_checkpoint
from genrl.config import TrainConfig
from genrl.errors import CheckpointError, ConfigError
from genrl.runs import (
    CheckpointSchedule, Interrupted, StopSignals, crossed, guarded_iterate, open_run, restore_first_readable,
    seed_everything, write_meta,
)  # fmt: skip
from genrl.runs import load_run_config as load_run_config  # re-exported: genrl.trainer.load_run_config
from genrl.evaluate import evaluate
from genrl.logger import Logger
from genrl.plot import plot_runs
from genrl_policies.base import PolicyLoadError, load_pretrained, resolve_family

if TYPE_CHECKING:
    from genrl.config import ImageTrainConfig


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
        env_kwargs=e.env_kwargs,
    )
    try:
        policy_cls = resolve_family(cfg.policy)
        policy = policy_cls(env.spec.obs_dim, env.spec.action_dim, cfg.policy_config_object())
        if cfg.policy == "gorl":  # GoRL: PPO on the latent encoder + decoder refinement between stages
            from genrl.algos.gorl import GoRL

            def refinement_env() -> Any:  # same env, fresh instance; GoRL copies the obs statistics in
                return make_env(e.env_id, e.n_envs, vectorization=e.vectorization, normalize_obs=e.normalize_obs, normalize_reward=False,
                                clip_obs=e.clip_obs, env_kwargs=e.env_kwargs)  # fmt: skip

            return GoRL(
                policy, env, cfg.ppo, cfg.gorl, total_steps=cfg.run.total_steps, seed=cfg.run.seed,
                device=cfg.run.device, env_factory=refinement_env,
            )  # fmt: skip
        return PPO(policy, env, cfg.ppo, total_steps=cfg.run.total_steps, seed=cfg.run.seed, device=cfg.run.device)
    except BaseException:
        env.close()
        raise


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
            "config": cfg.to_dict(),  # what wrote this checkpoint: resume refuses a hand-edited config.json
            **({"gorl": st["gorl"]} if "gorl" in st else {}),  # GoRL's stage counter
        },
    )


def restore_state(algo: PPO, cfg: TrainConfig, ckpt_dir: Path) -> None:
    """Load a checkpoint written by ``save_state`` into a freshly built ``algo``."""
    data = load_checkpoint(ckpt_dir)
    state = data["state"]
    check_same_config(state.get("config"), cfg.to_dict(), ckpt_dir)
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


def train(
    cfg: TrainConfig | ImageTrainConfig | None = None, *, resume: str | Path | None = None, extend_to: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """Train (or resume) a run and return its folder.

    Args:
        cfg: the run's configuration (ignored when resuming: the run's own config.json is used).
        resume: a run folder; training continues from its newest readable checkpoint up to the
            run's own total steps, reproducing an uninterrupted run bitwise on CPU.
        extend_to: with ``resume``, raise the run's total steps to this (recorded in config.json).
        overrides: with ``resume``, ``run`` fields that do not change the trajectory
            (save_every, save_minutes, keep_checkpoints, eval_every, eval_episodes, progress).
    Raises:
        ConfigError, CheckpointError, NonFiniteLossError (earlier checkpoints are left intact),
        Interrupted (SIGINT / SIGTERM: a checkpoint of the last whole iteration was written).
    """
    from genrl.config import ImageTrainConfig

    cfg, run_dir, candidates = open_run(cfg, resume)
    cfg = apply_resume_changes(cfg, extend_to, overrides)
    check_device(cfg.run.device)
    if isinstance(cfg, ImageTrainConfig):
        from genrl.image_trainer import run_image

        return run_image(cfg, run_dir, candidates)
    torch.set_num_threads(cfg.run.torch_threads)
    algo = build(cfg)  # validates everything before the run folder is touched
    messages: list[str] = []
    if candidates:
        def restore(ckpt: Path) -> PPO:
            fresh = build(cfg) if restore.used else algo  # type: ignore[attr-defined]
            restore.used = True  # type: ignore[attr-defined]
            try:
                restore_state(fresh, cfg, ckpt)
            except BaseException:
                fresh.env.close()
                raise
            return fresh

        restore.used = False  # type: ignore[attr-defined]
        algo = restore_first_readable(candidates, restore, messages.append)
    total = algo.n_iterations * algo.steps_per_iter
    if candidates and algo.iteration >= algo.n_iterations:
        algo.env.close()
        print(f"{run_dir} is already complete at step {algo.global_step}; extend it with genrl train --resume {run_dir} --steps N")
        return run_dir
    if total != cfg.run.total_steps:
        messages.append(f"total steps {cfg.run.total_steps} rounded up to {total}: {algo.n_iterations} iterations of {algo.steps_per_iter} (n_steps x n_envs)")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, total_steps=total))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    write_meta(run_dir, resumed=bool(candidates))
    logger = Logger(run_dir, total, resume_step=algo.global_step if candidates else None, progress=cfg.run.progress,
                    wandb={"project": cfg.run.wandb_project, "config": cfg.to_dict()} if cfg.run.wandb else None)  # fmt: skip
    for m in messages:
        logger.message(m)
    if not candidates:
        logger.hparams(cfg.to_dict())
        logger.message(f"training {cfg.env.env_id} with {cfg.policy}, seed {cfg.run.seed}, into {run_dir}")
    else:
        logger.message(f"resuming {run_dir} from step {algo.global_step} of {total}")
    eval_seed = cfg.run.seed + 10_000
    schedule = CheckpointSchedule(cfg.run, total, algo.steps_per_iter)
    metrics: dict[str, float] = {}
    try:
        with StopSignals(logger.message) as stop:
            while algo.iteration < algo.n_iterations:
                prev = algo.global_step
                metrics = guarded_iterate(algo, run_dir)
                step = algo.global_step
                final = algo.iteration == algo.n_iterations
                if final or crossed(prev, step, cfg.run.eval_every):
                    metrics.update(
                        evaluate(algo.policy, cfg.env, algo.env.obs_normalizer_state(), episodes=cfg.run.eval_episodes, seed=eval_seed)
                    )
                logger.log(metrics, step)
                if schedule.due(prev, step, final) or stop.requested:
                    save_state(algo, cfg, run_dir)
                    schedule.saved(run_dir)
                if stop.requested and not final:
                    raise Interrupted(f"{stop.requested} at step {step}: checkpoint written; continue with genrl train --resume {run_dir}")
    finally:
        logger.close()
        algo.env.close()
    export_agent(algo, cfg, run_dir / "final")
    plot_runs([run_dir], run_dir / "curves.png")
    if "eval/return_mean" in metrics:
        print(f"final evaluation: return {metrics['eval/return_mean']:.2f} +/- {metrics['eval/return_std']:.2f} "
              f"over {cfg.run.eval_episodes} episodes; logs: tensorboard --logdir {run_dir / 'tb'}")  # fmt: skip
    return run_dir


RESUME_RUN_FIELDS = ("save_every", "save_minutes", "keep_checkpoints", "eval_every", "eval_episodes", "progress", "wandb")


def apply_resume_changes(cfg: Any, extend_to: int | None, overrides: dict[str, Any] | None) -> Any:
    """A resumed run's config with ``--steps`` (extension) and run-only overrides applied."""
    changes = dict(overrides or {})
    bad = [k for k in changes if k not in RESUME_RUN_FIELDS]
    if bad:
        raise ConfigError(f"on --resume only run.{{{', '.join(RESUME_RUN_FIELDS)}}} may change, not {bad[0]}")
    if extend_to is not None:
        if extend_to < cfg.run.total_steps:
            raise ConfigError(f"--steps {extend_to} is below the run's total {cfg.run.total_steps}; a run can only be extended")
        changes["total_steps"] = extend_to
    if not changes:
        return cfg
    from genrl.config import config_from_dict, merge

    return config_from_dict(merge(cfg.to_dict(), {"run": changes}))


def check_same_config(saved: dict[str, Any] | None, now: dict[str, Any], ckpt: Path) -> None:
    """ConfigError if the run's settings changed since ``ckpt`` was written (the ``run`` fields
    that may change on resume excepted): a resumed run must be the run that was started."""
    if saved is None:  # checkpoints written before configs were recorded
        return
    from genrl.presets import flatten

    free = {f"run.{k}" for k in (*RESUME_RUN_FIELDS, "total_steps", "out", "device", "torch_threads")}
    a, b = flatten(saved), flatten(now)
    changed = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    if changed:
        k = changed[0]
        raise ConfigError(
            f"config.json differs from what wrote checkpoint {ckpt.name} ({k}: {a.get(k)!r} -> {b.get(k)!r}"
            f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); a resumed run keeps its settings: start a new run to change them"
        )


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device = {device!r} but this torch build has no usable CUDA device (use --device cpu)")


def export_agent(algo: PPO, cfg: TrainConfig, out: Path) -> Path:
    """The trained policy with its observation normaliser and action bounds (``genrl.agent``)."""
    from genrl.agent import Agent

    spec = algo.env.spec
    agent = Agent(algo.policy, env_id=cfg.env.env_id, obs_normalizer=algo.env.obs_normalizer_state(), clip_obs=cfg.env.clip_obs,
                  action_low=spec.action_low, action_high=spec.action_high, step=algo.global_step, env_kwargs=cfg.env.env_kwargs)  # fmt: skip
    try:
        return agent.save(out)
    finally:
        algo.policy.train()

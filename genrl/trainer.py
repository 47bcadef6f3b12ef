"""The training run, one loop for every algorithm: build -> (resume) -> iterate -> log ->
evaluate -> checkpoint -> finish (``run``), driving a ``Task`` (``genrl.algos.base``) found in
``TASKS`` by the config's ``algo``. ``ControlTask`` here runs PPO (GoRL around it for the gorl
family) and every registered control algorithm; ``genrl.image_trainer.ImageTask`` runs
Flow-GRPO and G2RPO. Run-folder safety lives in ``genrl.runs``, checkpoint files in
``genrl.checkpoint``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrl.algos.base import CONTROL_ALGORITHMS, Task
from genrl.algos.ppo import PPO
from genrl.checkpoint import load_checkpoint, save_checkpoint
from genrl.config import TrainConfig
from genrl.distributed import replica
from genrl.distributed_run import QuietLogger, adopt, agreed, gather_rank_states, open_shared, own_state, run_session, stopped
from genrl.errors import CheckpointError, ConfigError, DistributedError
from genrl.evaluate import evaluate
from genrl.logger import Logger
from genrl.plot import plot_runs
from genrl.runs import (
    RESUME_RUN_FIELDS,
    CheckpointSchedule,
    Interrupted,
    StopSignals,
    check_same_config,
    crossed,
    guarded_iterate,
    restore_first_readable,
    seed_everything,
    write_meta,
)  # fmt: skip
from genrl.runs import load_run_config as load_run_config  # re-exported: genrl.trainer.load_run_config
from genrl_envs import make_env, resolve_backend
from genrl_policies.base import PolicyLoadError, load_pretrained, resolve_family


def build(cfg: TrainConfig) -> PPO:
    """Seed, then make the env, the policy and the algorithm for ``cfg``."""
    seed_everything(cfg.run.seed)
    e = cfg.env
    env = make_env(
        e.env_id,
        e.n_envs,
        backend=resolve_backend(e.env_id, e.backend, chunked=e.chunking is not None, viewed=bool(e.obs_resolution)),
        device=cfg.run.device,
        vectorization=e.vectorization,
        normalize_obs=e.normalize_obs,
        normalize_reward=e.normalize_reward,
        gamma=cfg.ppo.gamma,
        clip_obs=e.clip_obs,
        clip_reward=e.clip_reward,
        reward_scale=e.reward_scale,
        env_kwargs=e.env_kwargs,
        **e.wrapper_kwargs,
    )
    try:
        policy_cls = resolve_family(cfg.policy)
        policy = policy_cls(env.spec.obs_dim, env.spec.action_dim, cfg.policy_config_object())
        if cfg.init_from is not None:
            init_policy(policy, env, cfg.init_from)

        def refinement_env() -> Any:  # GoRL's refinement data: same env, fresh instance; GoRL copies the obs statistics in
            return make_env(e.env_id, e.n_envs, backend=env.spec.backend, device=cfg.run.device, vectorization=e.vectorization,
                            normalize_obs=e.normalize_obs, normalize_reward=False, clip_obs=e.clip_obs, env_kwargs=e.env_kwargs,
                            **e.wrapper_kwargs)  # fmt: skip

        if cfg.algo != "ppo":  # a registered algorithm (genrl.algos.base.register_control_algorithm)
            spec = CONTROL_ALGORITHMS[cfg.algo]
            gorl = {"gorl": cfg.gorl, "env_factory": refinement_env} if spec.gorl and cfg.policy == "gorl" else {}  # GoRL around it (sac)
            return spec.build(policy, env, cfg.algo_config_object(), total_steps=cfg.run.total_steps, seed=cfg.run.seed, device=cfg.run.device, **gorl)
        if cfg.policy == "gorl":  # GoRL: PPO on the latent encoder + decoder refinement between stages
            from genrl.algos.gorl import GoRL

            return GoRL(
                policy, env, cfg.ppo, cfg.gorl, total_steps=cfg.run.total_steps, seed=cfg.run.seed,
                device=cfg.run.device, env_factory=refinement_env,
            )  # fmt: skip
        return PPO(policy, env, cfg.ppo, total_steps=cfg.run.total_steps, seed=cfg.run.seed, device=cfg.run.device)
    except BaseException:
        env.close()
        raise


def init_policy(policy: Any, env: Any, source: str) -> None:
    """Load the policy weights of ``source`` (a run, checkpoint or exported agent) into ``policy``
    and its observation statistics into ``env``: frozen when ``source`` was behaviour-cloned (DPPO
    and ReinFlow fine-tune under the pretraining data's normalisation; statistics of the
    fine-tuning rollouts would shift the clone's inputs), else updating as in any run. ConfigError
    on a mismatch."""
    from genrl.agent import Agent

    try:
        agent = Agent.load(source)
    except CheckpointError as exc:
        raise ConfigError(f"init_from: {exc}") from None
    if agent.family != policy.family or (agent.policy.obs_dim, agent.policy.action_dim) != (policy.obs_dim, policy.action_dim):
        raise ConfigError(
            f"init_from: {source} holds a {agent.family} policy for obs {agent.policy.obs_dim} / action {agent.policy.action_dim}, "
            f"this run builds a {policy.family} policy for obs {policy.obs_dim} / action {policy.action_dim}"
        )
    state = agent.policy.state_dict()
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("base_net.") for k in missing):
        raise ConfigError(f"init_from: {source}'s {agent.family} policy does not fit this run's ({(missing + unexpected)[:3]} ...)")
    if hasattr(policy, "sync_base"):  # a fine-tuning copy whose frozen steps start from the loaded net
        policy.sync_base()
    if agent.obs_normalizer is not None and hasattr(env, "set_obs_normalizer"):
        env.set_obs_normalizer(agent.obs_normalizer, frozen=agent.algo == "bc")


def save_state(algo: Any, cfg: TrainConfig, run_dir: Path) -> Path | None:
    """Checkpoint everything that shapes the rest of the run, whatever the algorithm: its
    ``state_dict()`` split by kind (tensors and dicts of tensors -> trainer.safetensors, the
    ``"optimizer"`` entry -> optimizer.pt, the rest -> state.json), its policy, the env's state
    and the global RNGs. Several processes: rank 0 writes, with every rank's own state
    (``genrl.distributed_run``); the other ranks return None."""
    ranks = gather_rank_states(algo)
    if ranks is None:
        return None
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    groups: list[str] = []
    optimizer: Any = None
    for key, value in algo.state_dict().items():
        if key == "optimizer":
            optimizer = value
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            groups.append(key)
            tensors.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            plain[key] = value
    tensors["rng.torch_global"] = torch.get_rng_state()
    return save_checkpoint(
        run_dir,
        algo.global_step,
        policy=algo.policy,
        trainer_tensors=tensors,
        optimizer_state=optimizer if optimizer is not None else {},
        env_state=algo.env.state_dict(),
        tensor_files=ranks.get("files"),
        state={
            "global_step": algo.global_step,
            "iteration": algo.iteration,
            "family": cfg.policy,
            "algo": cfg.algo,
            "env_id": cfg.env.env_id,
            "numpy_global": _np_state(),
            "config": cfg.to_dict(),  # what wrote this checkpoint: resume refuses a hand-edited config.json
            "algo_state": plain,
            "tensor_groups": groups,
            **ranks.get("state", {}),
        },
    )


def restore_state(algo: Any, cfg: TrainConfig, ckpt_dir: Path) -> str | None:
    """Load a checkpoint written by ``save_state`` into a freshly built ``algo`` (with several
    processes, each rank its own state); returns a note on what a change of the number of
    processes does not restore exactly."""
    data = load_checkpoint(ckpt_dir)
    state = data["state"]
    check_same_config(state.get("config"), cfg.to_dict(), ckpt_dir)
    if state.get("family") != cfg.policy or state.get("algo") != cfg.algo:
        raise CheckpointError(f"{ckpt_dir} holds a {state.get('family')}/{state.get('algo')} run, the config says {cfg.policy}/{cfg.algo}")
    try:
        saved = load_pretrained(ckpt_dir / "policy", family=cfg.policy)
        algo.policy.load_state_dict(saved.state_dict())
    except PolicyLoadError as exc:
        raise CheckpointError(str(exc)) from None
    t = data["trainer"]
    plain, groups = state.get("algo_state"), state.get("tensor_groups")
    if plain is None:  # checkpoints written before algo_state: PPO / GoRL's own keys at the top level
        plain = {"global_step": state["global_step"], "iteration": state["iteration"], **({"gorl": state["gorl"]} if "gorl" in state else {})}
        groups = ["critic"]
    try:
        payload: dict[str, Any] = {**plain, "optimizer": data["optimizer"]}
        for key, value in t.items():
            group = next((g for g in groups if key.startswith(g + ".")), None)
            if group is not None:
                payload.setdefault(group, {})[key[len(group) + 1 :]] = value
            elif key != "rng.torch_global":
                payload[key] = value
        own = own_state(data, algo)  # one process: rank 0's, the checkpoint's main files
        payload.update(own["payload"])
        if own["env"] is not None:
            algo.env.load_state_dict(own["env"])  # first: an env without snapshots restarts its episodes
        algo.load_state_dict(payload)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_dir} does not match this run: {str(exc).splitlines()[0]}") from None
    if own["torch"] is not None:
        torch.set_rng_state(own["torch"])
        _set_np_state(own["numpy"])
    return own["note"]


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_np_state(s: dict[str, Any]) -> None:
    np.random.set_state((s["name"], np.array(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached"]))


#: algorithm name -> the Task that runs it ("module:Class", imported when used)
TASKS: dict[str, str] = {
    "ppo": "genrl.trainer:ControlTask",
    "flow-grpo": "genrl.image_trainer:ImageTask",
    "g2rpo": "genrl.image_trainer:ImageTask",
}


def train(
    cfg: TrainConfig | None = None, *, resume: str | Path | None = None, extend_to: int | None = None,
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
    with run_session(load_run_config(resume) if resume is not None else cfg):  # several processes under torchrun
        return _train(cfg, resume, extend_to, overrides)


def _train(cfg: TrainConfig | None, resume: str | Path | None, extend_to: int | None, overrides: dict[str, Any] | None) -> Path:
    import importlib

    cfg, run_dir, candidates = open_shared(cfg, resume)
    cfg = apply_resume_changes(cfg, extend_to, overrides)
    check_device(cfg.run.device)
    torch.set_num_threads(cfg.run.torch_threads)
    module, cls = TASKS.get(cfg.algo, "genrl.trainer:ControlTask").split(":")  # registered control algorithms
    task = getattr(importlib.import_module(module), cls)(cfg, run_dir, fresh=not candidates)  # validates before the folder is touched
    return run(task, run_dir, candidates)


def run(task: Task, run_dir: Path, candidates: list[Path]) -> Path:
    """The run loop, for every algorithm: (resume) -> iterate -> log -> evaluate -> checkpoint -> finish."""
    messages: list[str] = []
    if candidates:
        restore_first_readable(candidates, agreed(task.restore), messages.append)
    algo, cfg, unit, main = task.algo, task.cfg, task.unit, replica().is_main
    everyone = main or getattr(task, "collective", False)  # a sharded model evaluates and exports on every rank
    total = algo.n_iterations * algo.steps_per_iter
    if candidates and algo.iteration >= algo.n_iterations:
        task.close()
        if main:
            print(f"{run_dir} is already complete at {unit} {algo.global_step}; extend it with genrl train --resume {run_dir} --steps N")
        return run_dir
    if total != cfg.run.total_steps:
        messages.append(f"total {unit}s {cfg.run.total_steps} rounded up to {total}: {algo.n_iterations} iterations of {algo.steps_per_iter}")
        task.cfg = cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, total_steps=total))
    if main:  # several processes: rank 0 alone writes the run folder and logs
        run_dir.mkdir(parents=True, exist_ok=True)
        task.prepare(run_dir, fresh=not candidates)
        cfg.save(run_dir / "config.json")
        write_meta(run_dir, resumed=bool(candidates))
    logger = QuietLogger() if not main else Logger(run_dir, total, resume_step=algo.global_step if candidates else None, progress=cfg.run.progress,
                    wandb={"project": cfg.run.wandb_project, "config": cfg.to_dict()} if cfg.run.wandb else None)  # fmt: skip
    for m in messages:
        logger.message(m)
    if not candidates:
        logger.hparams(cfg.to_dict())
        logger.message(task.start_message(run_dir))
        task.begin(logger)
    else:
        logger.message(f"resuming {run_dir} from {unit} {algo.global_step} of {total}")
    schedule = CheckpointSchedule(cfg.run, total, algo.steps_per_iter)
    last_eval: dict[str, float] = {}
    try:
        with StopSignals(logger.message) as stop:
            while algo.iteration < algo.n_iterations:
                prev = algo.global_step
                metrics = guarded_iterate(algo, run_dir)
                step = algo.global_step
                final = algo.iteration == algo.n_iterations
                if everyone and (final or crossed(prev, step, cfg.run.eval_every)):
                    metrics.update(task.evaluate(step))
                    last_eval = metrics
                logger.log(metrics, step)
                save, stopping = replica().any(schedule.due(prev, step, final), stop.requested is not None)  # every rank alike
                if save or stopping:
                    task.save(run_dir)
                    schedule.saved(run_dir if main else None)
                if stopping and not final:
                    why = stop.requested or "a stop signal to another process"
                    raise Interrupted(f"{why} at {unit} {step}: checkpoint written; continue with genrl train --resume {run_dir}")
    except DistributedError as exc:
        raise stopped(exc, run_dir) from None
    finally:
        logger.close()
        task.close()
    if everyone:
        task.finish(run_dir, last_eval)
    if main:
        plot_runs([run_dir], run_dir / "curves.png")
    return run_dir


class ControlTask:
    """PPO (and GoRL around it) on a gymnasium back end: evaluation episodes, an exported agent."""

    unit = "step"

    def __init__(self, cfg: TrainConfig, run_dir: Path, *, fresh: bool) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.algo = adopt(build(cfg), cfg.run.seed)
        self._restored = False

    def restore(self, ckpt: Path) -> str | None:
        """Load ``ckpt``; returns the env's note when its back end cannot resume exactly."""
        if self._restored:  # an earlier candidate failed part-way: start again from a fresh build
            self.algo.env.close()
            self.algo = adopt(build(self.cfg), self.cfg.run.seed)
        self._restored = True
        notes = [restore_state(self.algo, self.cfg, ckpt), getattr(self.algo.env, "resume_note", None)]
        return "; ".join(n for n in notes if n) or None

    def prepare(self, run_dir: Path, fresh: bool) -> None:
        pass

    def start_message(self, run_dir: Path) -> str:
        return f"training {self.cfg.env.env_id} with {self.cfg.policy}, seed {self.cfg.run.seed}, into {run_dir}"

    def begin(self, logger: Logger) -> None:
        pass

    def evaluate(self, step: int) -> dict[str, float]:
        cfg, algo = self.cfg, self.algo
        return evaluate(algo.policy, cfg.env, algo.env.obs_normalizer_state(), episodes=cfg.run.eval_episodes, seed=cfg.run.seed + 10_000)

    def save(self, run_dir: Path) -> Path:
        return save_state(self.algo, self.cfg, run_dir)

    def finish(self, run_dir: Path, last_eval: dict[str, float]) -> None:
        export_agent(self.algo, self.cfg, run_dir / "final")
        if "eval/return_mean" in last_eval:
            print(f"final evaluation: return {last_eval['eval/return_mean']:.2f} +/- {last_eval['eval/return_std']:.2f} "
                  f"over {self.cfg.run.eval_episodes} episodes; logs: tensorboard --logdir {run_dir / 'tb'}")  # fmt: skip

    def close(self) -> None:
        self.algo.env.close()


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

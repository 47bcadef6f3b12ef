"""Data parallelism (genrl.distributed): 2 processes on gloo, checked against one process.

Each worker sets what torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / PORT) and runs
genrl's own code, so the tests cover the torchrun path. Gradients, advantages and merged
normaliser statistics equal the one-process numbers on the concatenated data up to float
summation order (per-rank means averaged by an all-reduce instead of one mean); resuming with
the same number of processes is bitwise.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import shutil
import signal
import socket
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from genrl.config import config_from_dict
from genrl.errors import ConfigError

TIMEOUT_S = 20.0
PPO = {"n_steps": 16, "n_minibatches": 1, "n_epochs": 1, "max_grad_norm": 1e9}
FAMILIES = {
    "gaussian": ({}, "minibatch"),
    "diffusion": ({"hidden_sizes": [16], "n_denoising_steps": 2}, "batch"),
}

SMOKE = {
    "pmoe": {"policy_config": {"n_experts": 2, "hidden_sizes": [16]}},
    "policyflow": {"policy_config": {"hidden_sizes": [16], "n_steps": 2}},
    "fpo": {"policy_config": {"hidden_sizes": [16], "n_steps": 2, "n_mc": 2}},
    "gorl": {"policy_config": {"encoder_hidden": [16], "decoder_hidden": [16], "decoder_steps": 2},
             "gorl": {"stage_fractions": [0.5, 0.5], "refine_steps": 32, "decoder_epochs": 2, "decoder_batch_size": 16}},
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn: Any, *args: Any, world: int = 2) -> list[int]:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes; their exit codes."""
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def _entry(fn: Any, rank: int, world: int, port: int, *args: Any) -> None:
    faulthandler.enable(all_threads=True)  # a crash in a worker shows its Python stacks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def _ppo_cfg(family: str, n_envs: int, out: Path | None = None, **run: Any) -> Any:
    policy_config, scope = FAMILIES[family]
    return config_from_dict({
        "policy": family, "policy_config": policy_config, "env": {"env_id": "Pendulum-v1", "n_envs": n_envs},
        "ppo": {**PPO, "norm_adv_scope": scope}, "run": {"total_steps": 1024, "seed": 3, "distributed_timeout_s": TIMEOUT_S, "progress": False,
                                                         "eval_episodes": 1, **({"out": str(out)} if out else {}), **run},
    })  # fmt: skip


def _storage(algo: Any) -> dict[str, torch.Tensor]:
    s = algo._storage
    rec = {f"record.{f.name}": getattr(s["record"], f.name) for f in dataclasses.fields(s["record"])}
    return {k: v.contiguous() for k, v in {**{k: s[k] for k in ("obs", "next_obs", "reward", "terminated", "truncated")}, **rec}.items()}


def _update_grads(algo: Any) -> dict[str, torch.Tensor]:
    """The gradients of ``algo.update()``'s one minibatch step (after the all-reduce; no step taken)."""
    grads: dict[str, torch.Tensor] = {}
    named = {id(p): n for n, p in [*(("policy." + n, p) for n, p in algo.policy.named_parameters()), *(("critic." + n, p) for n, p in algo.critic.named_parameters())]}

    def record(*_: Any, **__: Any) -> None:
        grads.update({named[id(p)]: p.grad.clone() for p in algo.params + algo.aux_params if p.grad is not None})

    algo.optimizer.step = record
    algo.update()
    return grads


def _fake_env_stats(rank: int) -> Any:
    from genrl_envs.normalize import FastRunningMeanStd

    class Env:  # the two running normalisers of an env, fed with rank-specific data
        def __init__(self) -> None:
            self.obs, self.ret = FastRunningMeanStd(shape=(3,)), FastRunningMeanStd(shape=())

        def running_stats(self) -> dict[str, Any]:
            return {n: {"mean": np.array(r.mean), "var": np.array(r.var), "count": np.asarray(float(r.count))} for n, r in (("obs", self.obs), ("return", self.ret))}

        def set_running_stats(self, stats: dict[str, Any]) -> None:
            for n, r in (("obs", self.obs), ("return", self.ret)):
                r.mean, r.var, r.count = stats[n]["mean"].copy(), stats[n]["var"].copy(), float(stats[n]["count"])

    return Env()


def _normaliser_data(rank: int, it: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(100 * it + rank)
    return g.normal(3.0 + rank, 2.0, size=(5 + rank, 3)), g.normal(-1.0, 0.5 + rank, size=(4 + 3 * rank,))


def _numbers_worker(rank: int, world: int, out: Path, demos: Path) -> None:
    """Gradients of one PPO update per family, BC's gradient, advantage normalisation and merged
    normaliser statistics, on 2 ranks; everything saved for the one-process comparison."""
    from genrl.distributed import session
    from genrl.trainer import build

    with session("ddp", "ppo", "cpu", TIMEOUT_S) as rep:
        for family in FAMILIES:
            algo = build(_ppo_cfg(family, 2))
            algo.collect()
            save_file({**_storage(algo), **{f"grad.{k}": v for k, v in _update_grads(algo).items()}}, str(out / f"{family}{rank}.safetensors"))
            algo.env.close()
        for family, over in SMOKE.items():  # every other family (GoRL across its stage boundary): replicas stay identical
            algo = build(config_from_dict({"env": {"env_id": "Pendulum-v1"}, "ppo": {"n_steps": 16, "n_minibatches": 2, "n_epochs": 1},
                                           "run": {"total_steps": 64, "seed": 3}, "policy": family, **over}))  # fmt: skip
            while algo.iteration < algo.n_iterations:
                algo.iterate()
            save_file({k: v.contiguous() for k, v in algo.policy.state_dict().items()}, str(out / f"smoke-{family}{rank}.safetensors"))
            algo.env.close()
        x = torch.randn(37 + 5 * rank, generator=torch.Generator().manual_seed(rank))
        env, merged = _fake_env_stats(rank), None
        base = rep.normalizer_stats(env)
        for it in range(3):  # three iterations of local updates, each followed by a merge
            obs, ret = _normaliser_data(rank, it)
            env.obs.update(obs)
            for r in ret:
                env.ret.update(np.asarray([r]))
            base = merged = rep.merge_normalizers(env, base)
        save_file({"x": x, "normalized": rep.normalize(x), **{f"{n}.{k}": torch.from_numpy(np.asarray(v)) for n, s in merged.items() for k, v in s.items()}},
                  str(out / f"numbers{rank}.safetensors"))  # fmt: skip
        bc = build(_bc_cfg(demos))  # BC: one gradient step on this rank's shard
        gen_state = bc.generator.get_state()
        rows = bc.sampler.rows(len(bc.data), bc.cfg.batch_size)
        obs, actions = bc.data.get(rows)
        bc.model.bc_loss(bc.normalize(obs), actions, generator=bc.generator).backward()
        rep.average_grads(bc.model.parameters())
        save_file({"rows": rows, "gen": gen_state, **{f"grad.{n}": p.grad for n, p in bc.model.named_parameters() if p.grad is not None}},
                  str(out / f"bc{rank}.safetensors"))  # fmt: skip
        bc.env.close()


def _bc_cfg(demos: Path) -> Any:
    return config_from_dict({
        "algo": "bc", "policy": "diffusion", "env": {"env_id": "genrl/PointMaze-v0"}, "policy_config": {"hidden_sizes": [16]},
        "algo_config": {"dataset": str(demos), "batch_size": 32, "updates_per_iter": 2, "warmup_steps": 1},
        "run": {"total_steps": 4, "seed": 0, "distributed_timeout_s": TIMEOUT_S, "progress": False},
    })  # fmt: skip


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genrl.datasets import save_demos
    from genrl_envs.experts import record_demos
    from genrl_envs.maze import ENV_ID

    path = tmp_path_factory.mktemp("demos") / "maze.safetensors"
    data = record_demos(ENV_ID, 6, seed=0)
    save_demos(path, data, data["meta"])
    return path


@pytest.fixture(scope="module")
def numbers(tmp_path_factory: pytest.TempPathFactory, demos: Path) -> Path:
    out = tmp_path_factory.mktemp("numbers")
    assert _spawn(_numbers_worker, out, demos) == [0, 0]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_update_gradients_equal_one_process_on_the_concatenated_batch(numbers: Path, family: str) -> None:
    from genrl.trainer import build

    ranks = [load_file(str(numbers / f"{family}{r}.safetensors")) for r in range(2)]
    for key in ranks[0]:  # the replicas hold the same averaged gradients, bit for bit
        if key.startswith("grad."):
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    ref = build(_ppo_cfg(family, 4))  # one process, the two ranks' envs side by side
    ref.collect()
    s = ref._storage
    for key in ranks[0]:
        if not key.startswith("grad."):
            cat = torch.cat([ranks[0][key], ranks[1][key]], dim=1)
            (getattr(s["record"], key[7:]) if key.startswith("record.") else s[key]).copy_(cat)
    grads = _update_grads(ref)
    ref.env.close()
    assert grads.keys() == {k[5:] for k in ranks[0] if k.startswith("grad.")}
    for name, g in grads.items():
        torch.testing.assert_close(ranks[0][f"grad.{name}"], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", list(SMOKE))
def test_every_family_trains_with_identical_replicas(numbers: Path, family: str) -> None:
    ranks = [load_file(str(numbers / f"smoke-{family}{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_global_advantage_normalisation_equals_one_process(numbers: Path) -> None:
    ranks = [load_file(str(numbers / f"numbers{r}.safetensors")) for r in range(2)]
    x = torch.cat([r["x"] for r in ranks])  # unequal shares: 37 and 42 values
    want = (x - x.mean()) / (x.std() + 1e-8)
    torch.testing.assert_close(torch.cat([r["normalized"] for r in ranks]), want, rtol=1e-5, atol=1e-6)


def test_merged_normaliser_statistics_equal_one_process_statistics(numbers: Path) -> None:
    from genrl_envs.normalize import FastRunningMeanStd

    ranks = [load_file(str(numbers / f"numbers{r}.safetensors")) for r in range(2)]
    for key in ranks[0]:
        if key.startswith(("obs.", "return.")):
            assert torch.equal(ranks[0][key], ranks[1][key]), key  # every rank holds the same numbers
    obs, ret = FastRunningMeanStd(shape=(3,)), FastRunningMeanStd(shape=())
    for it in range(3):
        data = [_normaliser_data(r, it) for r in range(2)]
        obs.update(np.concatenate([d[0] for d in data]))
        ret.update(np.concatenate([d[1] for d in data]))
    for name, rms in (("obs", obs), ("return", ret)):
        for k in ("mean", "var", "count"):
            np.testing.assert_allclose(ranks[0][f"{name}.{k}"].numpy(), np.asarray(getattr(rms, k)), rtol=1e-10, err_msg=f"{name}.{k}")


def test_bc_gradient_equals_one_process_gradient_on_the_union_of_shards(numbers: Path, demos: Path) -> None:
    from genrl.algos.bc import _SAMPLER_SEED
    from genrl.trainer import build

    ranks = [load_file(str(numbers / f"bc{r}.safetensors")) for r in range(2)]
    cfg = _bc_cfg(demos)
    bc = build(cfg)  # one process
    drawn = torch.randint(len(bc.data), (32,), generator=torch.Generator().manual_seed(cfg.run.seed + _SAMPLER_SEED))
    assert torch.equal(torch.cat([r["rows"] for r in ranks]), drawn)  # disjoint shards of the one-process batch
    losses = []
    for r in ranks:  # each shard's samples with the noise that rank drew for them
        obs, actions = bc.data.get(r["rows"])
        losses.append(bc.model.bc_loss(bc.normalize(obs), actions, generator=torch.Generator().set_state(r["gen"])))
    torch.stack(losses).mean().backward()  # the mean over the union (equal shards)
    for n, p in bc.model.named_parameters():
        assert torch.equal(ranks[0][f"grad.{n}"], ranks[1][f"grad.{n}"]), n
        torch.testing.assert_close(ranks[0][f"grad.{n}"], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    bc.env.close()


# -- runs: logs, checkpoints, resume, failure ----------------------------------------------------
def _run_cfg(out: Path) -> Any:
    return config_from_dict({
        "policy": "gaussian", "env": {"env_id": "Pendulum-v1", "n_envs": 2}, "ppo": {"n_steps": 32, "n_minibatches": 2, "n_epochs": 2},
        "run": {"total_steps": 512, "seed": 5, "out": str(out), "save_every": 128, "keep_checkpoints": 0, "eval_episodes": 1,
                "progress": False, "distributed": "auto", "distributed_timeout_s": TIMEOUT_S},
    })  # fmt: skip


def _train_worker(rank: int, world: int, out: Path, resume: bool, make: Any = None) -> None:
    import genrl.trainer as trainer

    if rank > 0:  # rank 0 alone writes: any write from another rank fails the run

        def refuse(*_: Any, **__: Any) -> None:
            raise AssertionError(f"rank {rank} wrote to the run folder")

        trainer.save_checkpoint = trainer.Logger = trainer.write_meta = trainer.export_agent = refuse  # type: ignore[assignment]
    run = trainer.train(resume=out) if resume else trainer.train((make or _run_cfg)(out))
    from genrl.checkpoint import latest_checkpoint
    from genrl.distributed import replica

    assert replica().world_size == 1  # the group was left
    state = load_file(str(latest_checkpoint(run) / "policy" / "model.safetensors"))
    save_file(state, str(out.parent / f"{out.name}-weights{rank}.safetensors"))


def _same_checkpoint(a: Path, b: Path) -> None:
    from compare import assert_same_tensors

    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for f in files:
        assert_same_tensors(a / f, b / f)


def _progress(run: Path) -> list[str]:
    rows = [r.split(",") for r in (run / "progress.csv").read_text().splitlines()]
    keep = [i for i, k in enumerate(rows[0]) if not k.startswith("time/")]
    return [",".join(r[i] for i in keep) for r in rows]


@pytest.fixture(scope="module")
def run2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-process run: 4 iterations of 128 global steps, a checkpoint after each."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    assert _spawn(_train_worker, run, False) == [0, 0]
    return run


def _cut(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    for step in (384, 512):
        shutil.rmtree(to / "checkpoints" / str(step))
    return to


def test_rank_0_alone_writes_logs_and_checkpoints_with_every_ranks_state(run2: Path) -> None:
    from genrl.checkpoint import checkpoint_steps

    w = [load_file(str(run2.parent / f"run-weights{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # identical replicas
    assert checkpoint_steps(run2) == [128, 256, 384, 512]  # global steps: 2 ranks x 2 envs x 32 per iteration
    assert len((run2 / "progress.csv").read_text().splitlines()) == 5  # one writer, one row per iteration
    final = run2 / "checkpoints" / "512"
    r1, env0 = load_file(str(final / "rank1.safetensors")), load_file(str(final / "env.safetensors"))
    for k in ("obs_rms.mean", "obs_rms.var", "ret_rms.var"):  # merged statistics, the same on both ranks
        assert torch.equal(env0[k], r1[f"env.{k}"]), k
    assert not torch.equal(env0["ret.accumulated"], r1["env.ret.accumulated"])  # each rank's own envs
    assert not torch.equal(load_file(str(final / "trainer.safetensors"))["rng.generator"], r1["algo.rng.generator"])


def test_resume_with_the_same_number_of_processes_is_bitwise(run2: Path, tmp_path: Path) -> None:
    same = _cut(run2, tmp_path / "same")
    assert _spawn(_train_worker, same, True) == [0, 0]
    _same_checkpoint(run2 / "checkpoints" / "512", same / "checkpoints" / "512")
    assert _progress(same) == _progress(run2)


def test_resume_with_fewer_processes_continues_and_says_what_is_not_exact(run2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from genrl.checkpoint import checkpoint_steps
    from genrl.trainer import train

    fewer = _cut(run2, tmp_path / "fewer")
    capsys.readouterr()
    train(resume=fewer)  # one process (no torchrun): 2 -> 1
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if "2-process checkpoint with 1 process" in line]
    assert len(note) == 1 and "the episodes and RNG streams of rank 1 end" in note[0], out
    assert checkpoint_steps(fewer)[-1] == 512 and not (fewer / "checkpoints" / "512" / "rank1.safetensors").exists()


def _dying_worker(rank: int, world: int, out: Path) -> None:
    import genrl.trainer as trainer
    from genrl.algos.ppo import PPO
    from genrl.errors import DistributedError

    if rank == 1:
        iterate = PPO.iterate

        def die_at_third(self: PPO) -> dict[str, float]:
            if self.iteration == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return iterate(self)

        PPO.iterate = die_at_third  # type: ignore[method-assign]
    try:
        trainer.train(_run_cfg(out))
    except DistributedError as exc:
        (out.parent / "message.txt").write_text(str(exc))


def test_a_dead_rank_stops_the_others_with_one_line_and_the_checkpoint_intact(tmp_path: Path) -> None:
    from genrl.checkpoint import checkpoint_steps, load_checkpoint

    run = tmp_path / "run"
    codes = _spawn(_dying_worker, run)
    assert codes == [0, -signal.SIGKILL]
    message = (tmp_path / "message.txt").read_text()
    assert "\n" not in message and message.startswith("rank 0 of 2:") and "another process stopped" in message
    assert "the last checkpoint (step 256) is intact" in message and f"--resume {run}" in message
    assert checkpoint_steps(run) == [128, 256]
    load_checkpoint(run / "checkpoints" / "256")  # complete and readable
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_unsupported_combinations_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from genrl.distributed import session

    with pytest.raises(ConfigError) as err:
        config_from_dict({"algo": "sac", "policy": "gorl", "run": {"distributed": "ddp"}})
    assert "\n" not in str(err.value) and "GoRL over SAC runs in one process" in str(err.value)
    import genrl.algos.grpo as grpo
    from genrl.distributed import Replica
    from genrl.image_trainer import build_image

    monkeypatch.setattr(grpo, "replica", lambda: Replica(0, 2))  # what a rank of 2 checks before any collective
    for algo, over, match in (
        ("flow-grpo", {"drop_zero_advantage": True}, "drop_zero_advantage runs in one process"),
        ("flow-grpo", {"prompts_per_iter": 3, "group_size": 3}, "9 images per iteration do not split into 2 equal shards"),
        ("g2rpo", {"prompts_per_iter": 3}, "prompts_per_iter = 3 does not split into 2 processes"),
    ):
        with pytest.raises(ConfigError, match=match):
            build_image(_image_cfg(algo, **over))
    with pytest.raises(ConfigError, match="invalid run.distributed"):
        config_from_dict({"run": {"distributed": "fsdp"}})
    with pytest.raises(ConfigError, match="grpo.fsdp shards full fine-tuning"):
        _image_cfg("flow-grpo", fsdp=True)
    monkeypatch.setattr(grpo, "replica", lambda: Replica(0, 1))
    with pytest.raises(ConfigError, match="launch with torchrun"):
        build_image(_image_cfg("flow-grpo", finetune="full", fsdp=True))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="needs a launcher: torchrun"), session("ddp", "ppo", "cpu", 1.0):
        pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="not compose"), session("auto", "compose", "cpu", 1.0):
        pass
    with pytest.raises(ConfigError, match="one of 2 processes torchrun started"), session("off", "ppo", "cpu", 1.0):
        pass


# -- SAC: per-rank buffers, each update on the union of the ranks' shards ---------------------------
def _sac_cfg(out: Path | None = None, n_envs: int = 1, **run: Any) -> Any:
    return config_from_dict({
        "algo": "sac", "policy": "gaussian", "env": {"env_id": "Pendulum-v1", "n_envs": n_envs},
        "policy_config": {"hidden_sizes": [16]},
        "algo_config": {"steps_per_iter": 40, "learning_starts": 40, "batch_size": 16, "critic_hidden": [16], "buffer_size": 1000, "policy_frequency": 1},
        "run": {"total_steps": 400, "seed": 3, "distributed_timeout_s": TIMEOUT_S, "progress": False, "eval_episodes": 1,
                **({"out": str(out), "save_every": 80, "keep_checkpoints": 0} if out else {}), **run},
    })  # fmt: skip


def _sac_update_worker(rank: int, world: int, out: Path) -> None:
    """One SAC update after 40 random global steps: each rank's shard, its sampling stream and the
    averaged critic / actor / temperature gradients, saved for the one-process comparison."""
    from genrl.distributed import session
    from genrl.trainer import build

    with session("ddp", "sac", "cpu", TIMEOUT_S):
        algo = build(_sac_cfg())
        init = {f"critic.{k}": v.clone() for k, v in algo.critic.state_dict().items()}
        init.update({f"policy.{k}": v.clone() for k, v in algo.policy.state_dict().items()})
        algo.iterate()  # 20 vector steps per rank, no update yet
        assert algo.global_step == 40 and algo.n_updates == 0 and len(algo.buffer) == 20
        rec: dict[str, torch.Tensor] = {}
        sample, actor_loss = algo.buffer.sample, algo.actor_loss

        def sample_and_record(*a: Any, **k: Any) -> Any:
            batch = sample(*a, **k)
            rec.update({f"batch.{f.name}": getattr(batch, f.name).clone() for f in dataclasses.fields(batch)})
            rec["gen.td"] = algo.generator.get_state()
            return batch

        def actor_loss_and_record(*a: Any, **k: Any) -> Any:
            rec["gen.actor"] = algo.generator.get_state()
            rec.update({f"critic_after.{n}": v.clone() for n, v in algo.critic.state_dict().items()})
            return actor_loss(*a, **k)

        algo.buffer.sample, algo.actor_loss = sample_and_record, actor_loss_and_record
        for name, opt, params in (("critic", algo.critic_opt, dict(algo.critic.named_parameters())),
                                  ("actor", algo.actor_opt, dict(algo.policy.named_parameters())), ("alpha", algo.alpha_opt, {"log_alpha": algo.log_alpha})):  # fmt: skip
            real = opt.step

            def step(*a: Any, _name: str = name, _real: Any = real, _params: dict[str, Any] = params, **k: Any) -> Any:
                rec.update({f"grad.{_name}.{n}": p.grad.clone() for n, p in _params.items() if p.grad is not None})
                return _real(*a, **k)

            opt.step = step
        algo.update({})
        save_file({**init, **rec}, str(out / f"sac{rank}.safetensors"))
        algo.env.close()


def test_sac_update_equals_one_process_update_on_the_union_of_shards(tmp_path: Path) -> None:
    from genrl.algos.sac import temperature_loss
    from genrl.replay import Batch
    from genrl.trainer import build

    assert _spawn(_sac_update_worker, tmp_path) == [0, 0]
    ranks = [load_file(str(tmp_path / f"sac{r}.safetensors")) for r in range(2)]
    for key in ranks[0]:
        if key.startswith(("grad.", "critic.", "policy.", "critic_after.")):  # identical replicas, identical averaged gradients
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0]["batch.obs"].shape[0] == 8 and not torch.equal(ranks[0]["batch.obs"], ranks[1]["batch.obs"])  # 16 = 2 shards of 8
    ref = build(_sac_cfg())  # one process, the same initial weights
    assert all(torch.equal(v, ranks[0][f"critic.{k}"]) for k, v in ref.critic.state_dict().items())
    batches = [Batch(**{k[6:]: v for k, v in r.items() if k.startswith("batch.")}) for r in ranks]
    alpha = ref.log_alpha.detach().exp()
    losses = []
    for r, batch in zip(ranks, batches):  # each shard with the noise its rank drew for it
        ref.generator.set_state(r["gen.td"])
        target = ref.td_target(batch, alpha)
        q1, q2 = ref.critic(batch.obs, batch.action)
        losses.append(torch.nn.functional.mse_loss(q1, target) + torch.nn.functional.mse_loss(q2, target))
    torch.stack(losses).mean().backward()  # the global batch's loss: the mean of two equal shards' means
    for n, p in ref.critic.named_parameters():
        torch.testing.assert_close(ranks[0][f"grad.critic.{n}"], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    ref.critic.load_state_dict({k[13:]: v for k, v in ranks[0].items() if k.startswith("critic_after.")})
    actor, log_probs = [], []
    for r, batch in zip(ranks, batches):
        ref.generator.set_state(r["gen.actor"])
        loss, log_prob, _ = ref.actor_loss(batch.obs, alpha)
        actor.append(loss)
        log_probs.append(log_prob.detach())
    ref.actor_opt.zero_grad()
    torch.stack(actor).mean().backward(inputs=ref.actor_params)
    for n, p in ref.policy.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ranks[0][f"grad.actor.{n}"], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    temperature_loss(ref.log_alpha, torch.cat(log_probs), ref.target_entropy).backward()
    torch.testing.assert_close(ranks[0]["grad.alpha.log_alpha"], ref.log_alpha.grad, rtol=1e-5, atol=1e-7)
    ref.env.close()


@pytest.fixture(scope="module")
def sac2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-process SAC run: 10 iterations of 40 global steps, a checkpoint every 80."""
    run = tmp_path_factory.mktemp("ddp_sac") / "run"
    assert _spawn(_train_worker, run, False, _sac_cfg) == [0, 0]
    return run


def test_sac_ranks_keep_their_own_buffers_and_resume_bitwise(sac2: Path, tmp_path: Path) -> None:
    from genrl.checkpoint import checkpoint_steps, load_checkpoint

    w = [load_file(str(sac2.parent / f"run-weights{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert checkpoint_steps(sac2) == [80, 160, 240, 320, 400]
    final = sac2 / "checkpoints" / "400"
    r1, t0 = load_file(str(final / "rank1.safetensors")), load_file(str(final / "trainer.safetensors"))
    assert r1["algo.buffer.obs"].shape == t0["buffer.obs"].shape == (200, 1, 3)  # 200 vector steps per rank
    assert not torch.equal(r1["algo.buffer.obs"], t0["buffer.obs"])  # each rank's own transitions
    state = load_checkpoint(final)["state"]
    assert state["algo_state"]["n_updates"] == 360 and state["distributed"]["ranks"]["1"]["groups"] == ["buffer"]
    same = tmp_path / "same"
    shutil.copytree(sac2, same)
    for step in (240, 320, 400):
        shutil.rmtree(same / "checkpoints" / str(step))
    assert _spawn(_train_worker, same, True) == [0, 0]
    _same_checkpoint(final, same / "checkpoints" / "400")
    assert _progress(same) == _progress(sac2)


# -- Flow-GRPO / G2RPO: shared prompts, each rank's images, gathered rewards ------------------------
def _image_cfg(algo: str, out: Path | None = None, total: int | None = None, **grpo: Any) -> Any:
    prompts = 3 if algo == "flow-grpo" else 2  # Flow-GRPO: 3 x 2 images, so the middle group spans the two ranks
    return config_from_dict({
        "env": "t2i", "algo": algo, "model": "digits", "reward": "digit",
        "grpo": {"n_steps": 3, "group_size": 2, "prompts_per_iter": prompts, "lora_rank": 2, "eval_n_steps": 2, **grpo},
        "run": {"total_steps": total or 24, "seed": 7, "progress": False, "distributed_timeout_s": TIMEOUT_S, "eval_episodes": 1,
                **({"out": str(out), "save_every": 1, "keep_checkpoints": 0} if out else {})},
    })  # fmt: skip


def _image_batch_and_grads(algo: Any, batch: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """A collected batch (or ``batch``) and the gradients of every optimiser step of its update
    (the steps themselves skipped, so each gradient is taken at the same weights)."""
    from genrl.algos.grpo import _Timer

    batch = batch or algo.collect(_Timer())
    grads: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in algo.policy.named_parameters()}
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g.clone()  # noqa: E731  FSDP: every rank's shards
    algo.optimizer.step = lambda *a, **k: grads.append({names[id(p)]: full(p.grad) for p in algo.params})
    algo.update(batch)
    return batch, grads


_IMAGE_KEYS = {"flow-grpo": ("x", "x_next", "log_prob", "mean", "advantages"), "g2rpo": ("anchors", "x_next", "log_prob", "mean", "advantages")}
_IMAGE_RUNS = {"flow-grpo": ("flow-grpo", {}), "g2rpo": ("g2rpo", {}), "flow-grpo-fsdp": ("flow-grpo", {"finetune": "full", "fsdp": True})}
"""test name -> (algorithm, grpo overrides); the FSDP run's one-process reference is full fine-tuning."""


def _image_update_worker(rank: int, world: int, out: Path) -> None:
    from genrl.distributed import session
    from genrl.image_trainer import build_image

    with session("ddp", "flow-grpo", "cpu", TIMEOUT_S):
        for name, (algo_name, over) in _IMAGE_RUNS.items():
            algo = build_image(_image_cfg(algo_name, **over))
            batch, grads = _image_batch_and_grads(algo)
            prompts = {f"prompt{i}": torch.tensor(list(p.encode())) for i, p in enumerate(batch["prompts"])}
            scores = {f"score.{k}": v for k, v in batch["scores"].items()}
            dim = 0 if algo_name == "flow-grpo" else 1
            save_file({**{k: batch[k].contiguous() for k in _IMAGE_KEYS[algo_name]}, **prompts, **scores, "dim": torch.tensor(dim),
                       **{f"grad{i}.{n}": g for i, step in enumerate(grads) for n, g in step.items()}}, str(out / f"{name}{rank}.safetensors"))  # fmt: skip


@pytest.fixture(scope="module")
def image_numbers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image_numbers")
    assert _spawn(_image_update_worker, out) == [0, 0]
    return out


@pytest.mark.parametrize("run", list(_IMAGE_RUNS))
def test_image_groups_span_ranks_and_the_update_equals_one_process(image_numbers: Path, run: str) -> None:
    """Data parallel (LoRA, gradients all-reduced) and FSDP (full fine-tuning, sharded weights,
    gradients reduce-scattered): the gradients of every optimiser step equal one process's on the
    concatenated batch."""
    from genrl.advantages import aggregate_advantages
    from genrl.algos.grpo import trained_steps
    from genrl.image_trainer import build_image
    from genrl_policies.t2i import Conditioning

    name, over = _IMAGE_RUNS[run]
    over = {k: v for k, v in over.items() if k != "fsdp"}
    ranks = [load_file(str(image_numbers / f"{run}{r}.safetensors")) for r in range(2)]
    dim = int(ranks[0]["dim"])
    for key in ranks[0]:
        if key.startswith(("grad", "score.")):  # identical averaged gradients; every rank saw every reward
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    ref = build_image(_image_cfg(name, **over))  # one process, the same seed: the same prompts and initial noise
    prompts = ref._prompts()
    seen = [[bytes(r[f"prompt{i}"].tolist()).decode() for i in range(sum(k.startswith("prompt") for k in r))] for r in ranks]
    assert seen == ([prompts, prompts] if name == "flow-grpo" else [prompts[:1], prompts[1:]])  # G2RPO: each rank its whole prompts
    full = {k: torch.cat([r[k] for r in ranks], dim=dim) for k in _IMAGE_KEYS[name]}
    G = ref.cfg.group_size
    if name == "flow-grpo":
        grouped = {k[6:]: v.reshape(len(prompts), G) for k, v in ranks[0].items() if k.startswith("score.")}
        want = aggregate_advantages(grouped, ref.env.rewards.weights, mode=ref.aggregation, std_scope=ref.cfg.std_scope, ddof=ref.ddof, eps=ref.eps)
        torch.testing.assert_close(full["advantages"], want.reshape(-1).clamp(-ref.cfg.adv_clip, ref.cfg.adv_clip))  # a group across ranks
        x0 = ref.env.initial_noise(len(prompts) * G, ref.shared)
        assert torch.equal(full["x"][:, 0], x0)  # the shared stream's initial noise, split by rows
        batch = {**full, "prompts": prompts, "steps": trained_steps(ref.cfg), "cond": Conditioning(*ref.env.encode(prompts)).repeat_interleave(G)}
    else:
        x0 = ref.env.initial_noise(len(prompts), ref.shared)
        assert torch.equal(full["anchors"][0], x0)  # each rank's whole prompts, the shared initial noise
        batch = {**full, "prompts": prompts, "cond_p": Conditioning(*ref.env.encode(prompts))}
    _, grads = _image_batch_and_grads(ref, batch)
    assert len(grads) == sum(1 for k in ranks[0] if k.startswith("grad") and k.endswith(next(iter(grads[0]))))
    for i, step in enumerate(grads):
        for n, g in step.items():
            torch.testing.assert_close(ranks[0][f"grad{i}.{n}"], g, rtol=1e-4, atol=1e-7, msg=f"step {i} {n}")


def _cut_to(run: Path, to: Path, step: int) -> Path:
    """A copy of ``run`` whose checkpoints end at ``step`` (what a run stopped there leaves)."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name) > step:
            shutil.rmtree(ckpt)
    return to


def _image_train_worker(rank: int, world: int, out: Path, resume: bool) -> None:
    import genrl.image_trainer as image_trainer
    from genrl.checkpoint import latest_checkpoint
    from genrl.trainer import train

    if rank > 0:

        def refuse(*_: Any, **__: Any) -> None:
            raise AssertionError(f"rank {rank} wrote to the run folder")

        image_trainer.save_checkpoint = image_trainer.export_model = image_trainer.evaluate_grid = refuse  # type: ignore[assignment]
    run = train(resume=out) if resume else train(_image_cfg("flow-grpo", out, total=24))
    save_file(load_file(str(latest_checkpoint(run) / "adapter.safetensors")), str(out.parent / f"{out.name}-adapter{rank}.safetensors"))


def test_flow_grpo_run_on_two_processes_writes_once_and_resumes_bitwise(tmp_path: Path) -> None:
    from genrl.checkpoint import checkpoint_steps, load_checkpoint

    run = tmp_path / "run"
    assert _spawn(_image_train_worker, run, False) == [0, 0]
    a = [load_file(str(tmp_path / f"run-adapter{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(a[0][k], a[1][k]) for k in a[0])  # identical replicas
    assert checkpoint_steps(run) == [6, 12, 18, 24] and (run / "final").is_dir()
    ckpt = load_checkpoint(run / "checkpoints" / "24", files=("adapter.safetensors", "trainer.safetensors", "state.json"))
    assert ckpt["state"]["distributed"] == {"world_size": 2} and "rank1" in ckpt["tensors"]
    assert not torch.equal(ckpt["tensors"]["rank1"]["generator"], ckpt["trainer"]["generator"])  # each rank's own SDE noise
    same = _cut_to(run, tmp_path / "same", 12)
    assert _spawn(_image_train_worker, same, True) == [0, 0]
    _same_checkpoint(run / "checkpoints" / "24", same / "checkpoints" / "24")
    assert _progress(same) == _progress(run)


def _fsdp_train_worker(rank: int, world: int, out: Path, resume: bool) -> None:
    import genrl.image_trainer as image_trainer
    from genrl.trainer import train

    if rank > 0:

        def refuse(*_: Any, **__: Any) -> None:
            raise AssertionError(f"rank {rank} wrote a checkpoint")

        image_trainer.save_checkpoint = refuse  # type: ignore[assignment]
    train(resume=out) if resume else train(_image_cfg("flow-grpo", out, total=24, finetune="full", fsdp=True, ema=True))


def test_fsdp_run_writes_full_weights_once_exports_a_loadable_model_and_resumes_bitwise(tmp_path: Path) -> None:
    from genrl.checkpoint import checkpoint_steps, load_checkpoint
    from genrl.image_trainer import load_finetuned

    run = tmp_path / "run"
    assert _spawn(_fsdp_train_worker, run, False) == [0, 0]
    assert checkpoint_steps(run) == [6, 12, 18, 24] and (run / "images" / "grid-24.png").is_file()
    ckpt = load_checkpoint(run / "checkpoints" / "24", files=("adapter.safetensors", "trainer.safetensors", "optimizer.pt", "state.json"))
    weights = ckpt["tensors"]["adapter"]
    pipe = load_finetuned(run)  # the exported pipeline, unsharded, loadable by diffusers
    exported = pipe.transformer.state_dict()
    assert set(exported) == set(weights)
    ema = {k: v for k, v in ckpt["trainer"].items() if k.startswith("ema.")}
    trained = [p for p in pipe.transformer.parameters()]
    assert len(ema) == len(trained)  # full (unsharded) EMA tensors, one per parameter
    for i, p in enumerate(trained):  # Flow-GRPO exports the EMA weights
        assert torch.equal(p.detach(), ema[f"ema.{i}"]), i
    assert not all(torch.equal(weights[k], exported[k]) for k in weights)  # the live weights differ from the EMA ones
    state = ckpt["optimizer"]["state"]
    assert set(state) <= set(weights) and all(v["exp_avg"].shape == weights[k].shape for k, v in state.items())  # full, by name
    same = _cut_to(run, tmp_path / "same", 12)
    assert _spawn(_fsdp_train_worker, same, True) == [0, 0]
    _same_checkpoint(run / "checkpoints" / "24", same / "checkpoints" / "24")
    resumed = load_checkpoint(same / "checkpoints" / "24", files=("adapter.safetensors", "trainer.safetensors", "optimizer.pt", "state.json"))
    for k, v in state.items():  # the AdamW moments, gathered from the shards, bitwise
        assert all(torch.equal(v[m], resumed["optimizer"]["state"][k][m]) for m in ("exp_avg", "exp_avg_sq")), k
    assert _progress(same) == _progress(run)

"""--algo bc: demonstrations -> behaviour cloning -> (exact resume) -> PPO fine-tuning."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from compare import assert_same_tensors

from genrl import Agent
from genrl.config import config_from_dict
from genrl.datasets import save_demos
from genrl.errors import ConfigError
from genrl.trainer import build, train
from genrl_envs.experts import record_demos
from genrl_envs.maze import ENV_ID as MAZE

CHUNKS = {"horizon": 4, "n_obs_steps": 2, "n_action_steps": 2}


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demos") / "maze.safetensors"
    data = record_demos(MAZE, 60, seed=0)
    save_demos(path, data, data["meta"])
    return path


def bc_config(demos: Path, out: Path, family: str = "diffusion", steps: int = 900) -> object:
    return config_from_dict({
        "algo": "bc", "policy": family, "env": {"env_id": MAZE, **CHUNKS},
        "policy_config": {"hidden_sizes": [64, 64]} if family == "diffusion" else {"hidden_sizes": [64, 64], "n_steps": 4},
        "algo_config": {"dataset": str(demos), "batch_size": 128, "updates_per_iter": 300, "warmup_steps": 50, "learning_rate": 1e-3},
        "run": {"total_steps": steps, "seed": 0, "out": str(out), "save_every": 300, "eval_episodes": 10, "progress": False},
    })  # fmt: skip


def test_bc_clones_the_scripted_expert_and_resumes_exactly(demos: Path, tmp_path: Path) -> None:
    run = train(bc_config(demos, tmp_path / "bc"))
    rows = (run / "progress.csv").read_text().splitlines()
    header = rows[0].split(",")
    loss = [float(r.split(",")[header.index("train/bc_loss")]) for r in rows[1:]]
    assert loss[-1] < 0.5 * loss[0]
    result = Agent.load(run).evaluate(episodes=10, seed=123)
    assert result["eval/terminated_rate"] >= 0.8  # the expert reaches the goal in every episode
    part = tmp_path / "part"
    shutil.copytree(run, part)
    shutil.rmtree(part / "checkpoints" / "900")
    train(resume=part)
    for name in ("policy/model.safetensors", "trainer.safetensors"):
        assert_same_tensors(run / "checkpoints" / "900" / name, part / "checkpoints" / "900" / name)


def test_ppo_fine_tunes_the_cloned_policy(demos: Path, tmp_path: Path) -> None:
    bc = train(bc_config(demos, tmp_path / "bc", steps=300))
    cfg = config_from_dict({
        "policy": "diffusion", "env": {"env_id": MAZE, "n_envs": 2, **CHUNKS}, "init_from": str(bc),
        "policy_config": {"hidden_sizes": [64, 64], "ft_denoising_steps": 3}, "ppo": {"n_steps": 32, "n_minibatches": 2, "n_epochs": 1},
        "run": {"total_steps": 128, "seed": 0, "out": str(tmp_path / "ppo"), "eval_episodes": 2, "progress": False},
    })  # fmt: skip
    algo = build(cfg)
    cloned = Agent.load(bc).policy.state_dict()
    for k, v in algo.policy.state_dict().items():  # the fine-tuning copy's frozen steps start from the clone too
        src = cloned[k] if k in cloned else cloned[k.replace("base_net.", "net.")]
        assert (v == src).all(), k
    algo.env.close()
    run = train(cfg)
    assert (run / "final").is_dir()
    source, tuned = Agent.load(bc), Agent.load(run)  # the clone's dataset statistics stay frozen through fine-tuning (DPPO)
    assert source.algo == "bc" and tuned.algo == "ppo"
    for k in ("mean", "var", "count"):
        assert np.array_equal(tuned.obs_normalizer[k], source.obs_normalizer[k]), k


def test_bc_refuses_what_it_cannot_clone(demos: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be behaviour-cloned"):
        build(config_from_dict({"algo": "bc", "policy": "gaussian", "env": {"env_id": MAZE}, "algo_config": {"dataset": str(demos)}}))
    with pytest.raises(ConfigError, match="needs a dataset"):
        build(config_from_dict({"algo": "bc", "policy": "diffusion", "env": {"env_id": MAZE}}))
    with pytest.raises(ConfigError, match="holds demonstrations of genrl/PointMaze-v0, the run's env is Hopper-v5"):
        build(config_from_dict({"algo": "bc", "policy": "diffusion", "env": {"env_id": "Hopper-v5"}, "algo_config": {"dataset": str(demos)}}))
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a dataset")
    with pytest.raises(ConfigError, match="bad.safetensors"):
        build(config_from_dict({"algo": "bc", "policy": "diffusion", "env": {"env_id": MAZE}, "algo_config": {"dataset": str(bad)}}))

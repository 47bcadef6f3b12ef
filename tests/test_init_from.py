"""``init_from``: a run starts from another run's (or an exported agent's) policy and observation
statistics, the demos -> BC -> RL workflow's last link."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genrl import Agent
from genrl.config import config_from_dict
from genrl.errors import ConfigError
from genrl.trainer import build, train


def cfg(out: Path, **extra: object) -> object:
    return config_from_dict({
        "env": {"env_id": "Pendulum-v1"}, "ppo": {"n_steps": 64, "n_minibatches": 2, "n_epochs": 1},
        "run": {"total_steps": 128, "seed": 0, "out": str(out), "eval_episodes": 1, "progress": False}, **extra,
    })  # fmt: skip


def test_a_run_starts_from_another_runs_policy_and_statistics(tmp_path: Path) -> None:
    first = train(cfg(tmp_path / "first"))
    source = Agent.load(first)
    for origin in (first, source.save(tmp_path / "exported")):
        algo = build(cfg(tmp_path / "second", init_from=str(origin)))
        for k, v in source.policy.state_dict().items():
            assert torch.equal(algo.policy.state_dict()[k], v), k
        state = algo.env.obs_normalizer_state()  # the source's statistics, then the first reset's observation
        assert float(state["count"]) == pytest.approx(float(source.obs_normalizer["count"]) + 1)
        algo.env.close()
    second = train(cfg(tmp_path / "second", init_from=str(first)))
    assert (second / "config.json").read_text().count(str(first.resolve())) == 1  # recorded, absolute


def test_init_from_refuses_what_does_not_fit(tmp_path: Path) -> None:
    first = train(cfg(tmp_path / "first"))
    with pytest.raises(ConfigError, match="holds a gaussian policy .* this run builds a pmoe policy"):
        build(cfg(tmp_path / "x", init_from=str(first), policy="pmoe"))
    with pytest.raises(ConfigError, match="init_from: .* does not exist"):
        cfg(tmp_path / "y", init_from=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="init_from: .* is not a genrl run"):
        build(cfg(tmp_path / "z", init_from=str(tmp_path)))


def test_runs_written_before_a_config_field_existed_still_resume(tmp_path: Path) -> None:
    """A field added since (here policy_config.squash) takes its default on both sides."""
    import json

    run = train(cfg(tmp_path / "old"))
    for f in [run / "config.json", *(run / "checkpoints").glob("*/state.json")]:
        data = json.loads(f.read_text())
        target = data if f.name == "config.json" else data["config"]
        del target["policy_config"]["squash"]
        f.write_text(json.dumps(data))
    assert (train(resume=run, extend_to=256) / "checkpoints" / "256").is_dir()

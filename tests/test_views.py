"""Observation views (env.obs_resolution): the rounding rule, the gymnasium wrapper, configs,
behaviour cloning and agents that see through them, and composition of parents with different
views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genrl import compose
from genrl.agent import Agent
from genrl.config import config_from_dict
from genrl.datasets import save_demos
from genrl.errors import ConfigError
from genrl.trainer import build, train
from genrl_envs import EnvError, make_env
from genrl_envs.experts import record_demos
from genrl_envs.maze import ENV_ID as MAZE
from genrl_envs.views import apply_view, parse_resolution

CHUNKS = {"horizon": 4, "n_obs_steps": 2, "n_action_steps": 2}


def test_rounding_rule_on_stacked_frames_numpy_and_torch() -> None:
    obs = np.array([[0.26, 1.74, -0.26, 3.0, 0.24, 1.76, -0.74, 3.0]], dtype=np.float32)  # two frames of 4
    out = apply_view(obs, {0: 0.5, 2: 0.5}, 4)
    expected = obs.copy()
    for col in (0, 2, 4, 6):  # dims 0 and 2 of both frames: the nearest multiple of 0.5
        expected[0, col] = 0.5 * np.round(obs[0, col] / 0.5)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == 0.5 and out[0, 2] == -0.5 and out[0, 4] == 0.0 and out[0, 6] == -0.5
    np.testing.assert_array_equal(out[:, [1, 3, 5, 7]], obs[:, [1, 3, 5, 7]])  # other dims untouched
    np.testing.assert_array_equal(apply_view(out, {0: 0.5, 2: 0.5}, 4), out)  # idempotent
    t = apply_view(torch.from_numpy(obs), {0: 0.5, 2: 0.5}, 4)
    np.testing.assert_array_equal(t.numpy(), out)
    assert apply_view(obs, {}, 4) is obs


@pytest.mark.parametrize(
    ("resolution", "match"),
    [({"x": 0.5}, "not an integer"), ({"-1": 0.5}, "outside"), ({"9": 0.5}, "outside"), ({"0": 0.0}, "finite number > 0"),
     ({"0": float("nan")}, "finite number > 0"), ({"0": True}, "finite number > 0")],
)  # fmt: skip
def test_bad_resolutions_are_refused(resolution: dict, match: str) -> None:
    with pytest.raises(EnvError, match=match):
        parse_resolution(resolution, obs_dim=4)


def test_gym_env_sees_through_the_view_final_obs_included() -> None:
    plain = make_env(MAZE, 2, normalize_obs=False, normalize_reward=False)
    coarse = make_env(MAZE, 2, normalize_obs=False, normalize_reward=False, obs_resolution={"0": 0.5, "1": 0.25})
    a, b = plain.reset(seed=3), coarse.reset(seed=3)
    np.testing.assert_array_equal(b.numpy(), apply_view(a.numpy(), {0: 0.5, 1: 0.25}, 4))
    assert not torch.equal(a, b)
    gen = torch.Generator().manual_seed(0)
    ended = False
    for _ in range(210):  # past the 200-step limit: an autoreset with final observations
        act = torch.rand(2, 2, generator=gen) * 2 - 1
        sa, sb = plain.step(act), coarse.step(act)
        np.testing.assert_array_equal(sb.obs.numpy(), apply_view(sa.obs.numpy(), {0: 0.5, 1: 0.25}, 4))
        np.testing.assert_array_equal(sa.reward.numpy(), sb.reward.numpy())  # the dynamics are the plain env's
        np.testing.assert_array_equal(sb.final_obs.numpy(), apply_view(sa.final_obs.numpy(), {0: 0.5, 1: 0.25}, 4))
        ended |= bool((sa.terminated | sa.truncated).any())
    assert ended
    plain.close(), coarse.close()


def test_configs_refuse_bad_views_and_other_back_ends() -> None:
    with pytest.raises(ConfigError, match="not an integer"):
        config_from_dict({"env": {"env_id": MAZE, "obs_resolution": {"a": 1.0}}})
    with pytest.raises(ConfigError, match="gymnasium back end"):
        config_from_dict({"env": {"env_id": MAZE, "backend": "torch", "obs_resolution": {"0": 1.0}}})
    cfg = config_from_dict({"env": {"env_id": MAZE, "obs_resolution": {"0": 1.0}}, "run": {"total_steps": 64}, "ppo": {"n_steps": 32}})
    algo = build(cfg)  # "auto" picks gymnasium, where views run
    assert algo.env.spec.backend == "gymnasium"
    with pytest.raises(EnvError, match="outside"):  # an index past the observation: one line (the CLI's) when the env is built
        build(config_from_dict({"env": {"env_id": MAZE, "obs_resolution": {"4": 1.0}}, "run": {"total_steps": 64}, "ppo": {"n_steps": 32}}))


@pytest.fixture(scope="module")
def viewed_parents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("views")
    demos = root / "demos.safetensors"
    data = record_demos(MAZE, 20, seed=1)
    save_demos(demos, data, data["meta"])
    out = []
    for dim in ("0", "1"):
        cfg = config_from_dict({
            "algo": "bc", "policy": "diffusion", "env": {"env_id": MAZE, **CHUNKS, "obs_resolution": {dim: 0.5}},
            "policy_config": {"hidden_sizes": [32, 32]},
            "algo_config": {"dataset": str(demos), "batch_size": 64, "updates_per_iter": 50, "warmup_steps": 10, "learning_rate": 1e-3},
            "run": {"total_steps": 50, "seed": 0, "out": str(root / f"coarse-{dim}"), "save_every": 0, "eval_episodes": 1, "progress": False},
        })  # fmt: skip
        out.append(train(cfg))
    return demos, out


def test_bc_clones_from_the_viewed_dataset(viewed_parents: tuple[Path, list[Path]]) -> None:
    from genrl.datasets import load_demos

    demos, (coarse_x, _) = viewed_parents
    cfg = config_from_dict({
        "algo": "bc", "policy": "diffusion", "env": {"env_id": MAZE, **CHUNKS, "obs_resolution": {"0": 0.5}},
        "policy_config": {"hidden_sizes": [32, 32]}, "algo_config": {"dataset": str(demos)}, "run": {"total_steps": 10},
    })  # fmt: skip
    algo = build(cfg)
    raw = load_demos(demos).obs
    np.testing.assert_array_equal(algo.demos.obs, apply_view(raw, {0: 0.5}, 4))
    mean = np.tile(apply_view(raw, {0: 0.5}, 4).astype(np.float64).mean(0), 2)
    np.testing.assert_allclose(algo._mean.numpy(), mean)  # the frozen statistics are the viewed data's
    algo.env.close()


def test_agents_apply_their_view_and_keep_it_when_exported(viewed_parents: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, (coarse_x, coarse_y) = viewed_parents
    agent = Agent.load(coarse_x)
    assert agent.obs_resolution == {0: 0.5}
    obs = np.array([[1.26, 1.6, 0.1, 0.0, 1.3, 1.6, 0.1, 0.0]])
    np.testing.assert_array_equal(agent.normalize(obs), agent.normalize(apply_view(obs, {0: 0.5}, 4)))
    assert not np.array_equal(agent.normalize(obs), Agent.load(coarse_y).normalize(obs))
    exported = Agent.load(agent.save(tmp_path / "agent"))
    assert exported.obs_resolution == {0: 0.5}
    np.testing.assert_array_equal(exported.normalize(obs), agent.normalize(obs))


def test_parents_with_different_views_compose_each_on_its_own_view(viewed_parents: tuple[Path, list[Path]]) -> None:
    _, paths = viewed_parents
    agents = compose.load_parents(paths)
    for i, alone in enumerate(((1.0, 0.0), (0.0, 1.0))):  # an endpoint is its parent acting on its own view
        policy = compose.composed(agents, alone)
        obs = torch.tensor([[1.26, 1.6, 0.1, 0.0, 1.3, 1.74, 0.1, 0.0]], dtype=torch.float32)
        got, _ = policy.act(obs, deterministic=True, generator=torch.Generator().manual_seed(0))
        x = torch.from_numpy(agents[i].normalize(obs.double().numpy()))
        want, _ = agents[i].policy.act(x, deterministic=True, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    report = compose.compose_main([str(p) for p in paths], do_search=False, weights=[0.5, 0.5], val_episodes=0, test_episodes=2,
                                  grid_step=0.1, deterministic=True, out=None, progress=lambda s: None)  # fmt: skip
    assert report["views"] == [{"0": 0.5}, {"1": 0.5}]

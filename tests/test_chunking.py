"""Observation histories and action chunks (Diffusion Policy / DPPO execution): exact semantics,
exact resume, training, and the agent that acts on them."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from genrl import Agent
from genrl.config import config_from_dict
from genrl.errors import ConfigError
from genrl.trainer import train
from genrl_envs import EnvError, GymVectorEnv, make_env
from genrl_envs.chunking import ActionChunking
from genrl_envs.maze import ENV_ID as MAZE


def test_a_chunk_runs_its_first_steps_and_stacks_the_history() -> None:
    inner, ref = gym.make(MAZE), gym.make(MAZE)
    env = ActionChunking(inner, horizon=4, n_obs_steps=2, n_action_steps=3)
    obs, _ = env.reset(seed=1)
    first, _ = ref.reset(seed=1)
    np.testing.assert_array_equal(obs, np.concatenate([first, first]))  # the first observation fills the history
    assert env.observation_space.shape == (8,) and env.action_space.shape == (8,)
    rng = np.random.default_rng(0)
    seen = [first]
    for _ in range(20):
        chunk = rng.uniform(-1, 1, (4, 2)).astype(np.float32)
        obs, reward, term, trunc, info = env.step(chunk.reshape(-1))
        total = 0.0
        for a in chunk[: info["executed_steps"]]:
            o, r, te, tr, _ = ref.step(a)
            seen.append(o)
            total += r
        assert info["executed_steps"] == 3 or te or tr
        np.testing.assert_array_equal(obs, np.concatenate(seen[-2:]))
        assert reward == pytest.approx(total, abs=1e-12) and (term, trunc) == (te, tr)
        if term or trunc:
            break


def test_chunked_vector_env_resumes_exactly() -> None:
    chunking = {"horizon": 3, "n_obs_steps": 2, "n_action_steps": 2}
    env = GymVectorEnv("Hopper-v5", 2, chunking=chunking)
    env.reset(seed=3)
    g = torch.Generator().manual_seed(0)
    actions = [torch.rand(2, 9, generator=g) * 2 - 1 for _ in range(40)]
    for a in actions[:15]:
        env.step(a)
    state = env.state_dict()
    want = [env.step(a) for a in actions[15:]]
    other = GymVectorEnv("Hopper-v5", 2, chunking=chunking)
    other.reset(seed=99)
    other.load_state_dict(state)
    for a, w in zip(actions[15:], want, strict=True):
        got = other.step(a)
        assert torch.equal(got.obs, w.obs) and torch.equal(got.reward, w.reward) and got.episode_returns == w.episode_returns


def test_ppo_trains_on_chunks_and_the_agent_acts_on_them(tmp_path: Path) -> None:
    cfg = config_from_dict({
        "env": {"env_id": MAZE, "n_envs": 2, "horizon": 4, "n_obs_steps": 2, "n_action_steps": 2},
        "ppo": {"n_steps": 32, "n_minibatches": 2, "n_epochs": 1},
        "run": {"total_steps": 128, "seed": 0, "out": str(tmp_path / "run"), "eval_episodes": 1, "progress": False},
    })  # fmt: skip
    assert cfg.env.backend == "auto" and cfg.env.chunking == {"horizon": 4, "n_obs_steps": 2, "n_action_steps": 2}
    run = train(cfg)
    agent = Agent.load(run)
    assert agent.chunking == cfg.env.chunking and agent.policy.obs_dim == 8 and agent.policy.action_dim == 8
    assert agent.predict(np.zeros(8)).shape == (8,)
    exported = Agent.load(agent.save(tmp_path / "agent"))
    assert exported.chunking == agent.chunking
    a, b = agent.evaluate(episodes=1, seed=0), exported.evaluate(episodes=1, seed=0)
    assert a == b and a["eval/length_mean"] <= 100  # decisions of 2 steps each: at most 200 / 2


def test_bad_chunking_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"n_action_steps \(5\) must not exceed horizon \(4\)"):
        config_from_dict({"env": {"horizon": 4, "n_action_steps": 5}})
    with pytest.raises(ConfigError, match="run on the gymnasium back end, not 'torch'"):
        config_from_dict({"env": {"env_id": MAZE, "backend": "torch", "horizon": 2}})
    with pytest.raises(EnvError, match="n_obs_steps must be an integer >= 1"):
        make_env(MAZE, 1, chunking={"horizon": 2, "n_obs_steps": 0, "n_action_steps": 1})

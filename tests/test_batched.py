"""The batched-env API: torch-native tasks equal their numpy versions, torch normalisation equals
gymnasium's, autoreset and bootstrapping agree across back ends, resume is exact, bad input is
refused with one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from compare import assert_same_tensors
from gymnasium.wrappers.utils import RunningMeanStd

from genrl.config import config_from_dict
from genrl.errors import ConfigError
from genrl.trainer import train
from genrl_envs import EnvError, GymVectorEnv, make_env, resolve_backend
from genrl_envs.batched import NumpyRunningMeanStd, TorchRunningMeanStd
from genrl_envs.maze import ENV_ID as MAZE
from genrl_envs.maze import PointMazeEnv
from genrl_envs.multigoal import ENV_ID as MULTIGOAL
from genrl_envs.multigoal import MultiGoalEnv
from genrl_envs.pointmass import MultiGoalSim, PointMazeSim


def _random_actions(n_steps: int, n: int, seed: int, scale: float = 1.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n_steps, n, 2, generator=g) * 2 - 1) * scale  # some outside the box


@pytest.mark.parametrize("kwargs", [{}, {"goal_reward": 10.0, "n_goals": 4}])
def test_multigoal_sim_equals_the_numpy_env(kwargs: dict) -> None:
    n, steps = 16, 60
    sim = MultiGoalSim(n, **kwargs)
    sim.reset(0)
    start = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    sim.position = start.clone()
    envs = [MultiGoalEnv(**kwargs) for _ in range(n)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
        e.position[:] = start[i].numpy()
    for t, action in enumerate(_random_actions(steps, n, 2, 1.0)):
        obs, reward, term, trunc = sim.step(action)
        for i, e in enumerate(envs):
            o, r, te, tr, _ = e.step(action[i].numpy())
            np.testing.assert_allclose(obs[i].numpy(), o, rtol=0, atol=1e-6)
            np.testing.assert_allclose(float(reward[i]), r, rtol=0, atol=1e-12)
            assert bool(term[i]) == te
        assert bool(trunc.any()) == (t + 1 >= 50)


def test_pointmaze_sim_equals_the_numpy_env_through_walls() -> None:
    n, steps = 32, 120
    sim = PointMazeSim(n)
    sim.reset(0)
    envs = [PointMazeEnv() for _ in range(n)]
    for i, e in enumerate(envs):
        e.reset(seed=i)
        e.position[:] = sim.position[i].numpy()
    hits = 0
    for action in _random_actions(steps, n, 3):
        before = sim.velocity.clone()
        obs, reward, term, _ = sim.step(action)
        hits += int(((sim.velocity == 0) & (before != 0)).any(1).sum())
        for i, e in enumerate(envs):
            o, r, te, _, _ = e.step(action[i].numpy())
            np.testing.assert_allclose(np.concatenate([e.position, e.velocity]), torch.cat([sim.position[i], sim.velocity[i]]).numpy(), rtol=0, atol=1e-12)
            np.testing.assert_allclose(float(reward[i]), r, rtol=0, atol=1e-12)
            assert bool(term[i]) == te
            if te:  # keep both on the same state after a success
                e.position[:] = sim.position[i].numpy()
    assert hits > 10  # the walls were hit, so the swept collision test was exercised


def test_torch_running_mean_std_equals_gymnasium() -> None:
    g = np.random.default_rng(0)
    ours, ref = TorchRunningMeanStd((3,), torch.device("cpu")), RunningMeanStd(shape=(3,))
    for n in (1, 5, 1, 64, 2):
        x = g.normal(size=(n, 3)) * 4 + 1
        ours.update(torch.from_numpy(x))
        ref.update(x)
        np.testing.assert_allclose(ours.mean.numpy(), ref.mean, rtol=1e-12)
        np.testing.assert_allclose(ours.var.numpy(), ref.var, rtol=1e-12)
        assert float(ours.count) == pytest.approx(ref.count)


@pytest.mark.parametrize("normalize", [False, True])
def test_autoreset_bootstrapping_and_normalisation_agree_with_gymnasium(normalize: bool) -> None:
    """A scripted run through episode ends by termination (goals) and truncation (50 steps): the
    torch back end returns what the gymnasium back end returns, step for step."""
    n = 6
    kwargs = {"normalize_obs": normalize, "normalize_reward": normalize, "env_kwargs": {"goal_radius": 2.5}}
    gym_env, torch_env = GymVectorEnv(MULTIGOAL, n, **kwargs), make_env(MULTIGOAL, n, backend="torch", **kwargs)
    torch.testing.assert_close(torch_env.reset(seed=0), gym_env.reset(seed=0))
    toward = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.1, 0.0], [0.0, -0.05], [0.3, 0.3]])
    term = trunc = 0
    for t in range(130):
        action = toward * (1.0 if t % 7 else -0.5)
        a, b = gym_env.step(action), torch_env.step(action)
        for field in ("obs", "final_obs", "reward"):
            torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5)
        assert torch.equal(a.terminated, b.terminated) and torch.equal(a.truncated, b.truncated)
        assert a.episode_lengths == b.episode_lengths
        np.testing.assert_allclose(b.episode_returns, a.episode_returns, rtol=1e-9)
        term, trunc = term + int(a.terminated.sum()), trunc + int(a.truncated.sum())
    assert term > 0 and trunc > 0


def _torch_bookkeeping(env) -> None:
    """Switch a CPU env to the torch bookkeeping an accelerator sim uses (same state)."""
    env._cpu = False
    for name in ("obs_rms", "ret_rms"):
        rms = getattr(env, name)
        if rms is not None:
            twin = TorchRunningMeanStd(np.shape(rms.mean), torch.device("cpu"))
            twin.load(rms.state())
            setattr(env, name, twin)
    for name in ("ep_return", "ep_length", "ret_acc"):
        setattr(env, name, torch.from_numpy(np.array(getattr(env, name))))


@pytest.mark.parametrize("reward_scale", [1.0, 0.1])
def test_numpy_bookkeeping_equals_torch_bookkeeping(reward_scale: float) -> None:
    """On CPU the autoreset, episode statistics and normalisers run in numpy; on an accelerator
    in torch. Step for step through terminations and truncations, with both normalisers, the two
    return the same values: bitwise where the maths is element-wise, to rounding where the
    running statistics reduce a batch."""
    kwargs = {"env_kwargs": {"goal_radius": 2.5}, "reward_scale": reward_scale}
    envs = [make_env(MULTIGOAL, 6, backend="torch", **kwargs) for _ in range(2)]
    assert envs[0]._cpu and isinstance(envs[0].obs_rms, NumpyRunningMeanStd)
    _torch_bookkeeping(envs[1])
    first = [e.reset(seed=0) for e in envs]
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)
    toward = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.1, 0.0], [0.0, -0.05], [0.3, 0.3]])
    ends = 0
    for t in range(130):
        a, b = (e.step(toward * (1.0 if t % 7 else -0.5)) for e in envs)
        for field in ("obs", "final_obs", "reward"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-6)
        assert torch.equal(a.terminated, b.terminated) and torch.equal(a.truncated, b.truncated)
        assert a.episode_lengths == b.episode_lengths and a.episode_returns == b.episode_returns
        ends += len(a.episode_lengths)
    assert ends > 6
    sa, sb = (e.state_dict() for e in envs)
    assert sa["meta"] == sb["meta"] and sa["arrays"].keys() == sb["arrays"].keys()
    for key in sa["arrays"]:
        np.testing.assert_allclose(sa["arrays"][key], sb["arrays"][key], rtol=1e-12, err_msg=key)


def test_numpy_running_mean_std_is_gymnasiums() -> None:
    g = np.random.default_rng(0)
    ours, ref = NumpyRunningMeanStd((3,)), RunningMeanStd(shape=(3,))
    for n in (1, 5, 1, 64, 2):
        x = g.normal(size=(n, 3)) * 4 + 1
        ours.update(x)
        ref.update(x)
        np.testing.assert_allclose(ours.mean, ref.mean, rtol=1e-12)
        np.testing.assert_allclose(ours.var, ref.var, rtol=1e-12)
        assert ours.count == pytest.approx(ref.count)
    twin = NumpyRunningMeanStd((3,))
    twin.load(ours.state())
    assert np.array_equal(twin.mean, ours.mean) and np.array_equal(twin.var, ours.var) and twin.count == ours.count


@pytest.mark.parametrize("env_id", [MULTIGOAL, MAZE])
def test_torch_backend_resumes_exactly(env_id: str) -> None:
    env = make_env(env_id, 8, backend="torch", env_kwargs={"init_noise": 0.5} if env_id == MULTIGOAL else None)
    env.reset(seed=3)
    actions = _random_actions(150, 8, 4)
    for a in actions[:70]:
        env.step(a)
    state = env.state_dict()
    rest = [env.step(a) for a in actions[70:]]
    fresh = make_env(env_id, 8, backend="torch", env_kwargs={"init_noise": 0.5} if env_id == MULTIGOAL else None)
    fresh.reset(seed=99)
    fresh.load_state_dict(state)
    for a, want in zip(actions[70:], rest, strict=True):
        got = fresh.step(a)
        for field in ("obs", "final_obs", "reward", "terminated", "truncated"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        assert got.episode_returns == want.episode_returns


def test_trainer_resume_on_the_torch_backend_is_bitwise(tmp_path: Path) -> None:
    def cfg(out: Path) -> object:
        return config_from_dict({
            "env": {"env_id": MAZE, "n_envs": 64}, "policy": "gaussian",
            "ppo": {"n_steps": 16, "n_minibatches": 4, "n_epochs": 2},
            "run": {"total_steps": 4096, "seed": 2, "out": str(out), "save_every": 2048, "eval_episodes": 1, "progress": False},
        })  # fmt: skip

    assert cfg(tmp_path / "x").env.backend == "auto" and resolve_backend(MAZE) == "torch"
    full = train(cfg(tmp_path / "full"))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "4096")
    train(resume=part)
    assert_same_tensors(full / "checkpoints" / "4096" / "policy" / "model.safetensors", part / "checkpoints" / "4096" / "policy" / "model.safetensors")
    assert_same_tensors(full / "checkpoints" / "4096" / "trainer.safetensors", part / "checkpoints" / "4096" / "trainer.safetensors")


def test_bad_backend_input_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EnvError, match="unknown env backend 'gpu'"):
        make_env(MULTIGOAL, 2, backend="gpu")
    with pytest.raises(EnvError, match="no torch-native back end; torch-native ids"):
        make_env("Hopper-v5", 2, backend="torch")
    with pytest.raises(ConfigError, match="invalid env.backend"):
        config_from_dict({"env": {"backend": "mjx"}})
    env = make_env(MULTIGOAL, 2, backend="torch")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action has shape \(3, 2\), expected \(2, 2\)"):
        env.step(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        env.step(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(EnvError, match="cannot create genrl/MultiGoal-v0 with env_kwargs"):
        make_env(MULTIGOAL, 2, backend="torch", env_kwargs={"n_goal": 3})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("envpool", "mujoco_warp") else real(name, *a))
    with pytest.raises(EnvError, match="'envpool' is not installed: pip install envpool"):
        make_env("Hopper-v5", 2, backend="envpool")
    with pytest.raises(ConfigError, match=r"'warp' is not installed: pip install mujoco-warp==3.17.0"):
        config_from_dict({"env": {"backend": "warp"}})


def test_runs_of_earlier_releases_keep_the_gymnasium_backend() -> None:
    from genrl.config import upgrade_config

    assert config_from_dict(upgrade_config({"env": {"env_id": MAZE}})).env.backend == "gymnasium"
    assert gym.spec(MAZE) is not None


FAMILIES = {
    "gaussian": {},
    "pmoe": {"n_experts": 2, "hidden_sizes": [16, 16]},
    "policyflow": {"hidden_sizes": [16, 16], "n_steps": 2},
    "fpo": {"hidden_sizes": [16, 16], "n_steps": 2, "n_mc": 2},
    "diffusion": {"hidden_sizes": [16, 16], "n_denoising_steps": 2},
    "gorl": {"encoder_hidden": [16], "decoder_hidden": [16], "decoder_steps": 2, "decoder_pairs": 2},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_on_many_torch_envs(family: str, tmp_path: Path) -> None:
    """The many-env preset (few large minibatches) on 512 batched PointMaze worlds, GoRL included
    (its refinement env is built on the same back end)."""
    data = {
        "env": {"env_id": MAZE, "n_envs": 512}, "policy": family, "policy_config": FAMILIES[family], "preset": "many-envs",
        "run": {"total_steps": 3 * 512 * 16, "seed": 0, "out": str(tmp_path / family), "eval_episodes": 1, "progress": False},
    }  # fmt: skip
    if family == "gorl":
        data["gorl"] = {"stage_fractions": [0.34, 0.66], "refine_steps": 1024, "decoder_epochs": 1, "decoder_batch_size": 256}
    cfg = config_from_dict(data)
    assert (cfg.env.n_envs, cfg.ppo.n_steps, cfg.ppo.n_minibatches) == (512, 16, 4)
    run = train(cfg)
    rows = (run / "progress.csv").read_text().splitlines()
    assert len(rows) == 4 and "rollout/ep_return" in rows[0]

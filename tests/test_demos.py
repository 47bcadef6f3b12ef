"""Demonstrations: scripted experts, the genrl-demos file, Diffusion Policy windows, `genrl demos`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from genrl.cli import main
from genrl.datasets import ChunkDataset, DatasetError, Normalizer, is_demos_file, load_demos, save_demos, windows
from genrl_envs.experts import record_demos


def tiny() -> dict[str, Any]:
    """Two episodes (rows 0-2 and 3-4); obs [t, -t] and action [100 + t] name their row t."""
    t = np.arange(5, dtype=np.float32)
    return {
        "obs": np.stack([t, -t], axis=1),
        "actions": (100 + t)[:, None],
        "rewards": -t,
        "episode_ends": np.array([3, 5], dtype=np.int64),
        "success": np.array([True, False]),
        "meta": {"env_id": "test/Tiny-v0", "env_kwargs": {"size": 3}, "episodes": [{"route": "left"}, {"route": "right"}]},
    }


def write_raw(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any], fmt: str | None = "genrl-demos", version: str = "1") -> Path:
    header = {k: json.dumps(v) for k, v in meta.items()}
    if fmt is not None:
        header.update(format=fmt, version=version)
    save_file(tensors, str(path), metadata=header)
    return path


def raw_tiny() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    d = tiny()
    tensors = {k: d[k] for k in ("obs", "actions", "rewards", "episode_ends")} | {"success": d["success"].astype(np.uint8)}
    return tensors, {"env_id": "test/Tiny-v0", "obs_dim": 2, "action_dim": 1, "n_episodes": 2}


def test_maze_expert_succeeds_and_takes_both_routes_in_proportion() -> None:
    data = record_demos("genrl/PointMaze-v0", 40, seed=0, expert_options={"p_left": 0.75})
    episodes = data["meta"]["episodes"]
    assert data["success"].sum() >= 39
    assert all(e["route"] == e["route_taken"] for e in episodes)
    left = np.mean([e["route_taken"] == "left" for e in episodes])
    assert 0.55 <= left <= 0.95 and left < 1.0
    assert data["obs"].shape == (data["episode_ends"][-1], 4) and data["actions"].shape == (len(data["obs"]), 2)
    assert np.abs(data["actions"]).max() <= 1.0 and data["obs"].dtype == data["actions"].dtype == np.float32
    np.testing.assert_array_equal(data["lengths"], np.diff(data["episode_ends"], prepend=0))
    again = record_demos("genrl/PointMaze-v0", 40, seed=0, expert_options={"p_left": 0.75})
    np.testing.assert_array_equal(again["obs"], data["obs"])  # episodes replay from the seed
    right = record_demos("genrl/PointMaze-v0", 4, seed=5, expert_options={"p_left": 0.0})
    assert right["success"].all() and {e["route_taken"] for e in right["meta"]["episodes"]} == {"right"}


def test_robotics_pointmaze_expert_plans_both_routes_on_the_mujoco_maze() -> None:
    pytest.importorskip("gymnasium_robotics")
    from genrl_envs import make_env

    data = record_demos("genrl/RoboticsPointMaze-v0", 20, seed=0, expert_options={"p_left": 0.5})
    episodes = data["meta"]["episodes"]
    assert data["success"].all() and (data["lengths"] < 300).all()  # the episode ends at the goal
    assert all(e["route"] == e["route_taken"] for e in episodes) and {e["route"] for e in episodes} == {"left", "right"}
    assert data["obs"].shape[1] == 8 and data["actions"].shape[1] == 2
    env = make_env("genrl/RoboticsPointMaze-v0", 1, normalize_obs=False, normalize_reward=False)  # what BC and PPO train on
    np.testing.assert_array_equal(env.reset(seed=0)[0].numpy(), data["obs"][0])  # the same flattened layout and start
    env.close()
    left = record_demos("genrl/RoboticsPointMaze-v0", 3, seed=1, expert_options={"p_left": 1.0})
    assert {e["route_taken"] for e in left["meta"]["episodes"]} == {"left"}
    umaze = record_demos("PointMaze_UMaze-v3", 2, seed=0, env_kwargs={"continuing_task": False})  # gymnasium-robotics' own map
    assert umaze["success"].all()


def test_cube_oracle_records_successful_pick_and_place() -> None:
    pytest.importorskip("ogbench")
    data = record_demos("cube-single-v0", 2, seed=0)  # OGBench's evaluation tasks 1 and 2
    assert data["success"].all()
    assert [e["task_id"] for e in data["meta"]["episodes"]] == [1, 2]
    assert data["obs"].shape[1] == 28 and data["actions"].shape[1] == 5 and np.abs(data["actions"]).max() <= 1.0
    assert (data["lengths"] < 200).all()
    block_xy = data["obs"][data["episode_ends"] - 1, 19:21] / 10 + [0.425, 0.0]
    np.testing.assert_allclose(block_xy, [[0.425, -0.1], [0.5, 0.0]], atol=0.05)  # the cube ends on the task's goal


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    data = record_demos("genrl/PointMaze-v0", 3, seed=1)
    path = save_demos(tmp_path / "maze.safetensors", data)
    demos = load_demos(path)
    for key in ("obs", "actions", "rewards", "episode_ends", "success"):
        np.testing.assert_array_equal(getattr(demos, key), data[key])
        assert getattr(demos, key).dtype == data[key].dtype
    assert demos.meta == {**data["meta"], "obs_dim": 4, "action_dim": 2, "n_episodes": 3}
    assert demos.episodes == data["meta"]["episodes"] and demos.env_id == "genrl/PointMaze-v0" and demos.env_kwargs == {}
    assert is_demos_file(path) and sorted(p.name for p in tmp_path.iterdir()) == ["maze.safetensors"]  # no temp file left
    sub = demos.select([2, 0])
    np.testing.assert_array_equal(sub.obs, np.concatenate([data["obs"][demos.episode(2)], data["obs"][demos.episode(0)]]))
    assert sub.episodes == [data["meta"]["episodes"][2], data["meta"]["episodes"][0]]
    np.testing.assert_array_equal(sub.lengths, demos.lengths[[2, 0]])


def _bad(kind: str, path: Path) -> Path:
    tensors, meta = raw_tiny()
    if kind == "missing":
        return path
    if kind == "not safetensors":
        path.write_bytes(b"this is not a safetensors file at all")
        return path
    if kind == "foreign":
        return write_raw(path, tensors, meta, fmt=None)
    if kind == "other format":
        return write_raw(path, tensors, meta, fmt="robomimic")
    if kind == "version":
        return write_raw(path, tensors, meta, version="2")
    if kind == "lengths differ":
        tensors["actions"] = tensors["actions"][:4]
    elif kind == "ends not increasing":
        tensors["episode_ends"] = np.array([3, 3, 5], dtype=np.int64)
        tensors["success"] = np.array([1, 1, 0], dtype=np.uint8)
        meta["n_episodes"] = 3
    elif kind == "ends short":
        tensors["episode_ends"] = np.array([3, 4], dtype=np.int64)
    elif kind == "obs_dim":
        meta["obs_dim"] = 3
    elif kind == "nan":
        tensors["actions"][2, 0] = np.nan
    elif kind == "inf":
        tensors["obs"][4, 1] = np.inf
    elif kind == "no env_id":
        del meta["env_id"]
    return write_raw(path, tensors, meta)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "not found"),
        ("not safetensors", "not a readable safetensors file"),
        ("foreign", "not a genrl demos file"),
        ("other format", "not a genrl demos file"),
        ("version", "version '2'"),
        ("lengths differ", "same number of rows"),
        ("ends not increasing", "strictly increasing"),
        ("ends short", "ends at 4 but there are 5 steps"),
        ("obs_dim", "obs_dim is 3 but the tensors give 2"),
        ("nan", "actions holds NaN/inf values \\(first at row 2\\)"),
        ("inf", "obs holds NaN/inf values \\(first at row 4\\)"),
        ("no env_id", "metadata lacks env_id"),
    ],
)
def test_malformed_files_give_one_line_errors(tmp_path: Path, kind: str, message: str) -> None:
    path = _bad(kind, tmp_path / "bad.safetensors")
    with pytest.raises(DatasetError, match=message) as err:
        load_demos(path)
    assert "\n" not in str(err.value)


def test_save_refuses_bad_data_and_writes_nothing(tmp_path: Path) -> None:
    data = tiny()
    data["obs"] = data["obs"].copy()
    data["obs"][1, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        save_demos(tmp_path / "x.safetensors", data)
    assert list(tmp_path.iterdir()) == []


def test_windows_pad_at_episode_edges_and_never_mix_episodes(tmp_path: Path) -> None:
    demos = load_demos(save_demos(tmp_path / "tiny.safetensors", tiny()))
    obs_i, act_i = windows(demos, n_obs_steps=3, horizon=4)
    np.testing.assert_array_equal(obs_i, [[0, 0, 0], [0, 0, 1], [0, 1, 2], [3, 3, 3], [3, 3, 4]])
    np.testing.assert_array_equal(act_i, [[0, 1, 2, 2], [1, 2, 2, 2], [2, 2, 2, 2], [3, 4, 4, 4], [4, 4, 4, 4]])
    ds = ChunkDataset(demos, n_obs_steps=3, horizon=4)
    assert len(ds) == 5 and (ds.obs_dim, ds.action_dim) == (6, 4)
    obs, actions = ds[1]
    assert obs.tolist() == [0, 0, 0, 0, 1, -1] and actions.tolist() == [101, 102, 102, 102]  # oldest first, time-major
    obs, actions = ds[3]
    assert obs.tolist() == [3, -3, 3, -3, 3, -3] and actions.tolist() == [103, 104, 104, 104]

    gen = torch.Generator().manual_seed(0)
    obs, actions = ds.sample(256, gen)
    assert obs.shape == (256, 6) and actions.shape == (256, 4)
    rows = obs[:, -2].long()  # the newest observation names the step
    assert set(rows.tolist()) == {0, 1, 2, 3, 4}
    episode = (rows >= 3).long()
    assert ((obs[:, 0::2].long() >= 3).long() == episode[:, None]).all()  # whole history in the same episode
    assert (((actions.long() - 100) >= 3).long() == episode[:, None]).all()  # whole chunk too
    expect_obs, expect_act = ds.get(rows)
    assert torch.equal(obs, expect_obs) and torch.equal(actions, expect_act)
    again = ds.sample(256, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], obs) and torch.equal(again[1], actions)


def test_normalizer_limits_and_windows() -> None:
    x = torch.tensor([[0.0, 5.0, 1.0], [2.0, 7.0, 1.0], [1.0, 6.0, 1.0]])
    norm = Normalizer.fit(x, "limits")
    y = norm.normalize(x)
    assert torch.allclose(y[:, :2].min(0).values, torch.tensor([-1.0, -1.0])) and torch.allclose(y[:, :2].max(0).values, torch.tensor([1.0, 1.0]))
    assert torch.equal(y[:, 2], torch.zeros(3))  # a constant column is only shifted
    window = x[[0, 1]].reshape(1, 6)  # two steps flattened
    assert torch.allclose(norm.normalize(window), y[[0, 1]].reshape(1, 6))
    assert torch.allclose(norm.unnormalize(norm.normalize(window)), window)
    gauss = Normalizer(**Normalizer.fit(x, "gaussian").state_dict())
    assert torch.allclose(gauss.normalize(x)[:, :2].mean(0), torch.zeros(2), atol=1e-6)


def test_cli_demos_writes_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "maze.safetensors"
    argv = ["demos", "--env", "genrl/PointMaze-v0", "--episodes", "6", "--out", str(out), "--seed", "3", "--set", "expert.p_left=0.5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "6 episodes" in printed and "success 6/6" in printed and "routes taken: left" in printed
    demos = load_demos(out)
    assert demos.n_episodes == 6 and demos.meta["seed"] == 3 and demos.meta["expert"]["p_left"] == 0.5

    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("exists; pass --force to overwrite it")
    assert main([*argv[:4], "2", *argv[5:], "--force"]) == 0 and load_demos(out).n_episodes == 2

    foreign = tmp_path / "notes.txt"
    foreign.write_text("keep me")
    assert main(["demos", "--env", "genrl/PointMaze-v0", "--episodes", "1", "--out", str(foreign), "--force"]) == 2
    assert "not a genrl demos file" in capsys.readouterr().err and foreign.read_text() == "keep me"

    assert main(["demos", "--env", "Hopper-v5", "--episodes", "1", "--out", str(tmp_path / "h.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "supported: genrl/PointMaze-v0" in err and "cube-single-v0" in err

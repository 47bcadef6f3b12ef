"""Checkpoints: bitwise-exact resume, folder layout, refusal of pickles and corrupt files,
run-folder protection and the non-finite-loss guard.

All runs are tiny (a few thousand steps, n_steps 256) and go through ``genrl.cli.main`` in
process or ``genrl.trainer.train``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import uuid
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from compare import assert_same_nested, assert_same_tensors
from safetensors.torch import load_file

from genrl import cli
from genrl.checkpoint import checkpoint_steps, latest_checkpoint, load_checkpoint
from genrl.config import config_from_dict
from genrl.errors import CheckpointError, NonFiniteLossError
from genrl.logger import read_csv
from genrl.trainer import train
from genrl_policies.base import load_pretrained

CKPT_FILES = (
    "policy/config.json",
    "policy/model.safetensors",
    "trainer.safetensors",
    "optimizer.pt",
    "env.safetensors",
    "state.json",
)
TINY = [
    "--set", "ppo.n_steps=256",
    "--set", "ppo.n_minibatches=4",
    "--set", "ppo.n_epochs=2",
    "--eval-episodes", "2",
    "--no-progress",
]  # fmt: skip


def cli_train(out: Path, *, env: str = "InvertedPendulum-v5", steps: int = 2048, seed: int = 0, extra: list[str] = ()) -> int:
    argv = ["train", "--env", env, "--policy", "gaussian", "--algo", "ppo", "--steps", str(steps), "--seed", str(seed), "--out", str(out)]
    return cli.main([*argv, *TINY, *extra])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single stderr line the CLI prints for an input error."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("genrl: error:"), lines[0]
    return lines[0]


def same_column(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# a finished run shared by the read-only and copy-then-mutate tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InvertedPendulum, 2048 steps, a checkpoint every 512 steps."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert cli_train(out, steps=2048, extra=["--save-every", "512"]) == 0
    return out


def copy_checkpoint(base_run: Path, tmp_path: Path, step: int = 2048) -> Path:
    dst = tmp_path / str(step)
    shutil.copytree(base_run / "checkpoints" / str(step), dst)
    return dst


# ----------------------------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env_id", "n_envs"),
    [("InvertedPendulum-v5", 1), ("Pendulum-v1", 1), ("InvertedPendulum-v5", 2)],
    ids=["mujoco", "classic-control", "mujoco-2envs"],
)
def test_resume_is_bitwise_exact(tmp_path: Path, env_id: str, n_envs: int) -> None:
    full = tmp_path / "full"
    extra = ["--save-every", "1024", "--n-envs", str(n_envs)]
    assert cli_train(full, env=env_id, steps=2048, extra=extra) == 0
    assert checkpoint_steps(full) == [1024, 2048]

    # an "interrupted" copy: the final checkpoint never got written
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "2048")
    assert latest_checkpoint(part).name == "1024"
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 0
    assert checkpoint_steps(part) == [1024, 2048]

    a, b = full / "checkpoints" / "2048", part / "checkpoints" / "2048"
    for name in ("policy/model.safetensors", "trainer.safetensors", "env.safetensors"):
        assert_same_tensors(a / name, b / name)
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert_same_nested(ca["optimizer"], cb["optimizer"], "optimizer")
    assert ca["state"] == cb["state"]  # counters, numpy RNG, sub-env RNGs and time-limit counters
    assert ca["env"]["meta"] == cb["env"]["meta"]

    # the resumed log reads as the uninterrupted one (timing columns aside)
    pa, pb = read_csv(full / "progress.csv"), read_csv(part / "progress.csv")
    assert pa["step"] == pb["step"] == [256.0 * n_envs * (i + 1) for i in range(2048 // (256 * n_envs))]
    assert same_column(pa["rollout/ep_return"], pb["rollout/ep_return"])
    assert pa.keys() == pb.keys()
    for key in pa:
        if not key.startswith("time/"):
            assert same_column(pa[key], pb[key]), key


@pytest.mark.parametrize("policy", ["pmoe", "policyflow", "fpo", "diffusion"])
def test_resume_is_bitwise_exact_for_every_family(tmp_path: Path, policy: str) -> None:
    """Families that draw fresh randomness in the loss (PMOE's mixing samples, PolicyFlow's t,
    the global RNG) or keep frozen copies (PolicyFlow's old velocity) resume exactly too."""
    full = tmp_path / "full"
    extra = ["--policy", policy, "--save-every", "512", "--set", "policy_config.hidden_sizes=[16, 16]"]
    assert cli_train(full, steps=1024, extra=extra) == 0
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "1024")
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 0
    a, b = full / "checkpoints" / "1024", part / "checkpoints" / "1024"
    for name in ("policy/model.safetensors", "trainer.safetensors", "env.safetensors"):
        assert_same_tensors(a / name, b / name)
    pa, pb = read_csv(full / "progress.csv"), read_csv(part / "progress.csv")
    for key in pa:
        if not key.startswith("time/"):
            assert same_column(pa[key], pb[key]), key


def test_resume_really_restores_state(base_run: Path, tmp_path: Path) -> None:
    """Control for the exactness test: a resume from a *different* step's state diverges.

    Here the 1536 checkpoint's trainer state is swapped for the 1024 one's before resuming:
    if restore were a no-op (everything re-derived from the seed) the results would agree.
    """
    part = tmp_path / "part"
    shutil.copytree(base_run, part)
    shutil.rmtree(part / "checkpoints" / "2048")
    shutil.copy(part / "checkpoints" / "1024" / "policy" / "model.safetensors", part / "checkpoints" / "1536" / "policy" / "model.safetensors")
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 0
    a = load_file(str(base_run / "checkpoints" / "2048" / "policy" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "2048" / "policy" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------
def test_checkpoint_layout(base_run: Path) -> None:
    root = base_run / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(["512", "1024", "1536", "2048"]), names  # no .tmp-*/.old-* leftovers
    assert not [p for p in base_run.rglob(".tmp-*")]
    assert checkpoint_steps(base_run) == [512, 1024, 1536, 2048]
    assert latest_checkpoint(base_run) == root / "2048"
    for step in (512, 1024, 1536, 2048):
        folder = root / str(step)
        for f in CKPT_FILES:
            assert (folder / f).is_file(), f"{folder}/{f}"
        data = load_checkpoint(folder)
        assert data["state"]["global_step"] == step
        assert data["state"]["family"] == "gaussian" and data["state"]["algo"] == "ppo"
        assert load_pretrained(folder / "policy").family == "gaussian"


def test_latest_checkpoint_ignores_incomplete_and_foreign_folders(base_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "checkpoints" / ".tmp-4096-123").mkdir()  # an interrupted write
    (run / "checkpoints" / "notes").mkdir()
    (run / "checkpoints" / "9999").write_text("a file, not a checkpoint folder")
    assert checkpoint_steps(run) == [512, 1024, 1536, 2048]
    assert latest_checkpoint(run).name == "2048"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        latest_checkpoint(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# refusal of pickles and corrupt files
# ----------------------------------------------------------------------------------------------
def _touch(path: str) -> str:
    """Runs only if a pickle is unpickled with globals allowed."""
    Path(path).write_text("payload executed")
    return "payload"


class Payload:
    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (_touch, (str(self.flag),))


def test_pickled_payload_in_optimizer_is_refused(base_run: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(base_run, tmp_path)
    flag = tmp_path / "flag.txt"
    torch.save({"x": Payload(flag)}, ckpt / "optimizer.pt")
    assert not flag.exists()
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        load_checkpoint(ckpt)
    assert not flag.exists(), "the pickled payload was executed"
    # control: the payload is live (a plain torch.load would run it)
    torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert flag.read_text() == "payload executed"


def _corrupt_state_json(ckpt: Path) -> None:
    (ckpt / "state.json").write_text('{"global_step": 20')


def _truncate_trainer(ckpt: Path) -> None:
    data = (ckpt / "trainer.safetensors").read_bytes()
    (ckpt / "trainer.safetensors").write_bytes(data[: len(data) // 2])


def _remove_env_file(ckpt: Path) -> None:
    (ckpt / "env.safetensors").unlink()


def _foreign_format(ckpt: Path) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    state["format_version"] = 99
    (ckpt / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (_corrupt_state_json, r"corrupt .*state\.json"),
        (_truncate_trainer, r"corrupt .*trainer\.safetensors"),
        (_remove_env_file, r"missing env\.safetensors"),
        (_foreign_format, r"format 99.*reads 1"),
    ],
    ids=["corrupt-state-json", "truncated-trainer", "missing-file", "foreign-format"],
)
def test_damaged_checkpoint_is_refused(base_run: Path, tmp_path: Path, mutate, pattern: str) -> None:
    ckpt = copy_checkpoint(base_run, tmp_path)
    load_checkpoint(ckpt)  # intact before the damage
    mutate(ckpt)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(ckpt)


def test_resume_falls_back_past_a_damaged_newest_checkpoint(base_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    shutil.rmtree(run / "checkpoints" / "2048")
    _truncate_trainer(run / "checkpoints" / "1536")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"skipped an unreadable checkpoint: corrupt .*1536/trainer\.safetensors", out)
    assert "newest good checkpoint, step 1024" in out
    for name in ("trainer.safetensors", "policy/model.safetensors", "env.safetensors"):  # still the same run
        assert_same_tensors(base_run / "checkpoints" / "2048" / name, run / "checkpoints" / "2048" / name)


def test_resume_with_every_checkpoint_damaged_exits_2(base_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    for step in checkpoint_steps(run):
        _truncate_trainer(run / "checkpoints" / str(step))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert re.search(r"no readable checkpoint.*corrupt .*trainer\.safetensors", error_line(capsys))


# ----------------------------------------------------------------------------------------------
# resume / new-run protection
# ----------------------------------------------------------------------------------------------
def test_resume_without_checkpoint_exits_2(base_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(base_run / "config.json", run / "config.json")
    assert cli.main(["train", "--resume", str(run)]) == 2
    assert "no checkpoint" in error_line(capsys)
    assert cli.main(["train", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "not a genrl run" in error_line(capsys)


def run_with_edited_state(base_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the base run without its last checkpoint, with ``edit(state)`` applied to the
    state.json of the newest remaining one (1536)."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    shutil.rmtree(run / "checkpoints" / "2048")
    path = run / "checkpoints" / "1536" / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    return run


def test_resume_rejects_foreign_family(base_run: Path, tmp_path: Path) -> None:
    def to_pmoe(state: dict) -> None:
        assert state["family"] == "gaussian"
        state["family"] = "pmoe"

    run = run_with_edited_state(base_run, tmp_path, to_pmoe)
    assert json.loads((run / "config.json").read_text())["policy"] == "gaussian"
    with pytest.raises(CheckpointError, match=r"pmoe/ppo run, the config says gaussian/ppo"):
        from genrl.trainer import build, restore_state
        from genrl.trainer import load_run_config as load_cfg

        cfg = load_cfg(run)
        restore_state(build(cfg), cfg, run / "checkpoints" / "1536")
    # resuming the run skips that checkpoint and continues from the newest good one
    train(resume=run)
    assert checkpoint_steps(run)[-1] == 2048
    for name in ("trainer.safetensors", "policy/model.safetensors"):
        assert_same_tensors(base_run / "checkpoints" / "2048" / name, run / "checkpoints" / "2048" / name)


def test_new_run_into_existing_run_folder_is_refused(base_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = tree_bytes(run)
    capsys.readouterr()
    assert cli_train(run, steps=512, seed=5) == 2
    line = error_line(capsys)
    assert "already holds a run" in line and "--resume" in line
    assert tree_bytes(run) == before


# ----------------------------------------------------------------------------------------------
# non-finite loss guard
# ----------------------------------------------------------------------------------------------
class NaNRewardEnv(gym.Env):
    """Box obs (3,), Box action (1,); the reward is NaN from the ``nan_after``-th step of this
    instance on (counted across episodes, so resets do not clear it)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, nan_after: int = 300) -> None:
        self.nan_after = nan_after
        self.t = 0
        self.x = np.zeros(3, dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.uniform(-0.1, 0.1, 3).astype(np.float32)
        return self.x.copy(), {}

    def step(self, action):
        self.t += 1
        a = float(np.asarray(action).reshape(-1)[0])
        reward = math.nan if self.t > self.nan_after else -a * a - float(np.square(self.x).sum())
        self.x = np.clip(self.x + 0.05 * a + 0.01 * self.np_random.standard_normal(3), -1, 1).astype(np.float32)
        return self.x.copy(), reward, False, False, {}


@pytest.fixture
def nan_env_id() -> str:
    # The NaN reward reaches the loss even with reward normalisation on: the normaliser's
    # running return statistics become NaN, so the scaled reward is NaN, torch.clamp keeps NaN
    # (clip_reward does not remove it), GAE turns it into NaN advantages and returns, and the
    # value and policy losses are NaN -> PPO.ppo_loss raises NonFiniteLossError.
    env_id = f"GenrlTestNaN{uuid.uuid4().hex[:8]}-v0"
    gym.register(id=env_id, entry_point=NaNRewardEnv, max_episode_steps=50, kwargs={"nan_after": 300})
    yield env_id
    gym.registry.pop(env_id, None)


def test_nonfinite_loss_stops_training_api(nan_env_id: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config_from_dict(
        {
            "env": {"env_id": nan_env_id},
            "ppo": {"n_steps": 256, "n_minibatches": 4, "n_epochs": 2},
            "run": {"total_steps": 1024, "seed": 0, "out": str(out), "save_every": 256, "eval_episodes": 2, "progress": False},
        }
    )
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    msg = str(info.value)
    assert "non-finite loss at step 512" in msg and "last good checkpoint: step 256" in msg
    # NaNs start at env step 301, in the second rollout: only the first checkpoint exists
    assert checkpoint_steps(out) == [256]
    data = load_checkpoint(out / "checkpoints" / "256")
    assert data["state"]["global_step"] == 256
    assert all(torch.isfinite(v).all() for v in data["trainer"].values())
    policy = load_pretrained(out / "checkpoints" / "256" / "policy")
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def test_nonfinite_loss_stops_training_cli(nan_env_id: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    code = cli_train(out, env=nan_env_id, steps=1024, extra=["--save-every", "256"])
    assert code == 2
    line = error_line(capsys)
    assert "non-finite" in line and "last good checkpoint: step 256" in line
    assert checkpoint_steps(out) == [256]
    load_checkpoint(out / "checkpoints" / "256")


def test_format_1_checkpoints_still_resume_bitwise(base_run: Path, tmp_path: Path) -> None:
    """Checkpoints of the first format (PPO's keys at the top level of state.json) are converted."""

    def to_format_1(state: dict) -> None:
        algo_state = state.pop("algo_state")
        state.pop("tensor_groups")
        state.update(format_version=1, global_step=algo_state["global_step"], iteration=algo_state["iteration"])

    run = run_with_edited_state(base_run, tmp_path, to_format_1)
    train(resume=run)
    for name in ("trainer.safetensors", "policy/model.safetensors", "env.safetensors"):
        assert_same_tensors(base_run / "checkpoints" / "2048" / name, run / "checkpoints" / "2048" / name)

"""Mistakes a new user makes (../design newcomer report): each gets one line and loses nothing,
and the options a new user looks for are discoverable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genrl import cli

TINY = ["--set", "ppo.n_steps=128", "--set", "ppo.n_minibatches=2", "--set", "ppo.n_epochs=1", "--eval-episodes", "1", "--no-progress"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genrl: error:"), lines
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--env", "Hopper-v3"], "cannot create Hopper-v3"),
        (["train", "--env", "LunarLanderContinuous-v3"], "cannot create LunarLanderContinuous-v3"),
        (["train", "--env", "Pendulum-v1", "--seed", "-1"], "run.seed"),
        (["train", "--env", "t2i", "--reward", "digit:1,jpeg_compressibility:0.1"], "weights are written digit=1"),
        (["train", "--env", "nosuchmodule_xyz:Thing-v0"], "cannot import 'nosuchmodule_xyz'"),
        (["train", "--env", "Pendulum-v1", "--set", "env.env_kwargs=3"], "env.env_kwargs must be a table"),
        (["train", "--env", "Pendulum-v1", "--set", "env.env_kwargs={bogus_kw = 1}"], "cannot create Pendulum-v1 with env_kwargs"),
    ],
    ids=["removed-v3-id", "missing-extra", "negative-seed", "colon-weights", "bad-module", "kwargs-type", "bad-kwarg"],
)
def test_mistakes_get_one_line_and_write_nothing(argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main([*argv, "--out", str(out), *([] if "t2i" in argv else TINY)]) == 2
    assert expected in one_error_line(capsys)
    assert not out.exists()


def test_reward_and_prompts_are_checked_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import genrl_envs.t2i as t2i
    from genrl_envs.rewards import RewardError

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the pipeline was loaded before the inputs were checked")

    monkeypatch.setattr(t2i, "load_pipeline", no_load)
    with pytest.raises(RewardError):
        t2i.TextToImageEnv("digits", rewards="nope")
    with pytest.raises(t2i.EnvError, match="prompts file"):
        t2i.TextToImageEnv("digits", prompts=str(tmp_path / "missing.txt"))


def test_diverging_training_stops_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "--env", "Pendulum-v1", "--policy", "diffusion", "--steps", "512", "--out", str(out), *TINY,
            "--set", "ppo.learning_rate=1e9", "--set", "ppo.anneal_lr=false", "--set", "policy_config.hidden_sizes=[16]",
            "--set", "policy_config.n_denoising_steps=2", "--save-every", "128"]  # fmt: skip
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert "training diverged" in line and "lower the learning rate" in line


def test_pickled_optimizer_message_does_not_advise_unpickling(tmp_path: Path) -> None:
    from genrl.checkpoint import read_optimizer
    from genrl.errors import CheckpointError

    path = tmp_path / "optimizer.pt"
    torch.save({"state": {}, "evil": Path("x")}, path)  # a pickled global: refused by weights_only
    with pytest.raises(CheckpointError) as info:
        read_optimizer(path)
    assert "weights_only=False" not in str(info.value) and "never unpickles" in str(info.value)


def test_custom_env_module_and_env_kwargs_train_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_envs.py").write_text(
        "import gymnasium as gym\n"
        "gym.register('MyPendulum-v0', entry_point='gymnasium.envs.classic_control.pendulum:PendulumEnv', max_episode_steps=50)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    argv = ["train", "--env", "my_envs:MyPendulum-v0", "--steps", "128", "--out", str(out), *TINY, "--set", "env.env_kwargs={g = 5.0}"]
    assert cli.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["env"]["env_kwargs"] == {"g": 5.0}
    assert cfg["policy_config"]["hidden_sizes"] == [64, 64]  # the resolved family config, not only overrides
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--episodes", "1"]) == 0
    assert "my_envs:MyPendulum-v0 gaussian" in capsys.readouterr().out


def test_version_config_listing_and_batch_log_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import genrl

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"genrl {genrl.__version__}"
    assert cli.main(["config", "--policy", "fpo"]) == 0
    listing = capsys.readouterr().out
    for key in ("ppo.learning_rate: float = 0.0003", "policy_config.n_mc: int = 8", "run.keep_checkpoints: int = 5", "env.env_kwargs"):
        assert key in listing
    assert cli.main(["config", "--algo", "g2rpo"]) == 0
    assert "grpo.continuation: str = 'official'" in capsys.readouterr().out
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    assert "default 1,000,000" in help_text and "default 1)" in help_text
    assert cli.main(["train", "--env", "Pendulum-v1", "--steps", "256", "--out", str(tmp_path / "r"), *TINY]) == 0
    out = capsys.readouterr().out  # not a terminal: one line per iteration, seeds and the TensorBoard hint
    assert "step 128/256" in out and "step 256/256" in out and "seed 1" in out and "tensorboard --logdir" in out


def test_grouped_plot_of_seeds(tmp_path: Path) -> None:
    from genrl.plot import group_name

    assert group_name("Hopper-v5__gaussian__3__20261201-101500") == "Hopper-v5__gaussian"
    assert group_name("hopper-s2") == "hopper" and group_name("hopper_seed12") == "hopper"
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"pend-s{seed}"
        assert cli.main(["train", "--env", "Pendulum-v1", "--steps", "256", "--seed", str(seed), "--out", str(run), *TINY]) == 0
        runs.append(str(run))
    png = tmp_path / "group.png"
    assert cli.main(["plot", *runs, "--group", "-o", str(png)]) == 0 and png.stat().st_size > 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["plot", *runs, "-o", str(afile / "x.png")]) == 2  # an unwritable place: one line, no traceback


def test_wandb_logging_offline(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="the optional wandb extra is not installed")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "genrl.cli", "train", "--env", "Pendulum-v1", "--steps", "128", "--out", str(out), *TINY, "--wandb"]
    subprocess.run(cmd, env=env, check=True, timeout=300, capture_output=True)
    assert (out / "wandb_id").is_file() and any((out / "wandb").glob("offline-run-*"))

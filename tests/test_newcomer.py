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
        "import gymnasium as gym\ngym.register('MyPendulum-v0', entry_point='gymnasium.envs.classic_control.pendulum:PendulumEnv', max_episode_steps=50)\n"
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


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("ppo.target_kl=abc", "ppo.target_kl must be a number, got 'abc'"),
        ("policy_config.hidden_sizes=64", "policy_config.hidden_sizes must be a list, got 64"),
        ("policy_config.n_experts=abc", "policy_config.n_experts must be an integer, got 'abc'"),
    ],
)
def test_type_errors_name_the_field(setting: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--env", "Pendulum-v1", "--policy", "pmoe", "--out", str(tmp_path / "r"), "--set", setting]
    assert cli.main(argv) == 2
    assert expected in one_error_line(capsys)


def test_dates_and_numbers_are_names_where_names_are_expected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genrl.cli import _parse_value
    from genrl.config import config_from_dict

    assert config_from_dict({"run": {"out": _parse_value("2024-06-01")}}).run.out == "2024-06-01"
    assert config_from_dict({"run": {"out": _parse_value("123")}}).run.out == "123"
    with pytest.raises(ValueError, match="grpo.guidance_scale must be a number, got 'high'"):
        config_from_dict({"env": "t2i", "grpo": {"guidance_scale": "high"}})


def test_binary_prompts_file_is_named(tmp_path: Path) -> None:
    from genrl_envs.t2i import EnvError, read_prompts

    bad = tmp_path / "p.txt"
    bad.write_bytes(b"\xd1\xff\xfe")
    with pytest.raises(EnvError, match="not UTF-8 text"):
        read_prompts(str(bad))


def test_resume_edge_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    base = ["train", "--env", "Pendulum-v1", "--steps", "256", "--out", str(run), *TINY]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0  # a finished run: says so, changes nothing
    assert "already complete at step 256" in capsys.readouterr().out
    cfg_path = run / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ppo"]["learning_rate"] = 0.1  # hand-edited
    cfg_path.write_text(json.dumps(cfg))
    assert cli.main(["train", "--resume", str(run), "--steps", "512"]) == 2
    assert "ppo.learning_rate: 0.0003 -> 0.1" in one_error_line(capsys)
    cfg["ppo"]["learning_rate"] = 0.0003
    cfg_path.write_text(json.dumps(cfg))
    (run / "progress.csv").write_bytes(b"\xff\xfe garbage")
    assert cli.main(["train", "--resume", str(run), "--steps", "512"]) == 2
    assert "corrupt" in one_error_line(capsys) and "progress.csv" in capsys.readouterr().err + "progress.csv"


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["train", "--env", "Pendulum-v1", "--steps", "256", "--out", str(run), *TINY, "--save-every", "0",
            "--set", "ppo.learning_rate=1e9", "--set", "ppo.anneal_lr=false"]  # fmt: skip
    assert cli.main(argv) == 2  # diverges before any checkpoint
    assert (run / "progress.csv").exists() or (run / "config.json").exists()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 2
    assert f"start it again with --out {run}" in one_error_line(capsys)
    sane = [a if a != "ppo.learning_rate=1e9" else "ppo.learning_rate=3e-4" for a in argv]
    assert cli.main(sane) == 0  # the same --out again: no dead end
    assert "starting it again" in capsys.readouterr().out


def test_plot_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli.main(["train", "--env", "Pendulum-v1", "--steps", "128", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert cli.main(["plot", str(run), "-o", str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png") and (tmp_path / "curves.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "progress.csv").write_text("step,rollout/ep_return\n")
    assert cli.main(["plot", str(empty), "-o", str(tmp_path / "e.png")]) == 2
    assert "no logged rows" in one_error_line(capsys)
    image = tmp_path / "image"
    image.mkdir()
    (image / "progress.csv").write_text("step,reward/total\n32,0.5\n")
    assert cli.main(["plot", str(run), str(image), "-o", str(tmp_path / "m.png")]) == 2
    assert "one axes" in one_error_line(capsys)


def test_policy_keys_fail_at_parse_time_and_old_image_configs_load(tmp_path: Path) -> None:
    from genrl.config import config_from_dict
    from genrl.errors import ConfigError
    from genrl.runs import load_run_config

    with pytest.raises(ConfigError, match=r"unknown PMOEConfig keys \['n_expert'\].*n_experts"):
        config_from_dict({"policy": "pmoe", "policy_config": {"n_expert": 5}})
    old = config_from_dict({"env": "t2i"}).to_dict()  # a config.json of the first release's spelling
    g = old["grpo"]
    g["num_steps"], g["clip_range"], g["epochs"], g["eval_num_steps"] = g.pop("n_steps"), g.pop("clip_coef"), g.pop("n_epochs"), g.pop("eval_n_steps")
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = load_run_config(tmp_path)
    assert cfg.grpo.n_steps == 10 and cfg.grpo.clip_coef == 1e-4 and cfg.grpo.n_epochs == 1
    with pytest.raises(ConfigError, match="did you mean 'n_steps'"):
        config_from_dict({"env": "t2i", "grpo": {"num_steps": 4}})  # new configs use the one spelling

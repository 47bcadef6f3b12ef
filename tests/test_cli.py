"""The ``genrl train | eval | plot`` command line: outputs, config files, input errors, the
console script, and seed reproducibility.

Everything but one test calls ``genrl.cli.main(argv)`` in process (it returns the exit code);
``test_console_script`` runs the installed ``genrl`` entry point in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genrl import cli
from genrl.checkpoint import checkpoint_steps, load_checkpoint
from genrl.logger import read_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--set", "ppo.n_steps=256",
    "--set", "ppo.n_minibatches=4",
    "--set", "ppo.n_epochs=2",
    "--eval-episodes", "2",
    "--no-progress",
]  # fmt: skip
REQUIRED_COLUMNS = (
    "step",
    "rollout/ep_return",
    "train/approx_kl",
    "train/clip_fraction",
    "train/explained_variance",
    "time/sps",
    "eval/return_mean",
)


def train_argv(out: Path, *, policy: str = "gaussian", steps: int = 512, seed: int = 0, env: str = "InvertedPendulum-v5") -> list[str]:
    return ["train", "--env", env, "--policy", policy, "--algo", "ppo", "--steps", str(steps), "--seed", str(seed), "--out", str(out), *TINY]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's single stderr line for an input error."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("genrl: error:"), lines[0]
    return lines[0]


def policy_weights(run: Path, step: int = 512) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / str(step) / "policy" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished tiny gaussian runs: two with seed 0 (reproducibility) and one with seed 1."""
    root = tmp_path_factory.mktemp("cli-runs")
    out = {"seed0": root / "seed0", "seed0-again": root / "seed0-again", "seed1": root / "seed1"}
    for name, seed in (("seed0", 0), ("seed0-again", 0), ("seed1", 1)):
        assert cli.main(train_argv(out[name], seed=seed)) == 0
    return out


# ----------------------------------------------------------------------------------------------
# train outputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["gaussian", "pmoe"])
def test_train_writes_run_folder(tmp_path: Path, policy: str, capsys) -> None:
    out = tmp_path / "run"
    assert cli.main(train_argv(out, policy=policy, steps=512)) == 0
    assert str(out) in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    assert config["policy"] == policy and config["algo"] == "ppo"
    assert config["env"]["env_id"] == "InvertedPendulum-v5"
    assert config["run"]["total_steps"] == 512 and config["run"]["seed"] == 0
    assert config["ppo"]["n_steps"] == 256 and config["ppo"]["n_epochs"] == 2

    header = (out / "progress.csv").read_text().splitlines()[0].split(",")
    for col in REQUIRED_COLUMNS:
        assert col in header, col
    cols = read_csv(out / "progress.csv")
    assert cols["step"] == [256.0, 512.0]
    assert math.isfinite(cols["eval/return_mean"][-1]) and cols["eval/return_mean"][-1] > 0
    assert all(math.isfinite(v) and v > 0 for v in cols["time/sps"])
    assert all(math.isfinite(v) for v in cols["train/approx_kl"])

    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    assert checkpoint_steps(out) == [256, 512]  # periodic by default: a tenth of the run, at least one iteration
    data = load_checkpoint(out / "checkpoints" / "512")
    assert data["state"]["family"] == policy
    assert json.loads((out / "checkpoints" / "512" / "policy" / "config.json").read_text())["family"] == policy

    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------------------------
# config files
# ----------------------------------------------------------------------------------------------
TOML = """\
policy = "gaussian"
algo = "ppo"

[env]
env_id = "InvertedPendulum-v5"

[ppo]
n_steps = 256
n_minibatches = 4
n_epochs = 2

[run]
total_steps = 256
seed = 3
eval_episodes = 2
progress = false
"""

YAML = """\
policy: gaussian
algo: ppo
env:
  env_id: InvertedPendulum-v5
ppo:
  n_steps: 256
  n_minibatches: 4
  n_epochs: 2
run:
  total_steps: 256
  seed: 3
  eval_episodes: 2
  progress: false
"""


def _config_without_out(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    del config["run"]["out"]
    return config


def test_config_files_match_flags(tmp_path: Path) -> None:
    flags = ["train", "--env", "InvertedPendulum-v5", "--policy", "gaussian", "--algo", "ppo", "--steps", "256", "--seed", "3", *TINY]
    assert cli.main([*flags, "--out", str(tmp_path / "flags")]) == 0
    (tmp_path / "c.toml").write_text(TOML)
    (tmp_path / "c.yaml").write_text(YAML)
    assert cli.main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "toml")]) == 0
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "yaml")]) == 0

    want = _config_without_out(tmp_path / "flags")
    assert want["run"]["seed"] == 3 and want["run"]["progress"] is False
    assert _config_without_out(tmp_path / "toml") == want
    assert _config_without_out(tmp_path / "yaml") == want
    # same config, same seed: same weights whichever way the config came in
    w = policy_weights(tmp_path / "flags", 256)
    for name in ("toml", "yaml"):
        other = policy_weights(tmp_path / name, 256)
        assert all(torch.equal(w[k], other[k]) for k in w)


def test_set_and_flags_override_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(TOML)
    out = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "c.toml"), "--out", str(out), "--seed", "7",
            "--set", "ppo.n_epochs=3", "--set", "ppo.learning_rate=1e-4", "--set", "policy_config.hidden_sizes=[32, 32]"]  # fmt: skip
    assert cli.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["seed"] == 7
    assert config["ppo"]["n_epochs"] == 3
    assert config["ppo"]["learning_rate"] == 1e-4
    assert config["policy_config"]["hidden_sizes"] == [32, 32]
    assert config["ppo"]["n_steps"] == 256  # untouched fields keep the file's values
    assert config["run"]["total_steps"] == 256
    hidden = [v.shape for k, v in policy_weights(out, 256).items() if k.endswith("weight")][:-1]
    assert hidden and all(shape[0] == 32 for shape in hidden), hidden  # the policy was built with [32, 32]


# ----------------------------------------------------------------------------------------------
# input errors: exit 2, one line, names the problem
# ----------------------------------------------------------------------------------------------
BASE = ["--algo", "ppo", "--steps", "512", "--seed", "0", "--no-progress"]

BAD_TRAIN = {
    "unknown-env": (["--env", "Hoper-v5", "--policy", "gaussian"], ["Hoper-v5", "Hopper-v5"]),
    "unknown-policy": (["--env", "InvertedPendulum-v5", "--policy", "gausian"], ["gausian", "gaussian", "pmoe"]),
    "unknown-algo": (["--env", "InvertedPendulum-v5", "--policy", "gaussian", "--algo", "td3"], ["td3", "ppo"]),
    "negative-steps": (["--env", "InvertedPendulum-v5", "--policy", "gaussian", "--steps", "-5"], ["total_steps", "-5"]),
    "negative-clip": (["--env", "InvertedPendulum-v5", "--set", "ppo.clip_coef=-1"], ["clip_coef", "-1"]),
    "gamma-above-1": (["--env", "InvertedPendulum-v5", "--set", "ppo.gamma=2"], ["gamma", "2"]),
    "unknown-key": (["--env", "InvertedPendulum-v5", "--set", "ppo.clip=0.1"], ["'clip'", "clip_coef"]),
    "wrong-type": (["--env", "InvertedPendulum-v5", "--set", "ppo.n_epochs=abc"], ["n_epochs", "integer", "abc"]),
    "missing-config": (["--config", "{tmp}/nope.toml"], ["not found", "nope.toml"]),
    "indivisible-batch": (
        ["--env", "InvertedPendulum-v5", "--set", "ppo.n_steps=100", "--set", "ppo.n_minibatches=3"],
        ["100", "not divisible", "n_minibatches = 3"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN), ids=list(BAD_TRAIN))
def test_bad_train_input_exits_2(tmp_path: Path, capsys, case: str) -> None:
    args, needles = BAD_TRAIN[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = ["train", *BASE, "--out", str(tmp_path / "run"), *args]
    capsys.readouterr()
    assert cli.main(argv) == 2
    line = error_line(capsys)
    for needle in needles:
        assert needle in line, (needle, line)
    assert checkpoint_steps(tmp_path / "run") == []


def test_eval_of_non_run_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert cli.main(["eval", str(tmp_path / "empty"), "--episodes", "1"]) == 2
    assert "not a genrl run" in error_line(capsys)


def test_plot_without_progress_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert cli.main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no progress.csv" in error_line(capsys)
    assert not (tmp_path / "x.png").exists()


def test_resume_with_extra_flags_exits_2(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert cli.main(["train", "--resume", str(runs["seed0"]), "--steps", "100"]) == 2
    assert "--steps" in error_line(capsys)


# ----------------------------------------------------------------------------------------------
# eval and plot
# ----------------------------------------------------------------------------------------------
EVAL_RE = re.compile(r"return (-?\d+\.\d+) \+/- (\d+\.\d+) over (\d+) episodes")


def test_eval_prints_mean_and_std(runs: dict[str, Path], capsys) -> None:
    run = runs["seed0"]
    capsys.readouterr()
    # the training-time evaluation used seed run.seed + 10_000 and run.eval_episodes = 2:
    # the CLI evaluation of the final checkpoint with that seed reproduces it
    assert cli.main(["eval", str(run), "--episodes", "2", "--seed", "10000"]) == 0
    m = EVAL_RE.search(capsys.readouterr().out)
    assert m, "no 'return M +/- S over N episodes' line"
    mean, std, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
    assert n == 2 and std >= 0
    logged = read_csv(run / "progress.csv")["eval/return_mean"][-1]
    assert mean == pytest.approx(logged, abs=0.006)
    # another seed: still a valid report
    assert cli.main(["eval", str(run), "--episodes", "2"]) == 0
    m = EVAL_RE.search(capsys.readouterr().out)
    assert m and float(m.group(1)) > 0


def _mujoco_render_or_skip() -> None:
    import gymnasium as gym

    import genrl_envs  # noqa: F401  (sets MUJOCO_GL=egl when there is no display)

    try:
        env = gym.make("InvertedPendulum-v5", render_mode="rgb_array")
        env.reset(seed=0)
        frame = env.render()
        env.close()
    except Exception as exc:  # no GL back end on this machine
        pytest.skip(f"MuJoCo rendering unavailable: {type(exc).__name__}: {exc}")
    assert frame is not None and frame.ndim == 3


def test_eval_video(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    _mujoco_render_or_skip()
    run = tmp_path / "run"
    shutil.copytree(runs["seed0"], run)
    assert cli.main(["eval", str(run), "--episodes", "1", "--video"]) == 0
    videos = list((run / "videos").glob("*.mp4"))
    assert [v.name for v in videos] == ["eval-512.mp4"]
    data = videos[0].read_bytes()
    assert data[4:8] == b"ftyp"  # an ISO-BMFF (mp4) container
    import imageio.v2 as imageio

    reader = imageio.get_reader(videos[0])
    try:
        assert reader.count_frames() >= 2
        frame = reader.get_data(0)
    finally:
        reader.close()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.std() > 0  # not a blank frame
    assert str(videos[0]) in capsys.readouterr().out


def test_plot_two_runs(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "out.png"
    assert cli.main(["plot", str(runs["seed0"]), str(runs["seed1"]), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 1000
    assert str(out) in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# reproducibility
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_weights_other_seed_differs(runs: dict[str, Path]) -> None:
    a, b, c = (policy_weights(runs[k]) for k in ("seed0", "seed0-again", "seed1"))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)
    ta = load_file(str(runs["seed0"] / "checkpoints" / "512" / "trainer.safetensors"))
    tb = load_file(str(runs["seed0-again"] / "checkpoints" / "512" / "trainer.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# ----------------------------------------------------------------------------------------------
# the installed console script
# ----------------------------------------------------------------------------------------------
def _console_script() -> str:
    candidate = Path(sys.executable).parent / ("genrl.exe" if os.name == "nt" else "genrl")
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("genrl")
    if found is None:
        pytest.fail("the genrl console script is not installed next to the interpreter nor on PATH")
    return found


def test_console_script(tmp_path: Path) -> None:
    exe = _console_script()
    env = {k: v for k, v in os.environ.items() if k != "GENRL_DEBUG"}
    out = tmp_path / "run"
    ok = subprocess.run([exe, *train_argv(out, steps=256)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert checkpoint_steps(out) == [256]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC

    bad = subprocess.run(
        [exe, "train", "--env", "Hoper-v5", "--out", str(tmp_path / "bad"), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genrl: error:") and "Hopper-v5" in lines[0], bad.stderr


def test_one_config_root_for_every_algorithm() -> None:
    """TrainConfig serves control and text-to-image runs; the CLI's and earlier releases' flat
    ``env = "t2i"`` layout reads as the ``t2i`` section; sections of another algorithm are refused."""
    from genrl.config import IMAGE_RUN_DEFAULTS, TrainConfig, config_from_dict, describe_config, image_config, upgrade_config
    from genrl.errors import ConfigError

    flat = {"env": "t2i", "model": "digits", "reward": "digit=1", "algo": "g2rpo", "grpo": {"num_steps": 8}}
    cfg = config_from_dict(upgrade_config(flat))
    assert isinstance(cfg, TrainConfig) and cfg.is_image and cfg.t2i.reward == "digit=1" and cfg.grpo.n_steps == 8
    assert cfg.run.total_steps == IMAGE_RUN_DEFAULTS["total_steps"] and cfg.run.eval_episodes == IMAGE_RUN_DEFAULTS["eval_episodes"]
    assert cfg == image_config(algo="g2rpo", reward="digit=1", grpo=cfg.grpo)
    assert set(cfg.to_dict()) == {"algo", "run", "t2i", "grpo", "preset"}
    assert config_from_dict(cfg.to_dict()) == cfg  # config.json round trip
    assert config_from_dict({"env": "t2i"}).algo == "flow-grpo"
    control = config_from_dict({"policy": "pmoe"})
    assert not control.is_image and "t2i" not in control.to_dict() and "grpo" not in control.to_dict()
    for data, msg in (
        ({"algo": "flow-grpo", "ppo": {"n_steps": 8}}, r"\[ppo\] settings apply to control"),
        ({"algo": "flow-grpo", "policy": "pmoe"}, r"\[policy\] settings apply to control"),
        ({"policy": "gaussian", "grpo": {"group_size": 4}}, r"\[grpo\] settings apply to text-to-image"),
        ({"env": "t2i", "algo": "ppo"}, "unknown algo 'ppo' for --env t2i"),
        ({"algo": "flow-grpo", "t2i": {"dtype": "int8"}}, "invalid t2i.dtype"),
    ):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(data)
    text = describe_config("g2rpo")
    assert "t2i.model: str = 'digits'" in text and "grpo.n_steps" in text and "ppo." not in text and "policy_config" not in text
    assert "gorl." not in describe_config("ppo", "gaussian") and "gorl.stage_fractions" in describe_config("ppo", "gorl")
    sac = describe_config("sac", "gaussian")
    assert "algo_config.buffer_size: int = 1000000" in sac and "ppo." not in sac and "algo_config.dataset" in describe_config("bc", "diffusion")

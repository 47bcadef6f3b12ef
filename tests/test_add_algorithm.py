"""The README's "add an algorithm" example (REINFORCE) is a full citizen of the run loop: it
trains from the CLI, checkpoints, resumes bit for bit and evaluates like the built-in ones."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
from compare import assert_same_tensors
from test_readme import blocks

from genrl import cli
from genrl.algos.base import CONTROL_ALGORITHMS
from genrl.checkpoint import checkpoint_steps


@pytest.fixture(scope="module")
def reinforce() -> types.ModuleType:
    block = next(b for b in blocks("python") if "register_control_algorithm" in b)
    code = block[: block.index("from genrl.config import config_from_dict")]  # the algorithm, not its demo run
    module = types.ModuleType("readme_reinforce")
    sys.modules[module.__name__] = module
    exec(compile(code, "README.md", "exec"), module.__dict__)
    yield module
    CONTROL_ALGORITHMS.pop("reinforce", None)
    sys.modules.pop(module.__name__, None)


def test_registered_algorithm_trains_resumes_bitwise_and_evaluates(reinforce: types.ModuleType, tmp_path: Path, capsys) -> None:
    assert len(b := [x for x in blocks("python") if "class Reinforce" in x][0].splitlines()) < 80, len(b)
    base = ["train", "--env", "Pendulum-v1", "--algo", "reinforce", "--steps", "512", "--save-every", "128", "--no-progress",
            "--eval-episodes", "1", "--set", "algo_config.n_steps=128", "--set", "algo_config.learning_rate=3e-3"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main([*base, "--out", str(full)]) == 0
    assert checkpoint_steps(full)[-1] == 512
    shutil.copytree(full, cut)
    for step in (384, 512):
        shutil.rmtree(cut / "checkpoints" / str(step))
    assert cli.main(["train", "--resume", str(cut), "--no-progress"]) == 0
    for name in ("trainer.safetensors", "policy/model.safetensors", "env.safetensors"):
        assert_same_tensors(full / "checkpoints" / "512" / name, cut / "checkpoints" / "512" / name)
    capsys.readouterr()
    assert cli.main(["eval", str(full), "--episodes", "1"]) == 0
    assert "Pendulum-v1 gaussian step 512" in capsys.readouterr().out
    assert cli.main([*base, "--out", str(tmp_path / "bad"), "--set", "algo_config.learning_rat=1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err

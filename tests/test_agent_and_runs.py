"""Using what was trained (``genrl.Agent``), and run folders that cannot be lost or clobbered."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from genrl import Agent, cli
from genrl.checkpoint import checkpoint_steps
from genrl.config import config_from_dict
from genrl.errors import CheckpointError
from genrl.runs import Interrupted
from genrl.trainer import train

TINY = {"n_steps": 128, "n_minibatches": 2, "n_epochs": 1}
SMALL_POLICY = {
    "gaussian": {}, "pmoe": {"n_experts": 2}, "policyflow": {"hidden_sizes": [16], "n_steps": 2},
    "fpo": {"hidden_sizes": [16], "n_steps": 2, "n_mc": 2}, "diffusion": {"hidden_sizes": [16], "n_denoising_steps": 2},
    "gorl": {"encoder_hidden": [16], "decoder_hidden": [16], "decoder_steps": 2},
}  # fmt: skip


def tiny_run(out: Path, family: str = "gaussian", env_id: str = "Pendulum-v1", steps: int = 256, **run: object) -> Path:
    data = {"env": {"env_id": env_id}, "policy": family, "policy_config": SMALL_POLICY[family], "ppo": TINY,
            "run": {"total_steps": steps, "seed": 3, "out": str(out), "eval_episodes": 2, "progress": False, **run}}  # fmt: skip
    if family == "gorl":
        data["gorl"] = {"stage_fractions": [0.5, 0.5], "refine_steps": 64, "decoder_epochs": 1, "decoder_batch_size": 32}
    return train(config_from_dict(data))


# -- the load-and-act API --------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(SMALL_POLICY))
def test_agent_on_raw_observations_scores_like_genrl_eval(family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_run(tmp_path / "run", family)
    agent = Agent.load(run)
    assert agent.family == family and agent.step == 256 and agent.obs_normalizer is not None
    # a plain gymnasium loop with raw observations, as a user writes it, vs the CLI's evaluation
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    total, done, gen = 0.0, False, torch.Generator().manual_seed(0)
    while not done:
        obs, r, term, trunc, _ = env.step(agent.predict(obs, generator=gen))
        total += float(r)
        done = term or trunc
    env.close()
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--episodes", "1", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"return {total:.2f}" in printed, (total, printed)
    # the exported agent (no optimiser, no run folder) acts identically
    exported = Agent.load(run / "final")
    batch = np.random.default_rng(0).normal(size=(5, 3))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    np.testing.assert_array_equal(agent.predict(batch, generator=g1), exported.predict(batch, generator=g2))
    assert cli.main(["eval", str(run / "final"), "--episodes", "1", "--seed", "0"]) == 0
    assert f"return {total:.2f}" in capsys.readouterr().out


def test_agent_input_kinds_bounds_and_errors(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    agent = Agent.load(run)
    single = agent.predict(np.zeros(3))
    assert isinstance(single, np.ndarray) and single.shape == (1,)
    batch_t = agent.predict(torch.zeros(4, 3))
    assert isinstance(batch_t, torch.Tensor) and batch_t.shape == (4, 1)
    far = agent.predict(np.full((64, 3), 1e6), deterministic=False)
    assert float(np.abs(far).max()) <= 2.0  # Pendulum's action box
    with pytest.raises(ValueError, match=r"expected \(3,\) or \(B, 3\)"):
        agent.predict(np.zeros(4))
    assert Agent.load(run, step=128).step == 128
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        Agent.load(run, step=7)
    with pytest.raises(CheckpointError, match="not a genrl run"):
        Agent.load(tmp_path)
    (run / "final" / "agent.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        Agent.load(run / "final")
    # a different compatible env id
    assert "eval/return_mean" in agent.evaluate("Pendulum-v1", episodes=1)


# -- run folders ----------------------------------------------------------------------------------
def test_out_never_overwrites_what_genrl_did_not_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    base = ["train", "--env", "Pendulum-v1", "--steps", "128", "--set", "ppo.n_steps=128", "--no-progress"]
    assert cli.main([*base, "--out", str(mine)]) == 2
    assert "not empty and not a genrl run" in capsys.readouterr().err
    assert (mine / "config.json").read_text() == '{"my": "settings"}' and len(list(mine.iterdir())) == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main([*base, "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(afile / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert cli.main([*base, "--out", str(ro / "run")]) == 2
        assert "no permission" in capsys.readouterr().err


def test_default_run_names_are_unique(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["train", "--env", "Pendulum-v1", "--steps", "128", "--set", "ppo.n_steps=128", "--no-progress", "--seed", "4"]
    assert cli.main(base) == 0 and cli.main(base) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("Pendulum-v1__gaussian__4__") for r in runs)


def test_sigint_writes_a_checkpoint_and_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    full = tiny_run(tmp_path / "full", steps=768, save_every=0)
    assert checkpoint_steps(full) == [768]
    import genrl.runs

    seen: list[int] = []
    real = genrl.runs.guarded_iterate

    def iterate_then_interrupt(algo, run_dir):  # the signal arrives during the second iteration
        out = real(algo, run_dir)
        seen.append(algo.global_step)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    import genrl.trainer

    genrl.trainer.guarded_iterate = iterate_then_interrupt
    try:
        with pytest.raises(Interrupted, match="SIGINT at step 256"):
            tiny_run(tmp_path / "cut", steps=768, save_every=0)
    finally:
        genrl.trainer.guarded_iterate = real
    cut = tmp_path / "cut"
    assert checkpoint_steps(cut) == [256]
    train(resume=cut)
    from compare import assert_same_tensors

    for name in ("trainer.safetensors", "policy/model.safetensors", "env.safetensors"):
        assert_same_tensors(full / "checkpoints" / "768" / name, cut / "checkpoints" / "768" / name)
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_resume_extends_applies_run_flags_and_refuses_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_run(tmp_path / "run", steps=256, keep_checkpoints=2)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--reward", "digit"]) == 2
    assert "--reward would change the run" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run), "--device", "cpu"]) == 2
    assert cli.main(["train", "--resume", str(run), "--steps", "128"]) == 2
    assert "can only be extended" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run), "--steps", "640", "--save-every", "128", "--no-progress"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["total_steps"] == 640 and cfg["run"]["save_every"] == 128 and cfg["run"]["progress"] is False
    assert checkpoint_steps(run) == [512, 640]  # keep_checkpoints = 2
    meta = json.loads((run / "meta.json").read_text())
    assert [i["resumed"] for i in meta["invocations"]] == [False, True]  # refused resumes wrote nothing
    assert meta["invocations"][-1]["versions"]["torch"] == torch.__version__


def test_budget_rounding_is_announced_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_run(tmp_path / "run", steps=200)
    assert "total steps 200 rounded up to 256" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["run"]["total_steps"] == 256


def test_run_files_have_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        run = tiny_run(tmp_path / "run")
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p  # group and others can read


def test_cuda_device_without_cuda_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train", "--env", "Pendulum-v1", "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no usable CUDA" in capsys.readouterr().err and not (tmp_path / "r").exists()

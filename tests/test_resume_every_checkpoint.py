"""Resuming from *every* checkpoint reproduces the uninterrupted run bit for bit, for every
family, on a contact-rich task whose episodes end by termination and by time limit inside the run.

Resuming used to be exact from some checkpoints only: the policy's matrix products rounded
differently when an observation's memory started at another offset from a 64-byte boundary, and
numpy's allocations (observations) and safetensors' buffers (the restored next observation) land
at offsets that depend on the process's history. The heap is deliberately disturbed before each
resume here so that a dependence on allocation offsets cannot pass by luck.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from compare import assert_same_nested, assert_same_tensors

from genrl.checkpoint import checkpoint_steps
from genrl.config import config_from_dict
from genrl.trainer import train
from genrl_envs import make_env

ENV_ID = "genrl-test/HopperShort-v0"  # Hopper-v5 with a 40-step time limit: terminations and truncations
if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="gymnasium.envs.mujoco.hopper_v5:HopperEnv", max_episode_steps=40)

FAMILIES = {
    "gaussian": {},
    "pmoe": {"n_experts": 2, "hidden_sizes": [32, 32]},
    "policyflow": {"hidden_sizes": [32, 32], "n_steps": 3},
    "fpo": {"hidden_sizes": [32, 32], "n_steps": 3, "n_mc": 2},
    "diffusion": {"hidden_sizes": [32, 32], "n_denoising_steps": 3},
    "gorl": {"encoder_hidden": [16], "decoder_hidden": [16, 16], "decoder_steps": 3, "decoder_pairs": 2},
}


def config(family: str, out: Path) -> object:
    data = {
        "env": {"env_id": ENV_ID, "n_envs": 2}, "policy": family, "policy_config": FAMILIES[family],
        "ppo": {"n_steps": 32, "n_minibatches": 2, "n_epochs": 2},
        "run": {"total_steps": 320, "seed": 5, "out": str(out), "save_every": 64, "eval_episodes": 1, "progress": False},
    }  # fmt: skip
    if family == "gorl":
        data["gorl"] = {"stage_fractions": [0.4, 0.6], "refine_steps": 96, "decoder_epochs": 2, "decoder_batch_size": 32, "patience": 0}
    return config_from_dict(data)


def test_the_short_hopper_ends_episodes_both_ways() -> None:
    env = make_env(ENV_ID, 2, normalize_obs=False, normalize_reward=False)
    env.reset(seed=5)
    gen = torch.Generator().manual_seed(0)
    term = trunc = 0
    for _ in range(160):
        out = env.step(torch.rand(2, 3, generator=gen) * 2 - 1)
        term += int(out.terminated.sum())
        trunc += int(out.truncated.sum())
    env.close()
    assert term > 0 and trunc > 0


def test_observations_live_in_aligned_torch_memory() -> None:
    env = make_env(ENV_ID, 2)
    obs = env.reset(seed=0)
    step = env.step(torch.zeros(2, 3))
    env.close()
    for t in (obs, step.obs, step.final_obs):
        assert t.data_ptr() % 64 == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resume_from_every_checkpoint_is_bitwise(family: str, tmp_path: Path) -> None:
    full = train(config(family, tmp_path / "full"))
    steps = checkpoint_steps(full)
    assert steps == [64, 128, 192, 256, 320]
    last = full / "checkpoints" / str(steps[-1])
    for step in steps[:-1]:
        run = tmp_path / f"from-{step}"
        shutil.copytree(full, run)
        for later in steps:
            if later > step:
                shutil.rmtree(run / "checkpoints" / str(later))
        junk = [np.empty(n) for n in (1, 3, 5, 7, 11, 13)]  # move numpy's next allocations
        train(resume=run)
        del junk
        got = run / "checkpoints" / str(steps[-1])
        for name in ("trainer.safetensors", "policy/model.safetensors", "env.safetensors"):
            assert_same_tensors(last / name, got / name)
        opt_a = torch.load(last / "optimizer.pt", weights_only=True)
        opt_b = torch.load(got / "optimizer.pt", weights_only=True)
        assert_same_nested(opt_a, opt_b, f"optimizer (resumed from {step})")

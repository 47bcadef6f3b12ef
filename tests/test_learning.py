"""Learning checks through the Python API: PPO actually improves the policy.

Thresholds were set from measurements on CPU (2 cores, torch 2.13, gymnasium 1.4, mujoco 3.x),
with a margin; the numbers behind them are in each test's comment. Only the first test runs by
default; the others are marked ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from genrl.config import config_from_dict
from genrl.evaluate import evaluate
from genrl.logger import read_csv
from genrl.trainer import build, train


def make_config(out: Path, env_id: str, policy: str, total_steps: int, seed: int, *, ppo: dict, n_envs: int = 1, eval_episodes: int = 5):
    return config_from_dict(
        {
            "env": {"env_id": env_id, "n_envs": n_envs},
            "policy": policy,
            "ppo": ppo,
            "run": {"total_steps": total_steps, "seed": seed, "out": str(out), "eval_episodes": eval_episodes, "progress": False},
        }
    )


def final_eval(run: Path) -> float:
    cols = read_csv(run / "progress.csv")
    value = cols["eval/return_mean"][-1]
    assert math.isfinite(value)
    return value


def untrained_eval(cfg) -> float:
    """Deterministic return of the freshly initialised policy (same eval seed as training's)."""
    algo = build(cfg)
    try:
        res = evaluate(algo.policy, cfg.env, algo.env.obs_normalizer_state(), episodes=cfg.run.eval_episodes, seed=cfg.run.seed + 10_000)
    finally:
        algo.env.close()
    return res["eval/return_mean"]


IP_PPO = {"n_steps": 512, "n_minibatches": 8, "n_epochs": 10}


def test_gaussian_ppo_learns_inverted_pendulum(tmp_path: Path) -> None:
    # Measured (8192 steps, 5 eval episodes): seeds 0-7 reached 715, 633, 374, 1000, 482, 1000,
    # 1000, 1000 (max 1000); the untrained policies score 20-33. Threshold 150: ~2.5x under
    # the worst seed, ~5x over an untrained policy.
    cfg = make_config(tmp_path / "run", "InvertedPendulum-v5", "gaussian", 8192, seed=0, ppo=IP_PPO)
    before = untrained_eval(cfg)
    assert before < 100, f"untrained policy already scores {before}: the threshold would be meaningless"
    run = train(cfg)
    after = final_eval(run)
    assert after >= 150, f"eval return {after} after 8192 steps (untrained: {before})"
    # the training return improved as well
    ep = [r for r in read_csv(run / "progress.csv")["rollout/ep_return"] if not math.isnan(r)]
    assert ep[-1] > 2 * ep[0], ep


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["gaussian", "pmoe"])
def test_ppo_solves_inverted_pendulum(tmp_path: Path, policy: str) -> None:
    # Measured (20480 steps, 10 eval episodes): gaussian and pmoe both scored the maximum, 1000,
    # on each of seeds 0-3 (16384-step runs already scored 1000 on seeds 0-2). Threshold 900.
    cfg = make_config(tmp_path / "run", "InvertedPendulum-v5", policy, 20480, seed=0, ppo=IP_PPO, eval_episodes=10)
    after = final_eval(train(cfg))
    assert after >= 900, f"{policy}: eval return {after} of 1000 after 20480 steps"


@pytest.mark.slow
def test_gaussian_ppo_learns_pendulum(tmp_path: Path) -> None:
    # Measured (100k steps, 4 envs, gamma 0.9, lr 1e-3, 5 eval episodes): seeds 0-3 reached
    # -138, -176, -103, -167; untrained policies score -950 to -1240 (seeds 0-2). Threshold -400.
    ppo = {"n_steps": 256, "n_minibatches": 8, "n_epochs": 10, "gamma": 0.9, "learning_rate": 1e-3, "gae_lambda": 0.95}
    cfg = make_config(tmp_path / "run", "Pendulum-v1", "gaussian", 100_000, seed=0, ppo=ppo, n_envs=4)
    before = untrained_eval(cfg)
    after = final_eval(train(cfg))
    assert before < -600, before
    assert after > -400, f"eval return {after} after 100k steps (untrained: {before})"


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["policyflow", "fpo", "diffusion"])
def test_generative_policies_solve_inverted_pendulum(tmp_path: Path, policy: str) -> None:
    # Measured (20480 steps, n_steps 1024, PPO defaults otherwise, seed 1): policyflow, fpo and
    # diffusion each reached the maximum eval return, 1000; untrained policies score under 100.
    cfg = make_config(tmp_path / "run", "InvertedPendulum-v5", policy, 20480, seed=1, ppo={"n_steps": 1024}, eval_episodes=5)
    before = untrained_eval(cfg)
    after = final_eval(train(cfg))
    assert before < 100, f"{policy}: untrained policy already scores {before}"
    assert after >= 900, f"{policy}: eval return {after} of 1000 after 20480 steps (untrained: {before})"


@pytest.mark.slow
def test_gorl_solves_inverted_pendulum(tmp_path: Path) -> None:
    # Measured (20480 steps, n_steps 1024, 16 minibatches, two stages, a 5000-step refinement,
    # seed 1): rollout return 433 before the refinement, 389 right after it with a freshly reset
    # encoder (8.8 at the very start), then 1000 for the last 8 iterations; eval 1000.
    cfg = config_from_dict(
        {
            "env": {"env_id": "InvertedPendulum-v5"},
            "policy": "gorl",
            "ppo": {"n_steps": 1024, "n_minibatches": 16},
            "gorl": {"stage_fractions": [0.5, 0.5], "refine_steps": 5000, "decoder_epochs": 20, "decoder_batch_size": 256},
            "run": {"total_steps": 20480, "seed": 1, "out": str(tmp_path / "run"), "eval_episodes": 5, "progress": False},
        }
    )
    run = train(cfg)
    cols = read_csv(run / "progress.csv")
    assert max(cols["gorl/stage"]) == 1, "the decoder refinement never happened"
    assert final_eval(run) >= 900

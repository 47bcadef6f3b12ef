"""genrl PPO vs Stable-Baselines3 PPO, side by side in one process, same settings.

For every (env, seed) the two libraries run back to back (alternating which goes first), with
the widely used MuJoCo PPO settings (2048 steps x 1 env per rollout, 10 epochs of 32
minibatches, lr 3e-4 annealed linearly, gamma 0.99, lambda 0.95, clip 0.2, 64x64 tanh actor
and critic, orthogonal init, observation and reward normalisation with clipping at 10, Adam
eps 1e-5, no entropy bonus, grad clip 0.5), one torch thread each. Both log to TensorBoard.
The timed span is training only (env steps, inference, updates, logging), not evaluation.

Also measured: the raw simulator rate (random actions, one env, no learning) as the ceiling,
and optionally genrl PMOE vs Gaussian at equal budget.

Writes <out>/results.json, <out>/results.md and <out>/curves.png.

    python scripts/bench_control.py --envs Hopper-v5 HalfCheetah-v5 --steps 100000 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS = dict(
    n_steps=2048, n_minibatches=32, n_epochs=10, learning_rate=3e-4, gamma=0.99, gae_lambda=0.95,
    clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, max_grad_norm=0.5,
)  # fmt: skip


def raw_sim_rate(env_id: str, steps: int = 20_000, seed: int = 0) -> float:
    """Random-action env steps per second of one plain gymnasium env (resets included)."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(steps)]
    t0 = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def run_genrl(env_id: str, policy: str, steps: int, seed: int, out: Path, eval_episodes: int) -> dict[str, Any]:
    from genrl.config import config_from_dict
    from genrl.evaluate import evaluate
    from genrl.logger import Logger
    from genrl.trainer import build

    run_dir = out / f"genrl-{policy}-{env_id}-s{seed}"
    cfg = config_from_dict({
        "env": {"env_id": env_id}, "policy": policy,
        "ppo": {k: v for k, v in SETTINGS.items()}, "run": {"total_steps": steps, "seed": seed, "out": str(run_dir), "progress": False},
    })  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    algo = build(cfg)
    logger = Logger(run_dir, steps, progress=False)
    t0 = time.perf_counter()
    while algo.iteration < algo.n_iterations:
        logger.log(algo.iterate(), algo.global_step)
    wall = time.perf_counter() - t0
    logger.close()
    ev = evaluate(algo.policy, cfg.env, algo.env.obs_normalizer_state(), episodes=eval_episodes, seed=seed + 10_000)
    algo.env.close()
    return {"steps": algo.global_step, "wall_s": wall, "sps": algo.global_step / wall,
            "return_mean": ev["eval/return_mean"], "return_std": ev["eval/return_std"], "log": str(run_dir / "progress.csv")}  # fmt: skip


def run_sb3(env_id: str, steps: int, seed: int, out: Path, eval_episodes: int) -> dict[str, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import VecNormalize

    s = SETTINGS
    run_dir = out / f"sb3-{env_id}-s{seed}"
    env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=s["gamma"], clip_obs=10.0, clip_reward=10.0)
    lr0 = s["learning_rate"]
    model = PPO(
        "MlpPolicy", env, n_steps=s["n_steps"], batch_size=s["n_steps"] // s["n_minibatches"],
        n_epochs=s["n_epochs"], learning_rate=lambda frac: lr0 * frac, gamma=s["gamma"],
        gae_lambda=s["gae_lambda"], clip_range=s["clip_coef"], ent_coef=s["ent_coef"],
        vf_coef=s["vf_coef"], max_grad_norm=s["max_grad_norm"], seed=seed, device="cpu", verbose=0,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
    )  # fmt: skip
    model.set_logger(configure(str(run_dir), ["csv", "tensorboard"]))
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - t0
    done = model.num_timesteps
    env.training, env.norm_reward = False, False
    eval_env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed + 10_000), training=False, norm_reward=False)
    eval_env.obs_rms = env.obs_rms
    rets, _ = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True, return_episode_rewards=True)
    return {"steps": done, "wall_s": wall, "sps": done / wall, "return_mean": float(np.mean(rets)),
            "return_std": float(np.std(rets)), "log": str(run_dir / "progress.csv")}  # fmt: skip


def _curve(path: str, step_key: str, ret_key: str) -> tuple[list[float], list[float]]:
    import csv

    xs, ys = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(ret_key) not in (None, ""):
                xs.append(float(row[step_key]))
                ys.append(float(row[ret_key]))
    return xs, ys


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(results["envs"])
    fig, axes = plt.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), dpi=110, squeeze=False)
    keys = {"sb3": ("time/total_timesteps", "rollout/ep_rew_mean"), "genrl": ("step", "rollout/ep_return")}
    for ax, env_id in zip(axes[0], envs):
        for name, runs in results["envs"][env_id]["runs"].items():
            sk, rk = keys["sb3" if name == "sb3" else "genrl"]
            curves = [_curve(r["log"], sk, rk) for r in runs]
            n = min(len(c[0]) for c in curves)
            if n == 0:
                continue
            x = np.array(curves[0][0][:n])
            y = np.array([c[1][:n] for c in curves])
            (line,) = ax.plot(x, y.mean(0), label=f"{name} (n={len(runs)})")
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
        ax.set_title(env_id)
        ax.set_xlabel("env steps")
        ax.set_ylabel("training episode return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", nargs="+", default=["Hopper-v5"])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--pmoe", action="store_true", help="also run genrl PMOE at the same budget")
    p.add_argument("--no-sb3", action="store_true")
    p.add_argument("--out", default="bench_out/control")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": SETTINGS, "steps": args.steps, "seeds": args.seeds, "eval_episodes": args.eval_episodes, "envs": {}}
    for env_id in args.envs:
        ceiling = [raw_sim_rate(env_id)]
        runs: dict[str, list[dict[str, Any]]] = {"genrl-gaussian": [], "sb3": []}
        if args.pmoe:
            runs["genrl-pmoe"] = []
        if args.no_sb3:
            del runs["sb3"]
        for i, seed in enumerate(args.seeds):
            order = ["genrl-gaussian", "sb3"] if i % 2 == 0 else ["sb3", "genrl-gaussian"]
            order = [o for o in order if o in runs] + (["genrl-pmoe"] if args.pmoe else [])
            for name in order:
                if name == "sb3":
                    r = run_sb3(env_id, args.steps, seed, out, args.eval_episodes)
                else:
                    r = run_genrl(env_id, name.split("-")[1], args.steps, seed, out, args.eval_episodes)
                runs[name].append(r)
                print(f"{env_id} seed {seed} {name:15s} {r['sps']:7.0f} steps/s  return {r['return_mean']:8.1f} +/- {r['return_std']:.1f}", flush=True)
        ceiling.append(raw_sim_rate(env_id))
        entry: dict[str, Any] = {"raw_sim_sps": statistics.median(ceiling), "runs": runs, "summary": {}}
        for name, rs in runs.items():
            finals = [r["return_mean"] for r in rs]
            entry["summary"][name] = {
                "sps_median": statistics.median(r["sps"] for r in rs),
                "return_mean": float(np.mean(finals)),
                "return_std_over_seeds": float(np.std(finals)),
                "fraction_of_ceiling": statistics.median(r["sps"] for r in rs) / entry["raw_sim_sps"],
            }
        if "sb3" in runs:
            ratios = [g["sps"] / s["sps"] for g, s in zip(runs["genrl-gaussian"], runs["sb3"])]
            entry["summary"]["sps_ratio_genrl_over_sb3"] = {"per_seed": ratios, "median": statistics.median(ratios)}
        results["envs"][env_id] = entry
        (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "curves.png")
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['steps']} env steps, seeds {results['seeds']}; steps/s is the median over seeds, return is the mean ± std over seeds of each run's {results.get('eval_episodes', 10)}-episode deterministic evaluation.",
        "",
        "| env | runner | steps/s | fraction of raw sim | final return | genrl/SB3 steps/s (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for env_id, e in results["envs"].items():
        ratio = e["summary"].get("sps_ratio_genrl_over_sb3")
        for name, s in e["summary"].items():
            if name == "sps_ratio_genrl_over_sb3":
                continue
            r = ""
            if ratio and name == "genrl-gaussian":
                r = f"**{ratio['median']:.2f}x** ({', '.join(f'{x:.2f}' for x in ratio['per_seed'])})"
            lines.append(f"| {env_id} | {name} | {s['sps_median']:.0f} | {100 * s['fraction_of_ceiling']:.0f}% | {s['return_mean']:.0f} ± {s['return_std_over_seeds']:.0f} | {r} |")
        lines.append(f"| {env_id} | raw simulator (random actions) | {e['raw_sim_sps']:.0f} | 100% | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

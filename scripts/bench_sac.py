"""genrl SAC vs Stable-Baselines3 SAC, and PMOE-SAC vs Gaussian SAC, side by side in one invocation.

    python scripts/bench_sac.py speed --envs Hopper-v5 HalfCheetah-v5          # env steps/s, same settings
    python scripts/bench_sac.py returns --envs Hopper-v5 HalfCheetah-v5 --steps 30000 --seeds 1 2 3
    python scripts/bench_sac.py pmoe --envs Hopper-v5 HalfCheetah-v5 Walker2d-v5 --steps 30000 --seeds 1 2 3
    python scripts/bench_sac.py multigoal --steps 20000 --seeds 1 2 3               # goals reached, PMOE vs Gaussian
    python scripts/bench_sac.py gorl --envs dmc/CheetahRun-v0 --steps 20000 --seeds 1 2   # GoRL-SAC vs SAC

Settings shared by both libraries (SB3's SAC defaults, which genrl's config can express
exactly): [256, 256] ReLU actor and twin critics, Adam lr 3e-4 for actor, critics and
temperature, batch 256, gamma 0.99, tau 0.005, one gradient step per env step with the actor
updated every step, automatic temperature from alpha 1 with target entropy -|A|, replay 1M,
``--learning-starts`` uniform-random steps (default 5000, CleanRL's), one env, ``--threads`` torch
threads each (default 1). genrl's critic loss is the sum of the two MSEs where SB3 halves it; Adam makes the two
identical up to its epsilon.

``speed`` times the gradient phase only (after learning starts), alternating which library goes
first. ``returns`` / ``pmoe`` / ``multigoal`` evaluate every ``--eval-every`` steps
(deterministic, ``--eval-episodes``) and are resumable: a finished run's result is kept in
``<out>/<run>/result.json`` and skipped, an interrupted genrl run continues from its newest
checkpoint (SB3 runs restart). Writes ``<out>/results.json``, ``results.md`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS = dict(buffer_size=1_000_000, batch_size=256, gamma=0.99, tau=0.005, lr=3e-4)


def genrl_config(env_id: str, policy: str, steps: int, seed: int, run_dir: Path, args: argparse.Namespace, critic_dtype: str = "float32") -> Any:
    from genrl.config import config_from_dict

    s = SETTINGS
    algo = {"buffer_size": s["buffer_size"], "batch_size": s["batch_size"], "gamma": s["gamma"], "tau": s["tau"],
            "policy_lr": s["lr"], "q_lr": s["lr"], "policy_frequency": 1, "learning_starts": args.learning_starts,
            "steps_per_iter": args.steps_per_iter, "critic_dtype": critic_dtype}  # fmt: skip
    extra: dict[str, Any] = {}
    if policy == "gorl":  # GoRL(SAC + diffusion decoder), the paper's off-policy variant, stages 1/2, 1/4, 1/4
        extra = {"gorl": {"stage_fractions": [0.5, 0.25, 0.25], "refine_steps": args.refine_steps, "decoder_epochs": args.decoder_epochs},
                 "policy_config": {"decoder": "diffusion"}}  # fmt: skip
    return config_from_dict({
        **extra, "algo": "sac", "env": {"env_id": env_id}, "policy": policy, "algo_config": algo,
        "run": {"total_steps": steps, "seed": seed, "out": str(run_dir), "progress": False, "eval_every": args.eval_every,
                "eval_episodes": args.eval_episodes, "save_every": args.eval_every or steps, "keep_checkpoints": 1,
                "torch_threads": args.threads},
    })  # fmt: skip


def run_genrl(env_id: str, policy: str, steps: int, seed: int, out: Path, args: argparse.Namespace, critic_dtype: str = "float32") -> dict[str, Any]:
    from genrl.trainer import train

    tag = "" if critic_dtype == "float32" else "-bf16"
    run_dir = out / f"genrl-{policy}{tag}-{env_id.replace('/', '_')}-s{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        train(resume=run_dir)
    else:
        train(genrl_config(env_id, policy, steps, seed, run_dir, args, critic_dtype))
    goals = count_goals(run_dir, seed, args.goal_episodes) if env_id == "genrl/MultiGoal-v0" else None
    rows = list(csv.DictReader(open(run_dir / "progress.csv")))
    evals = [(float(r["step"]), float(r["eval/return_mean"])) for r in rows if r.get("eval/return_mean")]
    it_s = [float(r["time/iteration_s"]) for r in rows if r.get("time/iteration_s")]
    learn_rows = [r for r in rows if float(r["step"]) > args.learning_starts + args.steps_per_iter]
    sps = [float(r["time/sps"]) for r in learn_rows if r.get("time/sps")]
    res = {"lib": "genrl", "policy": policy, "critic_dtype": critic_dtype, "env": env_id, "seed": seed, "steps": int(float(rows[-1]["step"])),
           "wall_s": sum(it_s), "learn_sps": statistics.median(sps) if sps else float("nan"),
           "evals": evals, "return_final": evals[-1][1] if evals else float("nan")}  # fmt: skip
    if goals is not None:
        res.update(goals)
    done.write_text(json.dumps(res))
    return res


def count_goals(run_dir: Path, seed: int, episodes: int) -> dict[str, Any]:
    """Distinct MultiGoal goals reached by ``episodes`` stochastic episodes of the run's final agent."""
    import gymnasium as gym

    import genrl_envs  # noqa: F401  (registers genrl/MultiGoal-v0)
    from genrl.agent import Agent
    from genrl_envs.multigoal import goal_index

    agent = Agent.load(run_dir)
    env = gym.make("genrl/MultiGoal-v0")
    gen = torch.Generator().manual_seed(seed + 20_000)
    finals = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + 20_000 + ep)
        done = False
        while not done:
            obs, _, term, trunc, _ = env.step(agent.predict(obs, deterministic=False, generator=gen))
            done = term or trunc
        finals.append(np.asarray(obs[:2], dtype=np.float64))
    env.close()
    reached = np.asarray(goal_index(np.stack(finals))).ravel()
    return {"goals_reached": sorted({int(g) for g in reached if g >= 0}), "success_rate": float(np.mean(reached >= 0))}


def run_sb3(env_id: str, steps: int, seed: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    run_dir = out / f"sb3-{env_id.replace('/', '_')}-s{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    s = SETTINGS
    model = SAC("MlpPolicy", gym.make(env_id), learning_rate=s["lr"], buffer_size=s["buffer_size"], learning_starts=args.learning_starts,
                batch_size=s["batch_size"], tau=s["tau"], gamma=s["gamma"], train_freq=1, gradient_steps=1, ent_coef="auto",
                policy_kwargs=dict(net_arch=[256, 256]), seed=seed, device="cpu", verbose=0)  # fmt: skip
    eval_env = gym.make(env_id)
    evals: list[tuple[float, float]] = []
    marks: dict[str, float] = {}

    class Clock(BaseCallback):
        """Evaluates every ``eval_every`` steps (its time excluded) and notes when learning starts."""

        def __init__(self) -> None:
            super().__init__()
            self.paused = 0.0

        def _on_step(self) -> bool:
            n = self.num_timesteps
            if n == args.learning_starts + args.steps_per_iter:
                marks["learn_t0"], marks["paused0"] = time.perf_counter(), self.paused
            if args.eval_every and (n % args.eval_every == 0 or n == steps):
                t = time.perf_counter()
                rets, _ = evaluate_policy(self.model, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True, return_episode_rewards=True)
                evals.append((float(n), float(np.mean(rets))))
                self.paused += time.perf_counter() - t
            return True

    clock = Clock()
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps, callback=clock)
    t1 = time.perf_counter()
    learn_steps = steps - args.learning_starts - args.steps_per_iter
    learn_s = t1 - marks.get("learn_t0", t0) - (clock.paused - marks.get("paused0", 0.0))
    res = {"lib": "sb3", "policy": "gaussian", "env": env_id, "seed": seed, "steps": model.num_timesteps, "wall_s": t1 - t0 - clock.paused,
           "learn_sps": learn_steps / learn_s if learn_steps > 0 else float("nan"), "evals": evals,
           "return_final": evals[-1][1] if evals else float("nan")}  # fmt: skip
    done.write_text(json.dumps(res))
    return res


def summarise(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| env | run | seeds | final eval return (mean ± std) | env steps/s while learning | wall s | goals reached per seed (of 6) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, runs in results.items():
        env, name = key.split("|")
        finals = [r["return_final"] for r in runs]
        sps = [r["learn_sps"] for r in runs]
        goals = " / ".join(str(len(r["goals_reached"])) for r in runs) if "goals_reached" in runs[0] else ""
        lines.append(f"| {env} | {name} | {len(runs)} | {np.mean(finals):.1f} ± {np.std(finals):.1f} | {np.mean(sps):.1f} | {np.mean([r['wall_s'] for r in runs]):.0f} | {goals} |")
    envs = sorted({k.split("|")[0] for k in results})
    for env in envs:
        b = results.get(f"{env}|sb3")
        for name in ("genrl-gaussian", "genrl-gaussian-bf16"):
            a = results.get(f"{env}|{name}")
            if a and b:
                ratio = np.mean([r["learn_sps"] for r in a]) / np.mean([r["learn_sps"] for r in b])
                lines.append(f"\n{env}: {name} / SB3 env steps/s while learning = {ratio:.2f}x")
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({k.split("|")[0] for k in results})
    fig, axes = plt.subplots(1, len(envs), figsize=(5.2 * len(envs), 3.8), dpi=110, squeeze=False)
    for ax, env in zip(axes[0], envs):
        for key, runs in results.items():
            if not key.startswith(env + "|") or not all(r["evals"] for r in runs):
                continue
            n = min(len(r["evals"]) for r in runs)
            x = np.array([s for s, _ in runs[0]["evals"][:n]])
            y = np.array([[v for _, v in r["evals"][:n]] for r in runs])
            (line,) = ax.plot(x, y.mean(0), label=f"{key.split('|')[1]} (n={len(runs)})")
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.2, color=line.get_color())
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return (deterministic)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["speed", "returns", "pmoe", "multigoal", "gorl"])
    p.add_argument("--refine-steps", type=int, default=5000, dest="refine_steps", help="gorl: env steps of decoder data per boundary")
    p.add_argument("--decoder-epochs", type=int, default=20, dest="decoder_epochs", help="gorl: decoder epochs per boundary")
    p.add_argument("--envs", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="env steps per run (speed: 7000, others: 30000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--learning-starts", type=int, default=5000)
    p.add_argument("--steps-per-iter", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--goal-episodes", type=int, default=50, help="MultiGoal: stochastic episodes counted for goals reached")
    p.add_argument("--bf16", action="store_true", help="also run genrl with bfloat16 critics (algo_config.critic_dtype)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for both libraries")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    mode = args.mode
    envs = args.envs or (["genrl/MultiGoal-v0"] if mode == "multigoal" else ["dmc/CheetahRun-v0"] if mode == "gorl"
                         else ["Hopper-v5", "HalfCheetah-v5"] + (["Walker2d-v5"] if mode == "pmoe" else []))  # fmt: skip
    if mode == "speed":
        args.learning_starts, args.eval_every = min(args.learning_starts, 1000), 0
        args.seeds = args.seeds[:1]
    steps = args.steps or (7000 if mode == "speed" else 30000)
    out = Path(args.out or f"bench_out/sac_{mode}")
    out.mkdir(parents=True, exist_ok=True)
    runners = {"genrl-gaussian": lambda e, s: run_genrl(e, "gaussian", steps, s, out, args)}
    if args.bf16:
        runners["genrl-gaussian-bf16"] = lambda e, s: run_genrl(e, "gaussian", steps, s, out, args, "bfloat16")
    if mode in ("speed", "returns"):
        runners["sb3"] = lambda e, s: run_sb3(e, steps, s, out, args)
    elif mode == "gorl":
        runners["genrl-gorl"] = lambda e, s: run_genrl(e, "gorl", steps, s, out, args)
    else:
        runners["genrl-pmoe"] = lambda e, s: run_genrl(e, "pmoe", steps, s, out, args)
    results: dict[str, list[dict[str, Any]]] = {}
    for env in envs:
        for i, seed in enumerate(args.seeds):
            order = list(runners) if i % 2 == 0 else list(runners)[::-1]
            for name in order:
                r = runners[name](env, seed)
                results.setdefault(f"{env}|{name}", []).append(r)
                print(f"{env} {name} seed {seed}: final eval {r['return_final']:.1f}, {r['learn_sps']:.1f} steps/s while learning", flush=True)
    text = summarise(results)
    (out / "results.json").write_text(json.dumps({"mode": mode, "steps": steps, "settings": SETTINGS, "args": vars(args), "results": results}, indent=1))
    (out / "results.md").write_text(text + "\n")
    if mode != "speed":
        plot(results, out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()

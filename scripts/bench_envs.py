"""Batched simulators, measured side by side in one invocation: raw env steps/s per back end,
PPO end to end against Stable-Baselines3, PPO in the many-env regime against the raw EnvPool rate,
torch-native MultiGoal, and return parity of EnvPool against gymnasium.

    python scripts/bench_envs.py raw                     # env steps/s at 1, 8, 64, 1024 envs
    python scripts/bench_envs.py ppo --steps 65536       # Gaussian PPO, Hopper-v5, 8 envs: genrl vs SB3
    python scripts/bench_envs.py many                    # genrl PPO on 64 / 256 EnvPool envs vs raw EnvPool
    python scripts/bench_envs.py multigoal               # torch-native MultiGoal: raw and PolicyFlow PPO at 4096 envs
    python scripts/bench_envs.py parity --steps 1000000 --seeds 1 2 3   # returns: EnvPool vs gymnasium (resumable)
    python scripts/bench_envs.py all                     # everything above but parity, one results.md

Every figure is env steps per second of wall time on this machine (2 CPU cores here), medians
of ``--repeats``; ratios are taken between runs of the same invocation. Results go to
``<out>/<part>.json`` and ``<out>/results.md``.
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

#: the widely used MuJoCo PPO settings, per env (SB3 / CleanRL defaults), for both libraries
PPO = dict(n_steps=2048, n_minibatches=32, n_epochs=10, learning_rate=3e-4, gamma=0.99, gae_lambda=0.95, clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, max_grad_norm=0.5)


# -- raw simulator rates -----------------------------------------------------------------------
def _timed(step: Any, n_envs: int, seconds: float) -> float:
    """Env steps per second of ``step()`` (one call = one step of every env) over ~``seconds``."""
    step()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        calls += 1
    return calls * n_envs / (time.perf_counter() - t0)


def raw_gymnasium(env_id: str, n: int, seconds: float) -> float:
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    import genrl_envs  # noqa: F401  registers genrl/MultiGoal-v0

    env = SyncVectorEnv([lambda: gym.make(env_id)] * n, autoreset_mode=AutoresetMode.SAME_STEP)
    env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (64, n, *env.single_action_space.shape)).astype(np.float32)
    i = iter(range(10**9))
    rate = _timed(lambda: env.step(actions[next(i) % 64]), n, seconds)
    env.close()
    return rate


def raw_envpool(env_id: str, n: int, seconds: float, asynchronous: bool) -> float:
    import envpool

    if not asynchronous:
        env = envpool.make_gymnasium(env_id, num_envs=n, batch_size=n, num_threads=min(n, 2), seed=0)
        env.reset()
        act = np.random.default_rng(0).uniform(-1, 1, (n, *env.action_space.shape))
        rate = _timed(lambda: env.step(act), n, seconds)
    else:  # half the envs simulate while the other half's actions are being chosen
        half = max(1, n // 2)
        env = envpool.make_gymnasium(env_id, num_envs=n, batch_size=half, num_threads=min(n, 2), seed=0)
        env.async_reset()
        act = np.random.default_rng(0).uniform(-1, 1, (half, *env.action_space.shape))

        def step() -> None:
            info = env.recv()[-1]
            env.send(act, info["env_id"])

        rate = _timed(step, half, seconds)
    env.close()
    return rate


def raw_mujoco_ceiling(env_id: str, seconds: float) -> float:
    """One C MuJoCo model stepped with random controls (frame_skip steps per env step), no
    Python env around it: the single-core ceiling of every CPU back end."""
    import gymnasium as gym
    import mujoco

    probe = gym.make(env_id).unwrapped
    model, data, skip = probe.model, mujoco.MjData(probe.model), probe.frame_skip
    ctrl = np.random.default_rng(0).uniform(-1, 1, (64, model.nu))
    i = iter(range(10**9))

    def step() -> None:
        data.ctrl[:] = ctrl[next(i) % 64]
        mujoco.mj_step(model, data, nstep=skip)
        if not np.isfinite(data.qpos).all() or data.time > 20:
            mujoco.mj_resetData(model, data)

    return _timed(step, 1, seconds)


def raw_torch(env_id: str, n: int, seconds: float) -> float:
    from genrl_envs.pointmass import make_torch_sim

    sim = make_torch_sim(env_id, n)
    sim.reset(0)
    act = torch.rand(n, 2) * 2 - 1
    return _timed(lambda: sim.step(act), n, seconds)


def part_raw(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    rows: dict[str, dict[int, float]] = {}

    def put(name: str, n: int, fn: Any) -> None:
        rate = statistics.median(fn() for _ in range(args.repeats))
        rows.setdefault(name, {})[n] = rate
        print(f"{name:34s} {n:5d} envs {rate:12,.0f} steps/s", flush=True)

    for n in args.n_envs:
        put("Hopper-v5 gymnasium SyncVectorEnv", n, lambda: raw_gymnasium("Hopper-v5", n, args.seconds))
        put("Hopper-v5 EnvPool sync", n, lambda: raw_envpool("Hopper-v5", n, args.seconds, False))
        if n > 1:
            put("Hopper-v5 EnvPool async (halves)", n, lambda: raw_envpool("Hopper-v5", n, args.seconds, True))
        put("MultiGoal gymnasium SyncVectorEnv", n, lambda: raw_gymnasium("genrl/MultiGoal-v0", n, args.seconds))
        put("MultiGoal torch-native", n, lambda: raw_torch("genrl/MultiGoal-v0", n, args.seconds))
    for n in (4096, 65536):
        put("MultiGoal torch-native", n, lambda: raw_torch("genrl/MultiGoal-v0", n, args.seconds))
    ceiling = statistics.median(raw_mujoco_ceiling("Hopper-v5", args.seconds) for _ in range(args.repeats))
    print(f"bare C MuJoCo Hopper-v5, one core: {ceiling:,.0f} steps/s", flush=True)
    return {"rows": rows, "mujoco_ceiling_one_core": ceiling}


# -- PPO end to end ----------------------------------------------------------------------------
def run_genrl(
    env_id: str, n_envs: int, steps: int, seed: int, out: Path, *, backend: str, vectorization: str = "sync", ppo: dict[str, Any] | None = None, save_every: int = 0
) -> dict[str, Any]:
    from genrl.config import config_from_dict
    from genrl.trainer import train

    s = dict(PPO if ppo is None else ppo)
    cfg = config_from_dict({
        "env": {"env_id": env_id, "n_envs": n_envs, "backend": backend, "vectorization": vectorization},
        "ppo": s, "run": {"total_steps": steps, "seed": seed, "out": str(out), "save_every": save_every, "save_minutes": 0,
                          "eval_episodes": 1, "progress": False, "torch_threads": 1},
    })  # fmt: skip
    t0 = time.perf_counter()
    run = train(cfg)
    wall = time.perf_counter() - t0
    with open(run / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    train_s = sum(float(r["time/rollout_s"]) + float(r["time/update_s"]) for r in rows)
    rets = [float(r["rollout/ep_return"]) for r in rows if r.get("rollout/ep_return")]
    split = {k: statistics.median(float(r[f"time/{k}"]) for r in rows[1:] or rows) for k in ("rollout_s", "update_s")}  # iterations after the first
    return {"sps": steps / train_s, "wall_s": wall, "last_return": rets[-1] if rets else float("nan"), **split}


def run_sb3(env_id: str, n_envs: int, steps: int, seed: int, subproc: bool) -> dict[str, Any]:
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    s = PPO
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed, vec_env_cls=SubprocVecEnv if subproc else DummyVecEnv)
    env = VecNormalize(venv, gamma=s["gamma"], clip_obs=10.0, clip_reward=10.0)
    lr0 = s["learning_rate"]
    model = SB3PPO(
        "MlpPolicy", env, n_steps=s["n_steps"], batch_size=s["n_steps"] * n_envs // s["n_minibatches"], n_epochs=s["n_epochs"],
        learning_rate=lambda frac: lr0 * frac, gamma=s["gamma"], gae_lambda=s["gae_lambda"], clip_range=s["clip_coef"],
        ent_coef=s["ent_coef"], vf_coef=s["vf_coef"], max_grad_norm=s["max_grad_norm"], seed=seed, device="cpu", verbose=0,
        policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh),
    )  # fmt: skip
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - t0
    env.close()
    return {"sps": model.num_timesteps / wall, "wall_s": wall}


def part_ppo(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    out = Path(args.out) / "ppo_runs"
    n, env_id = 8, "Hopper-v5"
    names = ["genrl gymnasium", "genrl envpool sync", "genrl envpool async", "sb3 DummyVecEnv", "sb3 SubprocVecEnv"]
    results: dict[str, list[float]] = {k: [] for k in names}
    split: dict[str, list[tuple[float, float]]] = {}  # genrl runs: (rollout s, update s) per iteration
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            if name.startswith("sb3"):
                r = run_sb3(env_id, n, args.steps, 1, subproc="Subproc" in name)
            else:
                backend = "gymnasium" if "gymnasium" in name else "envpool"
                r = run_genrl(env_id, n, args.steps, 1, out / f"{name.replace(' ', '-')}-{rep}", backend=backend,
                              vectorization="async" if "async" in name else "sync")  # fmt: skip
            results[name].append(r["sps"])
            if "rollout_s" in r:
                split.setdefault(name, []).append((r["rollout_s"], r["update_s"]))
            print(f"{name:22s} {r['sps']:8,.0f} steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    per_iter = {k: {"rollout_s": statistics.median(a for a, _ in v), "update_s": statistics.median(b for _, b in v)} for k, v in split.items()}
    return {"env": env_id, "n_envs": n, "steps": args.steps, "settings": PPO, "sps": med, "runs": results, "per_iteration": per_iter}


def part_many(args: argparse.Namespace) -> dict[str, Any]:
    """genrl Gaussian PPO (many-env preset: 16 steps per env, 4 minibatches, 4 epochs) on EnvPool
    against the raw EnvPool rate at the same env count."""
    torch.set_num_threads(1)
    out = Path(args.out) / "many_runs"
    ppo = {**PPO, "n_steps": 16, "n_minibatches": 4, "n_epochs": 4}
    rows = {}
    for n in args.many_envs:
        raw = statistics.median(raw_envpool("Hopper-v5", n, args.seconds, False) for _ in range(args.repeats))
        runs = [run_genrl("Hopper-v5", n, max(args.steps, n * 16 * 20), 1, out / f"n{n}-{rep}", backend="envpool", ppo=ppo)["sps"] for rep in range(args.repeats)]
        rows[n] = {"raw_envpool": raw, "genrl_ppo": statistics.median(runs)}
        print(f"{n:5d} envs: raw EnvPool {raw:,.0f}, genrl PPO {rows[n]['genrl_ppo']:,.0f} steps/s ({rows[n]['genrl_ppo'] / raw:.0%})", flush=True)
    return {"ppo": ppo, "rows": rows}


def part_multigoal(args: argparse.Namespace) -> dict[str, Any]:
    """PolicyFlow PPO (preset policyflow-multigoal) at 4096 envs: torch-native vs gymnasium back end."""
    from genrl.config import config_from_dict
    from genrl.trainer import build

    torch.set_num_threads(2)
    out: dict[str, Any] = {}
    for backend in ("torch", "gymnasium"):
        cfg = config_from_dict({"policy": "policyflow", "preset": "policyflow-multigoal", "env": {"backend": backend},
                                "run": {"total_steps": 10**9, "progress": False, "torch_threads": 2}})  # fmt: skip
        algo = build(cfg)
        algo.iterate()  # warm-up
        times = [algo.iterate() for _ in range(args.iterations)]
        algo.env.close()
        sps = statistics.median(m["time/sps"] for m in times)
        rollout = statistics.median(m["time/rollout_s"] for m in times)
        out[backend] = {"sps": sps, "rollout_s": rollout, "update_s": statistics.median(m["time/update_s"] for m in times)}
        print(f"PolicyFlow PPO, 4096 MultiGoal envs, {backend:9s}: {sps:,.0f} steps/s (rollout {rollout:.1f} s)", flush=True)
    return out


def part_parity(args: argparse.Namespace) -> dict[str, Any]:
    """Gaussian PPO on Hopper-v5, 8 envs, EnvPool vs gymnasium, ``--steps`` each: final returns.
    Runs live in ``<out>/parity/``; rerunning the command resumes unfinished ones."""
    from genrl.trainer import train

    torch.set_num_threads(1)
    res: dict[str, dict[int, float]] = {b: {} for b in args.backends}
    for seed in args.seeds:
        for backend in res:
            run = Path(args.out) / "parity" / f"{backend}-s{seed}"
            if (run / "checkpoints").is_dir():
                train(resume=run)
            else:
                run_genrl("Hopper-v5", 8, args.steps, seed, run, backend=backend, ppo=PPO, save_every=max(1, args.steps // 20))
            with open(run / "progress.csv") as f:
                rets = [float(r["rollout/ep_return"]) for r in csv.DictReader(f) if r.get("rollout/ep_return")]
            res[backend][seed] = float(np.mean(rets[-5:]))  # mean of the last five iterations' episodes
            print(f"parity {backend:9s} seed {seed}: {res[backend][seed]:.1f}", flush=True)
    return res


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "raw" in results:
        r = results["raw"]
        counts = sorted({n for row in r["rows"].values() for n in map(int, row)})
        lines += ["| back end | " + " | ".join(f"{n} envs" for n in counts) + " |", "|---|" + "---|" * len(counts)]
        for name, row in r["rows"].items():
            row = {int(k): v for k, v in row.items()}
            lines.append(f"| {name} | " + " | ".join(f"{row[n]:,.0f}" if n in row else "" for n in counts) + " |")
        lines += ["", f"Bare C MuJoCo Hopper-v5 (one core, frame_skip 4, no Python env): {r['mujoco_ceiling_one_core']:,.0f} steps/s.", ""]
    if "ppo" in results:
        p = results["ppo"]
        sb3 = p["sps"]["sb3 DummyVecEnv"]
        lines += [f"Gaussian PPO, {p['env']}, {p['n_envs']} envs, {p['steps']} steps, identical settings:", "", "| run | steps/s | vs SB3 DummyVecEnv |", "|---|---|---|"]
        lines += [f"| {k} | {v:,.0f} | {v / sb3:.2f}x |" for k, v in p["sps"].items()]
        lines.append("")
        for k, t in p.get("per_iteration", {}).items():
            lines.append(f"- {k}: rollout {t['rollout_s']:.2f} s + update {t['update_s']:.2f} s per iteration (median)")
        lines.append("")
    if "many" in results:
        lines += ["| envs | raw EnvPool | genrl PPO (many-env settings) | share |", "|---|---|---|---|"]
        for n, row in results["many"]["rows"].items():
            lines.append(f"| {n} | {row['raw_envpool']:,.0f} | {row['genrl_ppo']:,.0f} | {row['genrl_ppo'] / row['raw_envpool']:.0%} |")
        lines.append("")
    if "multigoal" in results:
        m = results["multigoal"]
        lines += [f"PolicyFlow PPO at 4096 MultiGoal envs: torch-native {m['torch']['sps']:,.0f} steps/s, gymnasium {m['gymnasium']['sps']:,.0f} "
                  f"({m['torch']['sps'] / m['gymnasium']['sps']:.1f}x).", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["raw", "ppo", "many", "multigoal", "parity", "all"])
    p.add_argument("--n-envs", type=int, nargs="+", default=[1, 8, 64, 1024])
    p.add_argument("--many-envs", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=65536)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--backends", nargs="+", default=["gymnasium", "envpool"], choices=["gymnasium", "envpool"], help="back ends of the parity part")
    p.add_argument("--seconds", type=float, default=2.0, help="timing window of each raw rate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iterations", type=int, default=2, help="PPO iterations timed in the multigoal part")
    p.add_argument("--out", default="bench_out/envs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"raw": part_raw, "ppo": part_ppo, "many": part_many, "multigoal": part_multigoal, "parity": part_parity}
    chosen = [k for k in parts if k != "parity"] if args.part == "all" else [args.part]
    results: dict[str, Any] = {}
    for name in chosen:
        results[name] = parts[name](args)
        (out / f"{name}.json").write_text(json.dumps(results[name], indent=2, default=str))
    for name in parts:  # earlier invocations' parts: one results.md for everything measured in this folder
        if name not in results and (out / f"{name}.json").is_file():
            results[name] = json.loads((out / f"{name}.json").read_text())
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

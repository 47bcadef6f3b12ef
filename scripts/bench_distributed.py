"""Data-parallel training (genrl.distributed): 1 process vs N processes, same global batch and budget.

    python scripts/bench_distributed.py --env Hopper-v5 --steps 50000 --seeds 1
    python scripts/bench_distributed.py --env Hopper-v5 --steps 4096 --n-steps 512 --seeds 1   # smoke
    python scripts/bench_distributed.py --algo flow-grpo --steps 1536 --seeds 1                 # digits model

``--algo flow-grpo``: Flow-GRPO on the shipped digits model (4 prompts x 8 images per iteration,
2 optimiser steps per iteration, so each process trains on 16 images per step), throughput in
scored images per second (``time/images_per_s``) and the last evaluation's p(digit).

Gaussian PPO with genrl's defaults (MuJoCo settings) and ``--n-envs`` envs in total: one process
steps all of them, each of ``--procs`` torchrun processes (gloo, CPU, one torch thread each) steps
``n_envs / procs`` of them, so the global batch (n_steps x n_envs), the minibatches, the
iterations and ``run.total_steps`` are the same. Throughput is the mean of ``time/sps`` (global
env steps per second of an iteration, rank 0's clock) over every iteration but the first;
``wall_s`` is the whole command (start, evaluation, checkpoints included). The final evaluation
(``--eval-episodes``, deterministic) comes from the run's last log row. Writes
``<out>/results.json`` and the runs under ``<out>/runs/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(procs: int, seed: int, args: argparse.Namespace, runs: Path) -> dict[str, Any]:
    image = args.algo == "flow-grpo"
    run_dir = runs / f"{'digits-flow-grpo' if image else args.env.replace('/', '_')}-p{procs}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    common = ["--steps", str(args.steps), "--seed", str(seed), "--out", str(run_dir), "--no-progress", "--save-every", "0",
              "--set", f"run.distributed={'off' if procs == 1 else 'ddp'}", "--set", f"run.torch_threads={args.baseline_threads if procs == 1 else 1}"]  # fmt: skip
    if image:
        train = ["-m", "genrl", "train", "--env", "t2i", "--algo", "flow-grpo", *common, "--set", "grpo.prompts_per_iter=4",
                 "--set", "grpo.group_size=8", "--set", "grpo.updates_per_epoch=2", "--set", f"run.eval_every={args.steps}"]  # fmt: skip
    else:
        train = ["-m", "genrl", "train", "--env", args.env, "--policy", "gaussian", "--n-envs", str(args.n_envs // procs),
                 "--eval-episodes", str(args.eval_episodes), "--set", f"ppo.n_steps={args.n_steps}", *common]  # fmt: skip
    for item in args.sets:
        train += ["--set", item]
    if procs == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *train]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.baseline_threads if procs == 1 else 1)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader((run_dir / "progress.csv").open()))
    rate, score = ("time/images_per_s", "eval/reward_digit") if image else ("time/sps", "eval/return_mean")
    sps = [float(r[rate]) for r in rows if r.get(rate)]
    last_eval = next((float(r[score]) for r in reversed(rows) if r.get(score)), math.nan)
    return {"procs": procs, "seed": seed, "steps": int(rows[-1]["step"]), "iterations": len(rows),
            "sps": statistics.fmean(sps[1:] or sps), "wall_s": wall, "eval_return": last_eval, "run": str(run_dir)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", default="ppo", choices=["ppo", "flow-grpo"], help="Gaussian PPO on --env, or Flow-GRPO on the digits model")
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--steps", type=int, default=50_000, help="global env steps of each run")
    p.add_argument("--seeds", type=int, default=1, help="seeds 1..N")
    p.add_argument("--procs", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--n-envs", type=int, default=2, dest="n_envs", help="envs in total (split over the processes)")
    p.add_argument("--n-steps", type=int, default=2048, dest="n_steps", help="ppo.n_steps (rollout length per env)")
    p.add_argument("--eval-episodes", type=int, default=10, dest="eval_episodes")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE", help="more config fields for both runs (genrl train --set)")
    p.add_argument("--baseline-threads", type=int, default=1, dest="baseline_threads", help="torch threads of the 1-process run (each of N processes: 1)")
    p.add_argument("--out", default=str(ROOT / "bench_out" / "distributed"))
    args = p.parse_args()
    if args.n_envs % args.procs:
        raise SystemExit(f"--n-envs {args.n_envs} does not split over --procs {args.procs}")
    out = Path(args.out) / f"{args.algo}-t{args.baseline_threads}-e{args.n_envs}" / "-".join(x.replace("=", "") for x in args.sets)
    unit = "images" if args.algo == "flow-grpo" else "env steps"
    results = []
    for seed in range(1, args.seeds + 1):
        for procs in (1, args.procs):
            r = run_one(procs, seed, args, out / "runs")
            results.append(r)
            print(f"seed {seed} | {procs} process(es) | {r['sps']:.1f} {unit}/s | eval {r['eval_return']:.3f} | wall {r['wall_s']:.1f} s", flush=True)
    summary: dict[str, Any] = {}
    for procs in (1, args.procs):
        mine = [r for r in results if r["procs"] == procs]
        summary[str(procs)] = {"sps": statistics.fmean(r["sps"] for r in mine), "eval_return": statistics.fmean(r["eval_return"] for r in mine)}
    ratio = summary[str(args.procs)]["sps"] / summary["1"]["sps"]
    what = "digits Flow-GRPO" if args.algo == "flow-grpo" else args.env
    print(f"{what}: 1 process {summary['1']['sps']:.1f} {unit}/s, {args.procs} processes {summary[str(args.procs)]['sps']:.1f} "
          f"{unit}/s: throughput x{ratio:.2f}; eval {summary['1']['eval_return']:.3f} vs {summary[str(args.procs)]['eval_return']:.3f}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("algo", "env", "steps", "seeds", "procs", "n_envs", "n_steps", "eval_episodes", "baseline_threads", "sets")}
    (out / "results.json").write_text(json.dumps({"settings": settings, "runs": results, "summary": summary, "throughput_ratio": ratio}, indent=2))
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

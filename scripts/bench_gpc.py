"""GPC on genrl's own tasks: demonstrations -> behaviour-cloned parents -> weight search on validation
seeds -> the chosen composition and each parent on separate test seeds; plus a weak + strong pair
and BC -> PPO fine-tuning. Every stage skips what an earlier invocation finished, so the command
resumes.

    python scripts/bench_gpc.py --task cube --out bench_out/gpc      # OGBench cube-single, task 1
    python scripts/bench_gpc.py --task maze --out bench_out/gpc      # genrl/PointMaze-v0
    python scripts/bench_gpc.py --task maze-timed --skip moderate weak ppo --out bench_out/gpc   # blind-axis sensors, 60-step limit
    python scripts/bench_gpc.py --task cube --diffusion-steps 6000 --skip moderate weak ppo   # the views pair alone

Parents (moderate on purpose, as the paper studies): a DDPM diffusion policy and an FPO flow
policy cloned from the same demonstrations for ``--bc-steps`` gradient steps each; the weak parent
of the weak + strong pair gets ``--weak-steps``. Sampling is deterministic (the noise-free DDPM path
from x_K = 0; FPO still draws its initial noise), as Diffusion Policy evaluates with DDIM.
The different-sensors pair (``views``): two diffusion parents cloned for ``--diffusion-steps``
from the same demonstrations, each through its own coarse sensor (``env.obs_resolution``): one
rounds the x coordinate of the object the task hinges on (the cube; the point in the maze) to
``--view-step``, the other its y coordinate (a step wider than the coordinate's range blinds that
sensor along its axis: maze-timed's default), the paper's setting of one state seen through two
inputs with complementary errors.
Writes ``<out>/<task>/results.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TASKS = {
    # views: the observation dimensions each parent of the different-sensors pair sees coarsely
    # (cube: the cube's x / y position, 10 units per metre; maze: the point's x / y, 1 unit per cell)
    "cube": {"env_id": "cube-single-singletask-task1-v0", "episodes": 100, "views": ([19], [20]), "view_step": 0.5},
    "maze": {"env_id": "genrl/PointMaze-v0", "episodes": 100, "views": ([0], [1]), "view_step": 0.5},
    # the maze with an 80-step limit (the expert needs 32): success then means reaching the goal without wandering. 80 was
    # chosen on validation seeds so that both blind-axis parents are moderate (0.60 and 0.38 of 100 validation episodes)
    "maze-timed": {"env_id": "genrl/PointMaze-v0", "env_kwargs": {"max_episode_steps": 80}, "episodes": 100, "views": ([0], [1]), "view_step": 100.0},
}
CHUNKS = {"horizon": 8, "n_obs_steps": 2, "n_action_steps": 4}


def demos(task: str, root: Path) -> Path:
    from genrl.datasets import save_demos
    from genrl_envs.experts import record_demos

    path = root / "demos.safetensors"
    if not path.is_file():
        t = TASKS[task]
        data = record_demos(t["env_id"], t["episodes"], seed=0)
        save_demos(path, data, data["meta"])
    return path


def bc_parent(task: str, family: str, data: Path, steps: int, out: Path, seed: int = 0, view: dict[str, float] | None = None) -> Path:
    from genrl.config import config_from_dict
    from genrl.trainer import train

    if (out / "final").is_dir():
        return out
    if (out / "checkpoints").is_dir():
        return train(resume=out)
    pc: dict[str, Any] = {"hidden_sizes": [256, 256, 256]}
    if family == "fpo":
        pc["n_steps"] = 10
    cfg = config_from_dict({
        "algo": "bc", "policy": family, "env": {"env_id": TASKS[task]["env_id"], "env_kwargs": TASKS[task].get("env_kwargs", {}), **CHUNKS, "obs_resolution": view or {}},
        "policy_config": pc,
        "algo_config": {"dataset": str(data), "updates_per_iter": 500},
        "run": {"total_steps": steps, "seed": seed, "out": str(out), "save_every": 500, "eval_episodes": 30, "progress": False},
    })  # fmt: skip
    return train(cfg)


def compose_pair(parents: list[Path], out: Path, val: int, test: int) -> dict[str, Any]:
    from genrl.compose import compose_main

    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    return compose_main([str(p) for p in parents], do_search=True, weights=None, val_episodes=val, test_episodes=test,
                        grid_step=0.1, deterministic=True, out=out)  # fmt: skip


def fine_tune(task: str, parent: Path, steps: int, out: Path, test: int) -> dict[str, Any]:
    """PPO from the cloned diffusion parent (last 5 of 10 denoising steps fine-tuned, DPPO-style)
    and the success rate before / after on the test seeds."""
    from genrl.compose import TEST_SEED, load_parents, run_episodes
    from genrl.config import config_from_dict
    from genrl.trainer import train

    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    if (out / "checkpoints").is_dir():
        train(resume=out)
    else:
        cfg = config_from_dict({
            "policy": "diffusion", "init_from": str(parent),
            "env": {"env_id": TASKS[task]["env_id"], "env_kwargs": TASKS[task].get("env_kwargs", {}), "n_envs": 8, **CHUNKS},
            "policy_config": {"hidden_sizes": [256, 256, 256], "ft_denoising_steps": 5},
            "ppo": {"n_steps": 64, "n_minibatches": 4, "n_epochs": 5, "learning_rate": 1e-5, "clip_coef": 0.01, "anneal_lr": False, "max_grad_norm": 1.0},
            "run": {"total_steps": steps, "seed": 0, "out": str(out), "save_every": max(512, steps // 10), "eval_episodes": 30, "progress": False},
        })  # fmt: skip
        train(cfg)
    before = run_episodes(load_parents([parent, parent]), (1.0, 0.0), TEST_SEED, test, deterministic=True)
    after = run_episodes(load_parents([out, out]), (1.0, 0.0), TEST_SEED, test, deterministic=True)
    res = {"before": before.summary(), "after": after.summary(), "ppo_steps": steps}
    result.write_text(json.dumps(res, indent=2))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=list(TASKS), default="cube")
    p.add_argument("--bc-steps", type=int, default=2000)
    p.add_argument("--diffusion-steps", type=int, help="BC steps of the diffusion parent (default --bc-steps)")
    p.add_argument("--fpo-steps", type=int, help="BC steps of the flow parent (default --bc-steps)")
    p.add_argument("--weak-steps", type=int, default=500)
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--test-episodes", type=int, default=200)
    p.add_argument("--ppo-steps", type=int, default=20_000)
    p.add_argument("--views-seed", type=int, default=0, help="training seed of the views pair's parents (another pair per seed)")
    p.add_argument("--view-step", type=float, help="resolution of the coarse sensors of the views pair (default per task)")
    p.add_argument("--skip", nargs="*", default=[], choices=["moderate", "weak", "views", "ppo"])
    p.add_argument("--out", default="bench_out/gpc")
    args = p.parse_args()
    from genrl.compose import markdown

    root = Path(args.out) / args.task
    root.mkdir(parents=True, exist_ok=True)
    data = demos(args.task, root)
    diff_steps = args.diffusion_steps or args.bc_steps
    diff = bc_parent(args.task, "diffusion", data, diff_steps, root / "bc-diffusion")
    lines: list[str] = []
    if "moderate" not in args.skip:
        flow = bc_parent(args.task, "fpo", data, args.fpo_steps or args.bc_steps, root / "bc-fpo")
        lines += ["## Moderate pair: diffusion + flow", "", markdown(compose_pair([diff, flow], root / "gpc-diffusion-fpo", args.val_episodes, args.test_episodes))]
    if "views" not in args.skip:
        step = args.view_step or TASKS[args.task]["view_step"]
        parents = []
        for axis, dims in zip("xy", TASKS[args.task]["views"], strict=True):
            view = {str(d): step for d in dims}
            name = f"bc-diffusion-coarse-{axis}-{step:g}" + (f"-s{args.views_seed}" if args.views_seed else "")
            parents.append(bc_parent(args.task, "diffusion", data, diff_steps, root / name, seed=args.views_seed, view=view))
        tag = f"{step:g}" + (f"-s{args.views_seed}" if args.views_seed else "")
        rep = compose_pair(parents, root / f"gpc-views-{tag}", args.val_episodes, args.test_episodes)
        lines += ["", f"## Different sensors: coarse x vs coarse y (step {step:g})", "", markdown(rep)]
    if "weak" not in args.skip:
        weak = bc_parent(args.task, "fpo", data, args.weak_steps, root / "bc-fpo-weak", seed=1)
        rep = compose_pair([diff, weak], root / "gpc-strong-weak", args.val_episodes, args.test_episodes)
        lines += ["", "## Weak + strong pair", "", markdown(rep)]
    if "ppo" not in args.skip:
        ft = fine_tune(args.task, diff, args.ppo_steps, root / "ppo-from-bc", args.test_episodes)
        b, a = ft["before"], ft["after"]
        lines += ["", f"## BC -> PPO ({ft['ppo_steps']} env steps)", "",
                  f"success on the test seeds: {b['success_rate']:.3f} [{b['success_ci95'][0]:.3f}, {b['success_ci95'][1]:.3f}] -> "
                  f"{a['success_rate']:.3f} [{a['success_ci95'][0]:.3f}, {a['success_ci95'][1]:.3f}]"]  # fmt: skip
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

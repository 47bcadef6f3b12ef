"""``genrl train | eval | plot | demos``: the command line over the Python API.

Errors in the input (unknown ids, invalid values, missing or corrupt checkpoints) print one
line on stderr and exit with status 2; no traceback (set GENRL_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from genrl.errors import GenrlError


def _parse_value(text: str) -> Any:
    """A --set value: TOML scalar/array syntax, falling back to a bare string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise GenrlError(f"--set {dotted}: '{k}' is not a section")
    data[keys[-1]] = value


def build_parser() -> argparse.ArgumentParser:
    import genrl

    p = argparse.ArgumentParser(prog="genrl", description="RL with generative policies: control (PPO for Gaussian, mixture, "
                                "flow, diffusion and GoRL policies) and text-to-image fine-tuning (Flow-GRPO, G2RPO).")  # fmt: skip
    p.add_argument("--version", action="version", version=f"genrl {genrl.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy (or --resume a run)",
                       description="Flags override --config, which overrides --preset, which overrides the defaults "
                       "(`genrl config` lists every key with its default).")  # fmt: skip
    t.add_argument("--env", help="gymnasium id (default Hopper-v5), module:EnvId for your own registered env, or t2i for text-to-image")
    t.add_argument("--model", help="t2i: 'digits' (default, shipped) or a local diffusers pipeline folder (e.g. SD3.5-Medium)")
    t.add_argument("--reward", help="t2i: reward spec (default digit): name, name=weight,... e.g. digit=1,jpeg_compressibility=0.1, clip:DIR, module:function")
    t.add_argument("--prompts", help="t2i: prompts file (one per line, or a JSON list) or a built-in set (default: the model's, digits)")
    t.add_argument("--policy", help="control policy family (default gaussian): gaussian | pmoe | policyflow | fpo | diffusion | gorl")
    t.add_argument("--algo", help="algorithm: ppo (control, default) | flow-grpo (t2i default) | g2rpo")
    t.add_argument("--steps", type=int, help="total env steps, rounded up to whole iterations (default 1,000,000; t2i: scored images, 2048); "
                   "with --resume: extend the run to this many")  # fmt: skip
    t.add_argument("--seed", type=int, help="seed of everything: envs, networks, sampling (default 1)")
    t.add_argument("--out", help="run folder; must be new or empty (default runs/<env>__<policy or algo>__<seed>__<date-time>)")
    t.add_argument("--n-envs", type=int, dest="n_envs", help="parallel envs (default 1); a rollout is ppo.n_steps per env")
    t.add_argument("--save-every", type=int, dest="save_every", help="checkpoint every N env steps (default: a tenth of the run; 0: end only)")
    t.add_argument("--eval-every", type=int, dest="eval_every", help="evaluate every N env steps (default 0: at the end only)")
    t.add_argument("--eval-episodes", type=int, dest="eval_episodes", help="evaluation episodes (default 10; t2i: seeds per prompt, 4)")
    t.add_argument("--device", help="cpu (default) | cuda | cuda:N")
    t.add_argument("--config", help="TOML / YAML / JSON file of config fields (see `genrl config`)")
    t.add_argument("--dataset", metavar="FILE", help="--algo bc: the demonstrations to clone (genrl demos --out FILE)")
    t.add_argument("--init-from", dest="init_from", metavar="DIR", help="start the policy from a run, checkpoint or exported agent (e.g. behaviour cloning -> PPO)")
    t.add_argument("--preset", help="a method's paper settings under your own: paper (the family's) or a name from `genrl presets`")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, repeatable, e.g. --set ppo.learning_rate=1e-4")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest readable checkpoint")
    t.add_argument("--dry-run", action="store_true", dest="dry_run",
                   help="check the config and print the model sizes and estimated peak memory per device, then exit; writes nothing")  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per iteration instead)")
    t.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (pip install genrl[wandb]; WANDB_MODE=offline works)")

    e = sub.add_parser("eval", help="evaluate a run's newest (or chosen) checkpoint, or an exported agent folder")
    e.add_argument("run", help="run folder, checkpoint folder, or exported agent folder (<run>/final)")
    e.add_argument("--env", help="evaluate on another compatible env id (default: the training env)")
    e.add_argument("--episodes", type=int, default=10, help="episodes (default 10)")
    e.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    e.add_argument("--video", action="store_true", help="write <run>/videos/eval-<step>.mp4 of the first episode")
    e.add_argument("--seed", type=int, default=0, help="seed of the evaluation episodes (default 0)")
    e.add_argument("--stochastic", action="store_true", help="sample actions instead of the deterministic mode")
    e.add_argument("--seeds", type=int, default=4, help="text-to-image runs: fixed seeds per prompt in the grid (default 4)")

    sm = sub.add_parser("sample", help="text-to-image runs: a labelled grid for your own prompts")
    sm.add_argument("run", help="a --env t2i run folder")
    sm.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more rows)")
    sm.add_argument("--seeds", type=int, default=4, help="images per prompt, seeds 0..N-1 (default 4)")
    sm.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    sm.add_argument("-o", "--out", help="PNG path (default: <run>/images/eval-<step>.png)")

    c = sub.add_parser("config", help="every config key with its type, default and meaning (what --set and --config accept)")
    c.add_argument("--policy", help="also list this policy family's policy_config keys (default gaussian)")
    c.add_argument("--algo", help="ppo (default) or a text-to-image algorithm (flow-grpo, g2rpo)")

    pr = sub.add_parser("presets", help="print every preset (each method's paper / reference-code settings) in full")
    pr.add_argument("name", nargs="?", help="only this preset")

    d = sub.add_parser("demos", help="record a scripted expert's demonstrations to a .safetensors file (for behaviour cloning)",
                       description="File format: the genrl.datasets module. Supported envs: genrl/PointMaze-v0 (left/right routes), "
                       "OGBench cube-single-v0 and cube-single-singletask[-taskK]-v0 (pip install ogbench).")  # fmt: skip
    d.add_argument("--env", required=True, help="env id with a scripted expert, e.g. genrl/PointMaze-v0 or cube-single-singletask-task1-v0")
    d.add_argument("--episodes", type=int, default=100, help="episodes to record (default 100)")
    d.add_argument("--out", required=True, help="output .safetensors path")
    d.add_argument("--seed", type=int, default=0, help="episode i resets with seed S + i (default 0)")
    d.add_argument("--max-steps", type=int, dest="max_steps", help="episode time limit (default: the env's)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="env keyword argument (e.g. reset_noise=0.05), or expert.KEY=VALUE for the expert (e.g. expert.p_left=0.7, expert.noise=0.1)")  # fmt: skip
    d.add_argument("--force", action="store_true", help="overwrite an existing genrl demos file")

    cp = sub.add_parser("compose", help="compose trained diffusion / flow agents at test time (GPC): search the weight on validation seeds, report on test seeds")
    cp.add_argument("--policies", nargs="+", required=True, metavar="DIR", help="2-4 runs, checkpoints or exported agents of one env")
    how = cp.add_mutually_exclusive_group(required=True)
    how.add_argument("--search", action="store_true", help="grid-search the weights on validation seeds")
    how.add_argument("--weights", nargs="+", type=float, help="evaluate these convex weights (one per policy, summing to 1)")
    cp.add_argument("--val-episodes", type=int, default=100, dest="val_episodes", help="validation episodes per weight (default 100)")
    cp.add_argument("--test-episodes", type=int, default=200, dest="test_episodes", help="test episodes per policy (default 200)")
    cp.add_argument("--grid-step", type=float, default=0.1, dest="grid_step", help="weight grid spacing (default 0.1)")
    cp.add_argument("--deterministic", action="store_true", help="noise-free sampling (default: stochastic, as GPC samples)")
    cp.add_argument("--out", help="folder for report.json, report.md and weights.png")

    pl = sub.add_parser("plot", help="learning curves from runs' progress.csv")
    pl.add_argument("runs", nargs="+", help="run folders")
    pl.add_argument("-o", "--out", default="curves.png", help="PNG path (default curves.png)")
    pl.add_argument("--group", action="store_true", help="one curve per run name without its seed and time: mean and 95%% band over seeds")
    return p


def _train(args: argparse.Namespace) -> int:
    from genrl.config import IMAGE_ALGOS, config_from_dict, image_layout, load_config_file, merge
    from genrl.trainer import train

    if args.resume:
        fixed = ("env", "policy", "algo", "seed", "out", "n_envs", "config", "preset", "model", "reward", "prompts", "device", "init_from", "dataset")
        given = [k for k in fixed if getattr(args, k) is not None]
        if given or args.set:
            bad = ", ".join("--" + g.replace("_", "-") for g in given) or "--set"
            raise GenrlError(
                f"--resume continues the run's own config; {bad} would change the run (allowed: --steps to extend, --save-every, --eval-every, --eval-episodes, --no-progress)"
            )
        overrides = {k: getattr(args, k) for k in ("save_every", "eval_every", "eval_episodes") if getattr(args, k) is not None}
        if args.no_progress:
            overrides["progress"] = False
        if args.wandb:
            overrides["wandb"] = True
        run = train(resume=args.resume, extend_to=args.steps, overrides=overrides)
    else:
        data: dict[str, Any] = image_layout(load_config_file(args.config)) if args.config else {}
        image = args.env == "t2i" or (args.algo or data.get("algo")) in IMAGE_ALGOS
        if image and args.env not in (None, "t2i"):
            raise GenrlError(f"--env {args.env} does not apply to --algo {args.algo or data.get('algo')} (text-to-image: --env t2i)")
        control_only = [k for k in ("policy", "n_envs") if image and getattr(args, k) is not None]
        image_only = [k for k in ("model", "reward", "prompts") if not image and getattr(args, k) is not None]
        if control_only or image_only:
            bad = (control_only or image_only)[0].replace("_", "-")
            raise GenrlError(f"--{bad} does not apply to {'--env t2i' if image else 'control envs'}")
        flags = {
            "preset": args.preset,
            "init_from": args.init_from,
            "algo_config.dataset": args.dataset,
            "env.env_id": args.env,
            "policy": args.policy,
            "algo": args.algo,
            "run.total_steps": args.steps,
            "run.seed": args.seed,
            "run.out": args.out,
            "env.n_envs": args.n_envs,
            "run.save_every": args.save_every,
            "run.eval_every": args.eval_every,
            "run.eval_episodes": args.eval_episodes,
            "run.device": args.device,
        }
        if image:
            flags = {("env" if k == "env.env_id" else k): v for k, v in flags.items() if k not in ("policy", "env.n_envs")}
            flags.update({"t2i.model": args.model, "t2i.reward": args.reward, "t2i.prompts": args.prompts})
        over: dict[str, Any] = {}
        for key, value in flags.items():
            if value is not None:
                _set_path(over, key, value)
        if args.no_progress:
            _set_path(over, "run.progress", False)
        if args.wandb:
            _set_path(over, "run.wandb", True)
        for item in args.set:
            if "=" not in item:
                raise GenrlError(f"--set expects KEY=VALUE, got '{item}'")
            key, value = item.split("=", 1)
            _set_path(over, key.strip(), _parse_value(value.strip()))
        cfg = config_from_dict(merge(data, over))
        if not image:
            from genrl_envs import check_env_id

            check_env_id(cfg.env.env_id)
        if args.dry_run:
            print(_dry_run(cfg, image))
            return 0
        run = train(cfg)
    extra = ", images/" if (Path(run) / "images").is_dir() else ""
    if os.environ.get("RANK", "0") == "0":  # torchrun: one line, from rank 0
        print(f"run written to {run} (progress.csv, tb/, checkpoints/, curves.png, final/{extra})")
    return 0


def _dry_run(cfg: Any, image: bool) -> str:
    """What ``--dry-run`` prints: the estimate of genrl.memory (t2i), or the networks' and the
    replay buffer's sizes (control); nothing is written."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if image:
        from genrl.memory import estimate_image_memory, format_estimate

        return format_estimate(estimate_image_memory(cfg, world_size=world))
    import torch

    from genrl.trainer import build

    algo = build(cfg)
    try:
        nets = {n: sum(p.numel() for p in m.parameters()) for n in ("policy", "critic") if isinstance(m := getattr(algo, n, None), torch.nn.Module)}
        lines = [f"{cfg.algo} / {cfg.policy} on {cfg.env.env_id}: " + ", ".join(f"{n} {c:,} parameters" for n, c in nets.items())]
        buffer = getattr(algo, "buffer", None)
        if buffer is not None:
            size = sum(t.numel() * t.element_size() for t in vars(buffer).values() if isinstance(t, torch.Tensor))
            lines.append(f"replay buffer: {buffer.rows:,} rows x {buffer.n_envs} envs = {size / 2**30:.2f} GiB on {cfg.run.device} (per process)")
        lines.append(f"{algo.n_iterations} iterations of {algo.steps_per_iter} env steps ({world} process(es))")
        return "\n".join(lines)
    finally:
        algo.env.close()


def _is_image_run(run: Path) -> bool:
    import json

    from genrl.config import IMAGE_ALGOS

    try:
        data = json.loads((run / "config.json").read_text())
        return data.get("env") == "t2i" or data.get("algo") in IMAGE_ALGOS
    except (OSError, ValueError, AttributeError):
        return False


def _eval_image(args: argparse.Namespace, prompts: list[str] | None = None, out: str | None = None) -> int:
    from genrl.image_trainer import evaluate_run

    path, res = evaluate_run(args.run, step=args.step, seeds=args.seeds, prompts=prompts, out=out)
    print(" ".join(f"{k} {v:.4f}" for k, v in res.items()))
    print(f"grid: {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    if not _is_image_run(Path(args.run)):
        raise GenrlError(f"{args.run} is not a text-to-image run (genrl sample draws images of --env t2i runs)")
    return _eval_image(args, prompts=args.prompt, out=args.out)


def _eval(args: argparse.Namespace) -> int:
    from genrl.agent import Agent

    run = Path(args.run)
    if _is_image_run(run):
        return _eval_image(args)
    agent = Agent.load(run, step=args.step)
    video = run / "videos" / f"eval-{agent.step}.mp4" if args.video else None
    res = agent.evaluate(args.env, episodes=args.episodes, seed=args.seed, deterministic=not args.stochastic, video_path=video)
    env_id = args.env or agent.env_id
    print(f"{env_id} {agent.family} step {agent.step}: return {res['eval/return_mean']:.2f} +/- {res['eval/return_std']:.2f} over {args.episodes} episodes")
    if video is not None:
        print(f"video: {video}")
    return 0


def _demos(args: argparse.Namespace) -> int:
    from collections import Counter

    from genrl.datasets import is_demos_file, save_demos
    from genrl_envs.experts import SUPPORTED_ENVS, record_demos

    if args.env not in SUPPORTED_ENVS:
        raise GenrlError(f"no scripted expert for '{args.env}'; supported: {', '.join(SUPPORTED_ENVS)}")
    if args.episodes < 1:
        raise GenrlError(f"--episodes must be >= 1, got {args.episodes}")
    out = Path(args.out)
    if out.exists() and not is_demos_file(out):
        raise GenrlError(f"{out} exists and is not a genrl demos file; not overwriting it")
    if out.exists() and not args.force:
        raise GenrlError(f"{out} exists; pass --force to overwrite it")
    env_kwargs: dict[str, Any] = {}
    expert: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            raise GenrlError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = (part.strip() for part in item.split("=", 1))
        target, key = (expert, key[7:]) if key.startswith("expert.") else (env_kwargs, key.removeprefix("env."))
        target[key] = _parse_value(value)
    data = record_demos(args.env, args.episodes, seed=args.seed, env_kwargs=env_kwargs, max_steps=args.max_steps, expert_options=expert)
    save_demos(out, data)
    n, lengths, wins = len(data["lengths"]), data["lengths"], int(data["success"].sum())
    line = f"wrote {out}: {n} episodes, {int(lengths.sum())} steps (length {lengths.min()}-{lengths.max()}, mean {lengths.mean():.1f}), success {wins}/{n} ({100 * wins / n:.1f}%)"
    for key, label, name in (("route_taken", "routes taken", "{}"), ("task_id", "tasks", "task{}")):
        counts = Counter(e[key] for e in data["meta"]["episodes"] if key in e)
        if counts:
            line += f"; {label}: " + ", ".join(f"{name.format(k)} {v}" for k, v in sorted(counts.items()))
    print(line)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from genrl.presets import PRESETS, describe

    if args.name is not None and args.name not in PRESETS:
        raise GenrlError(f"unknown preset '{args.name}'; valid: {', '.join(PRESETS)}")
    names = [args.name] if args.name else list(PRESETS)
    print("\n\n".join(describe(PRESETS[n]) for n in names))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from genrl.plot import plot_groups, plot_runs

    print(plot_groups(args.runs, args.out) if args.group else plot_runs(args.runs, args.out))
    return 0


def _config(args: argparse.Namespace) -> int:
    from genrl.config import describe_config

    print(describe_config(args.algo or "ppo", args.policy or "gaussian"))
    return 0


def _compose(args: argparse.Namespace) -> int:
    from genrl.compose import compose_main, markdown

    if args.val_episodes < 1 or args.test_episodes < 1:
        raise GenrlError("--val-episodes and --test-episodes must be >= 1")
    report = compose_main(
        args.policies, do_search=args.search, weights=args.weights, val_episodes=args.val_episodes, test_episodes=args.test_episodes,
        grid_step=args.grid_step, deterministic=args.deterministic, out=args.out,
    )  # fmt: skip
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    from genrl.runs import Interrupted

    args = build_parser().parse_args(argv)
    handlers = {"train": _train, "eval": _eval, "sample": _sample, "plot": _plot, "presets": _presets, "config": _config, "demos": _demos, "compose": _compose}
    try:
        return handlers[args.command](args)
    except (GenrlError, ValueError, OSError, TypeError) as exc:
        if os.environ.get("GENRL_DEBUG"):
            raise
        print(f"genrl: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"genrl: stopped by {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("genrl: interrupted; checkpoints already written are intact (genrl train --resume RUN continues from the newest)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Flow-GRPO vs G2RPO on the digits model with the classifier reward.

Every run goes through the real trainer (``genrl train --env t2i`` = ``train_image``), so each
leaves a full run folder (progress.csv, TensorBoard, image grids, checkpoints, exported LoRA).
The script then reports:

* reward vs number of scored images, mean +- std over seeds (a plot and a table);
* evaluation grids before/after (ODE sampling, fixed prompts and seeds);
* throughput (images/s) with the cost split into sampling, reward and training;
* the training loop's overhead beyond the model calls, measured with ``torch.profiler``
  (time inside the transformer's forward and backward vs the iteration's wall time).

    python scripts/bench_t2i.py --seeds 1 2 3 --images 3072 --out bench_out/t2i
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genrl.algos.grpo import GRPOConfig  # noqa: E402
from genrl.config import RunConfig, TrainConfig, image_config  # noqa: E402
from genrl.image_trainer import build_image, train_image  # noqa: E402
from genrl.logger import read_csv  # noqa: E402


def grpo_config(algo: str, args: argparse.Namespace) -> GRPOConfig:
    common = dict(n_steps=10, group_size=args.group_size, lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank, learning_rate=args.lr)
    if algo == "g2rpo":
        return GRPOConfig(prompts_per_iter=args.prompts_g2rpo, granularities=(1, 2), **common)  # type: ignore[arg-type]
    return GRPOConfig(prompts_per_iter=args.prompts, updates_per_epoch=2, **common)  # type: ignore[arg-type]


def run_config(algo: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    out = Path(args.out) / f"{algo}-s{seed}"
    return image_config(
        model=args.model, reward=args.reward, algo=algo, grpo=grpo_config(algo, args),
        run=RunConfig(total_steps=args.images, seed=seed, out=str(out), eval_every=args.images // 4, eval_episodes=8, progress=False, torch_threads=args.threads),
    )  # fmt: skip


def profile_overhead(algo: str, args: argparse.Namespace, iterations: int = 3) -> dict[str, float]:
    """Share of an iteration's wall time spent outside the transformer's forward/backward."""
    cfg = run_config(algo, 0, args)
    torch.set_num_threads(args.threads)
    a = build_image(cfg)
    a.iterate()  # warm-up
    transformer = a.policy.transformer
    forward = transformer.forward

    def labelled(*f_args: object, **kw: object) -> object:
        with torch.profiler.record_function("model_forward"):
            return forward(*f_args, **kw)

    transformer.forward = labelled  # type: ignore[method-assign]
    backward = torch.Tensor.backward

    def labelled_backward(self: torch.Tensor, *b_args: object, **kw: object) -> None:
        with torch.profiler.record_function("model_backward"):
            backward(self, *b_args, **kw)

    torch.Tensor.backward = labelled_backward  # type: ignore[method-assign]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(iterations):
                with torch.profiler.record_function("iteration"):
                    a.iterate()
            wall = time.perf_counter() - t0
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        transformer.forward = forward  # type: ignore[method-assign]
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in ("model_forward", "model_backward", "iteration")}
    # backward inside a forward label cannot happen; the forward label nests no backward either
    model = totals.get("model_forward", 0.0) + totals.get("model_backward", 0.0)
    it = totals.get("iteration", wall)
    return {"iteration_s": it / iterations, "model_s": model / iterations, "overhead": 1.0 - model / it, "profiled_wall_s": wall / iterations}


def curve(run: Path, key: str) -> tuple[list[float], list[float]]:
    cols = read_csv(run / "progress.csv")
    pts = [(s, v) for s, v in zip(cols["step"], cols.get(key, [])) if not math.isnan(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["flow-grpo", "g2rpo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--images", type=int, default=3072, help="scored images per run")
    p.add_argument("--model", default="digits")
    p.add_argument("--reward", default="digit,digit_correct=0", help="digit_correct (weight 0) is logged, not trained on")
    p.add_argument("--group-size", type=int, default=8, dest="group_size")
    p.add_argument("--prompts", type=int, default=4, help="Flow-GRPO prompts per iteration")
    p.add_argument("--prompts-g2rpo", type=int, default=2, dest="prompts_g2rpo", help="G2RPO prompts per iteration")
    p.add_argument("--lora-rank", type=int, default=8, dest="lora_rank")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_out/t2i")
    p.add_argument("--assets", default=None, help="copy the plot, table and seed-1 grids here (e.g. assets)")
    p.add_argument("--skip-train", action="store_true", help="only re-read existing runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    for algo in args.algos:
        for seed in args.seeds:
            cfg = run_config(algo, seed, args)
            run = Path(cfg.run.out)
            if not args.skip_train:
                shutil.rmtree(run, ignore_errors=True)
                t0 = time.perf_counter()
                train_image(cfg)
                print(f"{algo} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            cols = read_csv(run / "progress.csv")
            r = results.setdefault(algo, {"runs": []})
            train_rows = [i for i, v in enumerate(cols.get("time/images_per_s", [])) if not math.isnan(v)]

            def tot(key: str) -> float:
                return sum(cols[key][i] for i in train_rows if not math.isnan(cols[key][i]))

            ev = [(s, v) for s, v in zip(cols["step"], cols["eval/reward_digit"]) if not math.isnan(v)]
            acc = [(s, v) for s, v in zip(cols["step"], cols["eval/reward_digit_correct"]) if not math.isnan(v)]
            r["runs"].append({
                "seed": seed, "run": str(run),
                "eval_before": ev[0][1], "eval_after": ev[-1][1], "acc_before": acc[0][1], "acc_after": acc[-1][1],
                "train_reward_first": cols["reward/digit"][train_rows[0]], "train_reward_last": statistics.mean(cols["reward/digit"][i] for i in train_rows[-3:]),
                "sample_s": tot("time/sample_s"), "reward_s": tot("time/reward_s"), "train_s": tot("time/train_s"),
                "images": int(cols["step"][train_rows[-1]]),
            })  # fmt: skip

    for algo in args.algos:
        results[algo]["profile"] = profile_overhead(algo, args)
        print(algo, "profile", results[algo]["profile"], flush=True)

    # ---- table
    lines = [
        "| algo | eval p(digit) before -> after | eval accuracy before -> after | train reward first -> last | images/s | sampling / reward / training | loop overhead (profiler) |",
        "|---|---|---|---|---|---|---|",
    ]
    for algo in args.algos:
        runs = results[algo]["runs"]

        def ms(key: str) -> str:
            vals = [x[key] for x in runs]
            return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}"

        total_s = sum(x["sample_s"] + x["reward_s"] + x["train_s"] for x in runs)
        split = " / ".join(f"{100 * sum(x[k] for x in runs) / total_s:.0f}%" for k in ("sample_s", "reward_s", "train_s"))
        ips = statistics.mean(x["images"] / (x["sample_s"] + x["reward_s"] + x["train_s"]) for x in runs)
        prof = results[algo]["profile"]
        lines.append(
            f"| {algo} | {ms('eval_before')} -> {ms('eval_after')} | {ms('acc_before')} -> {ms('acc_after')} | "
            f"{ms('train_reward_first')} -> {ms('train_reward_last')} | {ips:.1f} | {split} | {100 * prof['overhead']:.1f}% |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))

    # ---- plot: training reward and eval reward vs scored images
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for algo in args.algos:
        for key, ax in (("reward/digit", axes[0]), ("eval/reward_digit", axes[1])):
            xs_all, ys_all = [], []
            for x in results[algo]["runs"]:
                xs, ys = curve(Path(x["run"]), key)
                xs_all.append(xs)
                ys_all.append(ys)
            n = min(len(y) for y in ys_all)
            xs = xs_all[0][:n]
            mean = [statistics.mean(y[i] for y in ys_all) for i in range(n)]
            sd = [statistics.pstdev([y[i] for y in ys_all]) for i in range(n)]
            (line,) = ax.plot(xs, mean, "o-" if key.startswith("eval") else "-", ms=3, label=f"{algo} ({len(ys_all)} seeds)")
            ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=line.get_color(), alpha=0.2)
    axes[0].set_title("training samples (SDE): mean p(prompted digit)")
    axes[1].set_title("evaluation (ODE, 10 prompts x 8 seeds)")
    for ax in axes:
        ax.set_xlabel("scored images")
        ax.set_ylabel("p(prompted digit)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_t2i.png")
    if args.assets:
        dest = Path(args.assets)
        shutil.copy(out / "bench_t2i.png", dest / "bench_t2i.png")
        shutil.copy(out / "results.md", dest / "bench_t2i_results.md")
        for algo in args.algos:
            run = Path(results[algo]["runs"][0]["run"])
            grids = sorted((run / "images").glob("grid-*.png"), key=lambda q: int(q.stem.split("-")[1]))
            shutil.copy(grids[0], dest / f"t2i_{algo}_before.png")
            shutil.copy(grids[-1], dest / f"t2i_{algo}_after.png")
    print(f"written {out / 'bench_t2i.png'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()

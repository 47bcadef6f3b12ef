"""Test-time composition (GPC) of trained diffusion / flow agents, with a weight search that never
sees the episodes it reports.

``genrl compose --policies A B [C] --env ID --search`` loads each parent (a run, checkpoint or
exported agent; ``genrl.agent``), composes them with ``policies.compose.ComposedPolicy`` (each
parent sees the raw observation through its *own* view, ``env.obs_resolution``, and its own saved
normaliser: parents trained on different sensors compose, as in the paper), and

1. **searches** the weight grid (0, 0.1, ..., 1 for two parents; a simplex grid for three) on
   ``--val-episodes`` episodes of **validation seeds**, with common random numbers: every weight
   meets the same episode seeds and the same sampler noise, so differences between weights are not
   differences of luck;
2. evaluates the chosen weight and every parent alone on ``--test-episodes`` episodes of **separate
   test seeds**, and reports success rate (share of episodes that ended at the goal, i.e. by
   termination) with Wilson 95% intervals and mean return with bootstrap 95% intervals.

GPC's released code takes weights on the command line and reports the best of several on the
episodes it picked them with, which inflates the result; here the search function only ever gets
validation seeds (a test checks it). All episodes of one evaluation run in parallel: one env per
episode through the batched env API, one episode each.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genrl.agent import Agent
from genrl.errors import ConfigError

VAL_SEED, TEST_SEED = 1_000_000, 2_000_000
"""Episode seeds: validation episodes use VAL_SEED + i, test episodes TEST_SEED + i."""


@dataclass(frozen=True)
class Result:
    """One evaluation: per-episode successes and returns."""

    weights: tuple[float, ...]
    success: np.ndarray  # (E,) bool
    returns: np.ndarray  # (E,)

    @property
    def success_rate(self) -> float:
        return float(self.success.mean())

    def summary(self) -> dict[str, Any]:
        lo, hi = wilson_interval(int(self.success.sum()), len(self.success))
        rlo, rhi = bootstrap_interval(self.returns)
        return {"weights": list(self.weights), "episodes": len(self.success), "success_rate": self.success_rate, "success_ci95": [lo, hi],
                "return_mean": float(self.returns.mean()), "return_ci95": [rlo, rhi]}  # fmt: skip


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the exact bounds at the ends (rounding would otherwise leave 1 - 1e-16 above an all-success rate)
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def bootstrap_interval(x: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def weight_grid(n_parents: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex with coordinates on multiples of ``step`` (rounded to
    1e-12 so they sum to 1 exactly), parents' own endpoints included."""
    k = round(1 / step)
    if not math.isclose(k * step, 1.0) or k < 1:
        raise ConfigError(f"grid step must divide 1, got {step}")
    out = []
    for combo in itertools.product(range(k + 1), repeat=n_parents - 1):
        if sum(combo) <= k:
            ws = [c / k for c in combo] + [(k - sum(combo)) / k]
            out.append(tuple(round(w, 12) for w in ws))
    return sorted(out, reverse=True)


def load_parents(paths: Sequence[str | Path]) -> list[Agent]:
    """The agents; ConfigError unless they share env id, env arguments and chunking."""
    if not 2 <= len(paths) <= 4:
        raise ConfigError(f"compose 2 to 4 policies, got {len(paths)}")
    agents = []
    for p in paths:
        try:
            agents.append(Agent.load(p))
        except Exception as exc:  # CheckpointError and friends: one line naming the path
            raise ConfigError(f"cannot load {p}: {str(exc).splitlines()[0]}") from None
    first = agents[0]
    for path, a in zip(paths[1:], agents[1:], strict=True):
        if (a.env_id, a.env_kwargs, a.chunking) != (first.env_id, first.env_kwargs, first.chunking):
            raise ConfigError(f"{path} acts on {a.env_id} {a.env_kwargs} with chunking {a.chunking}, {paths[0]} on {first.env_id} {first.env_kwargs} with {first.chunking}")
        if a.policy.obs_dim != first.policy.obs_dim or a.policy.action_dim != first.policy.action_dim:
            raise ConfigError(f"{path}'s policy (obs {a.policy.obs_dim}, action {a.policy.action_dim}) does not fit {paths[0]}'s")
    return agents


def composed(agents: Sequence[Agent], weights: Sequence[float]) -> Any:
    """``ComposedPolicy`` of the agents' policies, each behind its own observation normaliser."""
    from genrl_policies.compose import ComposedPolicy

    def view(agent: Agent) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda obs: torch.from_numpy(agent.normalize(obs.double().numpy()))

    try:
        return ComposedPolicy([a.policy for a in agents], weights, [view(a) for a in agents], obs_dim=agents[0].policy.obs_dim)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_episodes(
    agents: Sequence[Agent], weights: Sequence[float], seed: int, episodes: int, *, deterministic: bool = False, max_parallel: int = 50
) -> Result:  # fmt: skip
    """Episode i on its own env seeded ``seed + i``, in batches of at most ``max_parallel``
    parallel envs (one episode each), the composition sampling with a generator seeded by the
    batch's first seed: identical seeds give identical episodes for every weight until their
    actions differ (common random numbers)."""
    a0 = agents[0]
    n_par = min(episodes, max_parallel)
    env = _envs(a0.env_id, json.dumps(a0.env_kwargs, sort_keys=True), json.dumps(a0.chunking, sort_keys=True), n_par)
    policy = composed(agents, weights)
    low, high = torch.from_numpy(a0.action_low), torch.from_numpy(a0.action_high)
    success = np.zeros(episodes, dtype=bool)
    returns = np.zeros(episodes)
    for start in range(0, episodes, n_par):
        k = min(n_par, episodes - start)
        gen = torch.Generator().manual_seed(seed + start)
        running = np.zeros(n_par)
        done = np.zeros(n_par, dtype=bool)
        done[k:] = True  # the last batch's spare envs do not count
        obs = env.reset(seed=seed + start)  # every sub-env re-seeded: the same episodes for every weight
        with torch.inference_mode():
            while not done.all():
                action, _ = policy.act(obs, deterministic=deterministic, generator=gen)
                out = env.step(torch.maximum(torch.minimum(action.float(), high), low))
                ended = (out.terminated | out.truncated).numpy()
                new = ended & ~done
                running += np.where(done, 0.0, out.reward.numpy().astype(np.float64))
                success[start : start + k][new[:k]] = out.terminated.numpy()[:k][new[:k]]
                returns[start : start + k][new[:k]] = running[:k][new[:k]]
                done |= ended
                obs = out.obs
    return Result(tuple(weights), success, returns)


@functools.lru_cache(maxsize=1)
def _envs(env_id: str, env_kwargs: str, chunking: str, n: int) -> Any:
    """One batched env per (task, parallel count), kept for every weight of a search: building
    some tasks' envs takes seconds (OGBench compiles its scene) and each holds a simulator, so
    at most ``max_parallel`` of them exist."""
    from genrl_envs import make_env

    chunks = json.loads(chunking)
    extra = {"chunking": chunks} if chunks else {}
    return make_env(env_id, n, normalize_obs=False, normalize_reward=False, env_kwargs=json.loads(env_kwargs), **extra)


def search(evaluate_val: Callable[[Sequence[float]], Result], grid: Sequence[tuple[float, ...]]) -> tuple[tuple[float, ...], list[Result]]:
    """The grid weight with the best validation success rate (ties: higher mean return, then the
    first in grid order), and every validation result. ``evaluate_val`` is the only evaluator it
    gets: it cannot touch test episodes."""
    results = [evaluate_val(w) for w in grid]
    best = max(range(len(results)), key=lambda i: (results[i].success_rate, float(results[i].returns.mean()), -i))
    return results[best].weights, results


def compose_main(
    paths: Sequence[str], *, do_search: bool, weights: Sequence[float] | None, val_episodes: int, test_episodes: int,
    grid_step: float, deterministic: bool, out: str | Path | None, progress: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """What ``genrl compose`` runs; returns (and writes to ``out``) the report."""
    agents = load_parents(paths)
    n = len(agents)
    if do_search == (weights is not None):
        raise ConfigError("give either --search or --weights")
    if weights is not None:
        from genrl_policies.compose import check_weights

        try:
            chosen = check_weights(weights, n)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        val: list[Result] = []
    else:
        grid = weight_grid(n, grid_step)

        def evaluate_val(w: Sequence[float]) -> Result:
            cached = Path(out) / "validation" / f"{'-'.join(f'{x:.4f}' for x in w)}.json" if out is not None else None
            if cached is not None and cached.is_file():  # an interrupted search resumes where it stopped
                d = json.loads(cached.read_text())
                if d["episodes"] == val_episodes and d["deterministic"] == deterministic:
                    return Result(tuple(w), np.array(d["success"], dtype=bool), np.array(d["returns"]))
            r = run_episodes(agents, w, VAL_SEED, val_episodes, deterministic=deterministic)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                payload = {"episodes": val_episodes, "deterministic": deterministic, "success": r.success.tolist(), "returns": r.returns.tolist()}
                cached.write_text(json.dumps(payload))
            progress(f"validation {format_weights(w)}: success {r.success_rate:.3f}, return {r.returns.mean():.1f}")
            return r

        chosen, val = search(evaluate_val, grid)
    test = {}
    for i in range(n):
        alone = tuple(1.0 if j == i else 0.0 for j in range(n))
        test[f"parent {i + 1}"] = run_episodes(agents, alone, TEST_SEED, test_episodes, deterministic=deterministic)
    test["composition"] = run_episodes(agents, chosen, TEST_SEED, test_episodes, deterministic=deterministic)
    report = {
        "parents": [str(p) for p in paths], "families": [a.family for a in agents], "env_id": agents[0].env_id,
        "views": [{str(k): v for k, v in a.obs_resolution.items()} for a in agents],
        "chosen_weights": list(chosen), "validation": [r.summary() for r in val],
        "test": {k: r.summary() for k, r in test.items()}, "val_seed": VAL_SEED, "test_seed": TEST_SEED,
        "deterministic": deterministic,
    }  # fmt: skip
    best_parent = max((k for k in test if k.startswith("parent")), key=lambda k: test[k].success_rate)
    c, b = report["test"]["composition"], report["test"][best_parent]
    report["beats_best_parent"] = bool(c["success_ci95"][0] > b["success_ci95"][1])
    best_return = max((k for k in test if k.startswith("parent")), key=lambda k: float(test[k].returns.mean()))
    report["return_beats_best_parent"] = bool(c["return_ci95"][0] > report["test"][best_return]["return_ci95"][1])
    if out is not None:
        write_report(report, Path(out))
    return report


def format_weights(w: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in w) + ")"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Composition of {', '.join(f'{p} ({f})' for p, f in zip(report['parents'], report['families'], strict=True))} on {report['env_id']}", ""]
    if report["validation"]:
        lines += ["Validation (weight search):", "", "| weights | success | 95% CI | return |", "|---|---|---|---|"]
        lines += [f"| {format_weights(r['weights'])} | {r['success_rate']:.3f} | [{r['success_ci95'][0]:.3f}, {r['success_ci95'][1]:.3f}] | {r['return_mean']:.1f} |"
                  for r in report["validation"]]  # fmt: skip
        lines.append("")
    lines += ["Test (separate seeds):", "", "| policy | weights | success | 95% CI | return | 95% CI |", "|---|---|---|---|---|---|"]
    for name, r in report["test"].items():
        lines.append(f"| {name} | {format_weights(r['weights'])} | {r['success_rate']:.3f} | [{r['success_ci95'][0]:.3f}, {r['success_ci95'][1]:.3f}] "
                     f"| {r['return_mean']:.1f} | [{r['return_ci95'][0]:.1f}, {r['return_ci95'][1]:.1f}] |")  # fmt: skip
    lines += ["", f"Composition beats the better parent beyond the 95% intervals: {'yes' if report['beats_best_parent'] else 'no'} (success), "
              f"{'yes' if report.get('return_beats_best_parent') else 'no'} (return)."]  # fmt: skip
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.json, report.md and (after a search) weights.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    if report["validation"] and len(report["parents"]) == 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        w = [r["weights"][0] for r in report["validation"]]
        s = [r["success_rate"] for r in report["validation"]]
        lo = [r["success_ci95"][0] for r in report["validation"]]
        hi = [r["success_ci95"][1] for r in report["validation"]]
        ax.fill_between(w, lo, hi, alpha=0.2, label="validation 95% CI")
        ax.plot(w, s, "o-", label="validation")
        for name, r in report["test"].items():
            err = [[max(0.0, r["success_rate"] - r["success_ci95"][0])], [max(0.0, r["success_ci95"][1] - r["success_rate"])]]
            ax.errorbar([r["weights"][0]], [r["success_rate"]], yerr=err,
                        fmt="s" if name == "composition" else "^", capsize=3, label=f"test: {name}")  # fmt: skip
        ax.set_xlabel("weight of parent 1 (parent 2: 1 - w)")
        ax.set_ylabel("success rate")
        ax.set_title(report["env_id"])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "weights.png", dpi=120)
        plt.close(fig)


__all__ = ["Result", "bootstrap_interval", "compose_main", "run_episodes", "search", "weight_grid", "wilson_interval"]

"""genrl compose: composed agents on batched episodes, a weight search that only sees validation
seeds, intervals, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genrl import compose
from genrl.cli import main
from genrl.config import config_from_dict
from genrl.datasets import save_demos
from genrl.errors import ConfigError
from genrl.trainer import train
from genrl_envs.experts import record_demos
from genrl_envs.maze import ENV_ID as MAZE

CHUNKS = {"horizon": 4, "n_obs_steps": 2, "n_action_steps": 2}


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("parents")
    out = []
    for family, p_left in (("diffusion", 0.9), ("fpo", 0.1)):  # different families, different demonstration sets
        demos = root / f"demos-{p_left}.safetensors"
        data = record_demos(MAZE, 30, seed=1, expert_options={"p_left": p_left})
        save_demos(demos, data, data["meta"])
        pc = {"hidden_sizes": [32, 32]} if family == "diffusion" else {"hidden_sizes": [32, 32], "n_steps": 4}
        cfg = config_from_dict({
            "algo": "bc", "policy": family, "env": {"env_id": MAZE, **CHUNKS}, "policy_config": pc,
            "algo_config": {"dataset": str(demos), "batch_size": 64, "updates_per_iter": 200, "warmup_steps": 20, "learning_rate": 1e-3},
            "run": {"total_steps": 200, "seed": 0, "out": str(root / family), "save_every": 0, "eval_episodes": 1, "progress": False},
        })  # fmt: skip
        out.append(train(cfg))
    return out


def test_endpoints_reproduce_each_parent_and_seeds_are_common(parents: list[Path]) -> None:
    agents = compose.load_parents(parents)
    a = compose.run_episodes(agents, (1.0, 0.0), 7, 6)
    b = compose.run_episodes(agents, (1.0, 0.0), 7, 6)
    np.testing.assert_array_equal(a.returns, b.returns)  # same seeds, same episodes
    alone = compose.run_episodes([agents[0], agents[0]], (0.5, 0.5), 7, 6)  # a policy composed with itself is that policy
    np.testing.assert_allclose(alone.returns, a.returns, rtol=1e-6)
    batched = compose.run_episodes(agents, (1.0, 0.0), 7, 5, max_parallel=2)  # batches of 2, 2, 1 (one spare env)
    again = compose.run_episodes(agents, (1.0, 0.0), 7, 5, max_parallel=2)
    assert len(batched.returns) == 5 and (batched.returns < 0).all()
    np.testing.assert_array_equal(batched.returns, again.returns)


def test_the_search_never_reads_test_seeds(parents: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple[int, tuple[float, ...]]] = []
    real = compose.run_episodes

    def spy(agents, weights, seed, episodes, **kw):  # type: ignore[no-untyped-def]
        seen.append((seed, tuple(weights)))
        return real(agents, weights, seed, episodes, **kw)

    monkeypatch.setattr(compose, "run_episodes", spy)
    searched: list[tuple[float, ...]] = []
    real_search = compose.search

    def spy_search(evaluate_val, grid):  # type: ignore[no-untyped-def]
        n = len(seen)
        out = real_search(evaluate_val, grid)
        searched.extend(seed for seed, _ in seen[n:])  # every evaluation made during the search
        return out

    monkeypatch.setattr(compose, "search", spy_search)
    report = compose.compose_main(parents, do_search=True, weights=None, val_episodes=4, test_episodes=5, grid_step=0.5,
                                  deterministic=False, out=tmp_path / "out", progress=lambda _: None)  # fmt: skip
    assert searched and set(searched) == {compose.VAL_SEED}
    assert {seed for seed, _ in seen[len(searched) :]} == {compose.TEST_SEED}
    assert [r["weights"] for r in report["validation"]] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert set(report["test"]) == {"parent 1", "parent 2", "composition"}
    parents, comp = [report["test"]["parent 1"], report["test"]["parent 2"]], report["test"]["composition"]
    for verdict, value, ci in (("beats_best_parent", "success_rate", "success_ci95"), ("return_beats_best_parent", "return_mean", "return_ci95")):
        best = max(parents, key=lambda r: r[value])  # the better parent by that measure; the verdict follows the intervals
        assert report[verdict] == (comp[ci][0] > best[ci][1]), verdict
    assert (tmp_path / "out" / "weights.png").is_file() and json.loads((tmp_path / "out" / "report.json").read_text())["chosen_weights"]


def test_intervals_and_grid() -> None:
    lo, hi = compose.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert compose.wilson_interval(0, 10)[0] == 0.0 and all(compose.wilson_interval(n, n)[1] == 1.0 for n in range(1, 400))  # exact ends
    lo, hi = compose.bootstrap_interval(np.arange(100.0))
    assert lo < 49.5 < hi
    assert len(compose.weight_grid(2, 0.1)) == 11 and len(compose.weight_grid(3, 0.5)) == 6
    assert all(abs(sum(w) - 1) < 1e-12 for w in compose.weight_grid(3, 0.1))


def test_bad_compose_input_is_one_line(parents: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compose", "--policies", str(parents[0]), str(parents[1]), "--weights", "0.7", "0.7"]) == 2
    assert "sum to 1" in capsys.readouterr().err
    assert main(["compose", "--policies", str(parents[0]), str(tmp_path / "nope"), "--search"]) == 2
    assert "cannot load" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="compose 2 to 4 policies"):
        compose.load_parents([parents[0]])
    code = main(["compose", "--policies", str(parents[0]), str(parents[1]), "--weights", "0.5", "0.5", "--test-episodes", "3"])
    assert code == 0 and "composition" in capsys.readouterr().out

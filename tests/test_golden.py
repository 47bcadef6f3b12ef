"""Golden runs (scripts/golden_runs.py): every algorithm x family, short, reduced to hashes of the
final checkpoint's tensors and the log. A refactor must leave them bitwise identical.

The record is per CPU capability (float rounding follows the vector unit MKL dispatches to); on a
CPU without a record, two runs in one process must still agree bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _golden():  # the script is the single definition of the runs
    spec = importlib.util.spec_from_file_location("golden_runs", ROOT / "scripts" / "golden_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_golden_runs_are_unchanged(tmp_path: Path) -> None:
    golden = _golden()
    got = golden.run_all(tmp_path / "a")
    assert set(got) == set(golden.CONTROL) | set(golden.IMAGE)
    record = golden.GOLDEN_DIR / f"{golden.cpu_key()}.json"
    if record.is_file():
        want = json.loads(record.read_text())
        changed = [f"{r}/{f}" for r in want for f in want[r] if got.get(r, {}).get(f) != want[r][f]]
        assert not changed, f"behaviour changed against {record.name}: {changed}"
    else:  # another CPU: at least the runs are reproducible
        assert golden.run_all(tmp_path / "b", names=["ppo-gaussian", "flow-grpo"]) == {k: got[k] for k in ("ppo-gaussian", "flow-grpo")}

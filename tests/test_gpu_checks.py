"""scripts/gpu_checks.py, the one-call GPU measurement script, at tiny sizes on CPU: its code paths
(Warp worlds and their C MuJoCo agreement, Flow-GRPO on a randomly initialised SD3 pipeline built
from configs) keep working between the sessions that have a GPU to run it on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_run_small_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("mujoco_warp")
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_checks.py"), "--small", "--device", "cpu", "--precisions", "bf16", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    results = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert results["warp"]["steps_per_s"]["4"] > 0
    agreement = results["warp"]["agreement_100_steps"]
    assert agreement["termination_mismatches"] == 0 and agreement["max_obs_error"] < 1e-4  # as tests/test_warp.py
    row = results["flow_grpo"]["bf16"]
    assert row["images_per_s"] > 0 and math.isfinite(row["onpolicy_log_ratio_max"]) and row["peak_memory_gib"] is None  # no CUDA here
    assert "| bf16 |" in (tmp_path / "gpu_checks.md").read_text()

"""Shared test setup: deterministic seeds, one CPU thread, headless MuJoCo rendering."""

from __future__ import annotations

import os
import random

# Set before any test module imports mujoco (EGL works without a display).
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_seed() -> None:
    """Every test starts from the same RNG state and a single intra-op thread."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)

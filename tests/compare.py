"""Bitwise comparison helpers shared by the exact-resume tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), (a, sorted(set(ta) ^ set(tb)))
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
        assert torch.equal(ta[key], tb[key]), f"{b.name}: tensor '{key}' differs"


def assert_same_nested(a, b, where: str = "") -> None:
    """Equality of nested dicts/lists of tensors and plain values (torch.equal for tensors)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where

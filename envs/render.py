"""Tiny numpy drawing for the project's own envs' rgb_array renders (no pygame needed)."""

from __future__ import annotations

import numpy as np


def disc(img: np.ndarray, cx: float, cy: float, r: float, color: tuple[int, int, int]) -> None:
    """Fill a disc (pixel coordinates, row = cy) in place."""
    h, w = img.shape[:2]
    rows, cols = np.ogrid[:h, :w]
    img[(cols - cx) ** 2 + (rows - cy) ** 2 <= r * r] = color

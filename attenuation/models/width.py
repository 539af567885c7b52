"""The width multiplier, applied alike to every model's channel counts."""

from __future__ import annotations

import math

__all__ = ["check_width", "scale_channels"]


def check_width(width) -> float:
    """``width`` as a float; anything but a finite number > 0 is a ValueError."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) \
            or not (math.isfinite(width) and width > 0):
        raise ValueError(f"width multiplier must be a finite number > 0, got {width!r}")
    return float(width)


def scale_channels(channels: int, width: float) -> int:
    """``channels`` scaled by ``width``: rounded, not truncated, and never below one."""
    return max(1, int(round(channels * check_width(width))))

"""Ramps p(t): the fraction of the target ratio reached after attenuation step i of n."""
from __future__ import annotations

import math

RAMPS = {
    "constant": lambda x: 1.0,                  # the full ratio from the first step (one-shot)
    "linear": lambda x: x,
    "cubic": lambda x: 1.0 - (1.0 - x) ** 3,    # Zhu & Gupta 2017: fast first, gentle at the end
}


def check_ramp(name: str) -> None:
    if name not in RAMPS:
        raise ValueError(f"unknown ramp {name!r}: available are {', '.join(sorted(RAMPS))}")


def ramp_ratio(name: str, ratio: float, step: int, n_steps: int) -> float:
    """Target ratio after attenuation step ``step`` (1-based) of ``n_steps``."""
    check_ramp(name)
    progress = min(max(step / max(n_steps, 1), 0.0), 1.0)
    return ratio * RAMPS[name](progress)


def weak_count(ratio_now: float, n_filters: int) -> int:
    """floor(p(t) * n), robust to float rounding just below an integer."""
    return min(n_filters, int(math.floor(ratio_now * n_filters + 1e-9)))

"""The pruning methods, all presets of one engine (docs/METHOD.md, "The rule" and "Special cases")."""
from __future__ import annotations

from .overrides import apply_overrides
from .pruner import PruningConfig

METHODS: dict[str, dict] = {
    # Filter attenuation: weak filters shrink by `factor` per step; removed once below `eps`
    # (0.7**13 < 0.01: about 13 consecutive weak steps), so a filter has time to return.
    "attenuation": dict(factor=0.7, eps=0.01, ramp="cubic"),
    # Conventional pruning: weak filters are zeroed and removed at once, never return.
    "hard": dict(factor=0.0, eps=1.0, ramp="constant"),           # one-shot, at the first step
    "iterative": dict(factor=0.0, eps=1.0, ramp="cubic"),         # hard, on the ramp
    # Soft Filter Pruning (He et al. 2018): conv weights zeroed every epoch but still trained (the
    # BN keeps its parameters, so a zeroed filter can regrow), removed at the end.
    "sfp": dict(factor=0.0, eps=0.0, ramp="constant", interval="epoch", mask_gradients=False,
                attenuate_bn=False),
    # A control with the same harness and budget: nothing pruned.
    "none": dict(ratio=0.0),
}


def available_methods() -> list[str]:
    return sorted(METHODS)


def method_config(method: str, **overrides) -> PruningConfig:
    """The preset ``method`` with any field overridden (None values are ignored)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: available are {', '.join(available_methods())}")
    return PruningConfig(**apply_overrides(PruningConfig, METHODS[method], overrides, "pruning")).validate()

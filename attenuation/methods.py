"""The pruning methods, all presets of one engine (docs/METHOD.md, "The rule" and "Special cases")."""
from __future__ import annotations

from .overrides import apply_overrides
from .pruning_config import PruningConfig

METHODS: dict[str, dict] = {
    # Filter attenuation: weak filters shrink by `factor` per step; removed once below `eps`
    # (0.7**13 < 0.01: about 13 consecutive weak steps), so a filter has time to return.
    "attenuation": dict(factor=0.7, eps=0.01, ramp="cubic"),
    # Conventional pruning: weak filters are zeroed and removed at once, never return.
    "hard": dict(factor=0.0, eps=1.0, ramp="constant"),           # one-shot, at the first step
    "iterative": dict(factor=0.0, eps=1.0, ramp="cubic"),         # hard, on the ramp
    # Soft Filter Pruning (He et al. 2018): as the phase starts and after every epoch the
    # lowest-norm filters are zeroed, all keep training (a zeroed one regrows and may return),
    # removed at the end. Behind a BatchNorm the zeroing acts on its gamma and the norm is the
    # folded filter's (docs/METHOD.md, Decisions).
    "sfp": dict(factor=0.0, eps=0.0, ramp="constant", interval="epoch", step_at_start=True,
                mask_gradients=False, attenuate="gamma"),
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

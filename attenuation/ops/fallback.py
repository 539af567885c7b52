"""The one-time warning of a backend that hands a call it does not cover to the reference."""
from __future__ import annotations

import warnings

_warned_fallbacks: set[tuple[str, str]] = set()


def warn_reference_fallback(backend: str, op: str, why: str) -> None:
    """Say once per process, backend and op that a call the backend does not cover (``why``) runs
    the reference implementation instead: never silently, never a crash deep in a kernel."""
    if (backend, op) in _warned_fallbacks:
        return
    _warned_fallbacks.add((backend, op))
    warnings.warn(f"attenuation: the {backend} backend's {op} does not cover {why}; it runs the reference "
                  "implementation for it", stacklevel=3)

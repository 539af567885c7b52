"""Presets with user overrides on top, shared by the method and run presets."""
from __future__ import annotations

import dataclasses


def apply_overrides(config_class, preset: dict, overrides: dict, what: str) -> dict:
    """``preset``'s values with the non-None ``overrides`` on top; a name that is not a field of
    ``config_class`` is an error naming the ``what`` options."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown {what} options: {', '.join(sorted(unknown))}")
    return {**preset, **{k: v for k, v in overrides.items() if v is not None}}

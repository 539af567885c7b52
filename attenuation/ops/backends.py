"""Backend registry: a backend is a module-like object with the five op functions (and optionally
further ops, such as ``select_weak_global``: where it lacks one, :func:`get_op` gives the reference's).

``reference`` is always registered. Faster backends (``triton``, ``native``) register themselves when
their package imports; the default per device type is the fastest one registered for it, unless
:func:`set_default_backend` or the ``ATTENUATION_BACKEND`` environment variable says otherwise.
``native`` (the C++ extension ``attenuation._C``, from csrc/) is the default on the CPU.
``triton`` (the kernels of the ``attenuation_triton`` package, from kernels/, adapted by
:mod:`.triton`) is registered for CUDA tensors, and for CPU tensors too when Triton's interpreter
runs its kernels (``TRITON_INTERPRET=1``), but not as the default: it becomes preferred only once
measured faster on a GPU.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Optional

import torch

from . import reference

_BACKENDS: dict[str, ModuleType] = {"reference": reference}
# Per device type, backend names in order of preference.
_PREFERENCE: dict[str, list[str]] = {"cpu": ["reference"], "cuda": ["reference"]}
_default_override: Optional[str] = None


def register_backend(name: str, implementation, device_types: tuple[str, ...], preferred: bool = True) -> None:
    """Make ``implementation`` available as ``name``; ``preferred`` puts it first for its devices."""
    _BACKENDS[name] = implementation
    for device_type in device_types:
        order = _PREFERENCE.setdefault(device_type, ["reference"])
        if name in order:
            order.remove(name)
        order.insert(0 if preferred else len(order), name)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def set_default_backend(name: Optional[str]) -> None:
    """Force a backend for every op that is called without one (None restores the per-device default)."""
    global _default_override
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}: available are {', '.join(available_backends())}")
    _default_override = name


def default_backend(device: torch.device) -> str:
    forced = _default_override or os.environ.get("ATTENUATION_BACKEND") or None
    if forced is not None:
        return forced
    return _PREFERENCE.get(device.type, ["reference"])[0]


def get_backend(name: Optional[str], device: torch.device):
    name = name or default_backend(device)
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend {name!r} is not available: available are "
                         f"{', '.join(available_backends())}") from None


def get_op(name: Optional[str], device: torch.device, op: str):
    """The backend's implementation of ``op``, or the reference's when the backend has none: an op
    a backend does not implement yet runs as its specification (pure PyTorch, any device)."""
    return getattr(get_backend(name, device), op, None) or getattr(reference, op)


_warned_fallbacks: set[tuple[str, str]] = set()


def warn_reference_fallback(backend: str, op: str, why: str) -> None:
    """Say once per process, backend and op that a call the backend does not cover (``why``) runs
    the reference implementation instead: never silently, never a crash deep in a kernel."""
    if (backend, op) in _warned_fallbacks:
        return
    _warned_fallbacks.add((backend, op))
    warnings.warn(f"attenuation: the {backend} backend's {op} does not cover {why}; it runs the reference "
                  "implementation for it", stacklevel=3)


def register_triton_backend() -> bool:
    """Register the triton backend (:mod:`.triton`, the kernels of ``attenuation_triton``) as
    ``"triton"``, not preferred, if triton imports.

    CUDA tensors; CPU tensors as well when the kernels run under Triton's interpreter. Returns
    whether it is registered. Never raises for lack of triton: then there is simply no triton backend.
    """
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or a broken install
        return False
    from . import triton as triton_backend
    device_types = ("cuda", "cpu") if triton_backend.INTERPRET else ("cuda",)
    register_backend("triton", triton_backend, device_types=device_types, preferred=False)
    return True


def register_native_backend() -> bool:
    """Register the C++ extension ``attenuation._C`` as ``"native"``: the default on the CPU, and
    available (not the default until measured faster) on CUDA when it was compiled with CUDA.
    Without the extension, says so once (a warning) and returns False."""
    try:
        from . import native
    except ImportError as error:
        warnings.warn(f"attenuation: the native extension is not available ({error}); the ops run on the "
                      "reference (and triton) backends. Build it with "
                      "`pip install --no-build-isolation -e .`", stacklevel=2)
        return False
    if native.has_kernel("cpu"):
        register_backend("native", native, device_types=("cpu",), preferred=True)
    if native.has_kernel("cuda"):
        register_backend("native", native, device_types=("cuda",), preferred=False)
    return True


register_triton_backend()
register_native_backend()

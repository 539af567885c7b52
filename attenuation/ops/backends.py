"""Backend registry: the ops a backend provides (:class:`Backend`), the registered backends, and
the default per device type.

``reference`` is always registered. Faster backends (``triton``, ``native``) register themselves when
their package imports; the default per device type is the fastest one registered for it, unless
:func:`set_default_backend` or the ``ATTENUATION_BACKEND`` environment variable says otherwise.
``native`` (the C++ extension ``attenuation._C``, from csrc/, adapted by :mod:`.native`) is the
default on the CPU. ``triton`` (the kernels of the ``attenuation_triton`` package, from kernels/,
adapted by :mod:`.triton`) is registered for CUDA tensors, and for CPU tensors too when Triton's
interpreter runs its kernels (``TRITON_INTERPRET=1``), but not as the default: it becomes
preferred only once measured faster on a GPU.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from . import reference


class Backend(Protocol):
    """The ops every backend provides, with the signatures (and the rule) of :mod:`.reference`, the
    specification. A module whose functions have these names conforms. A backend may also provide
    ``select_weak_global`` (:data:`OPTIONAL_OPS`); where it does not, the reference's runs."""

    def filter_norms(self, weights: Sequence[Tensor], ord: str) -> Tensor: ...

    def select_weak(self, scores: Tensor, removed: Tensor, counts: Sequence[int], ks: Tensor) -> Tensor: ...

    def attenuate_(self, weights, biases, gammas, betas, weak: Tensor, status: Tensor, multiplier: Tensor,
                   factor: float, eps: float, restore: bool = False, running_means=None,
                   running_vars=None) -> tuple[Tensor, Tensor]: ...

    def zero_removed_(self, weights, biases, gammas, betas, status: Tensor) -> None: ...

    def masked_conv2d(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], out_index: Optional[Tensor],
                      in_index: Optional[Tensor], scale: Optional[Tensor], stride, padding, dilation,
                      groups: int = 1) -> Tensor: ...


REQUIRED_OPS = tuple(name for name, member in vars(Backend).items()
                     if callable(member) and not name.startswith("_"))
# Optional ops and what runs where a backend lacks one.
OPTIONAL_OPS: dict[str, Callable] = {"select_weak_global": reference.select_weak_global}


@dataclass(frozen=True, slots=True)
class Registered:
    """A registered backend as the facade calls it: every op present (an optional op the backend
    lacks is the reference's), resolved once at registration, so a call costs one attribute read."""
    name: str
    filter_norms: Callable
    select_weak: Callable
    select_weak_global: Callable
    attenuate_: Callable
    zero_removed_: Callable
    masked_conv2d: Callable

    @classmethod
    def of(cls, name: str, implementation: Backend) -> "Registered":
        """Check that ``implementation`` conforms to :class:`Backend` (TypeError naming what it
        lacks) and resolve its ops."""
        missing = [op for op in REQUIRED_OPS if not callable(getattr(implementation, op, None))]
        if missing:
            raise TypeError(f"backend {name!r} does not provide the op(s) {', '.join(missing)} that every "
                            "backend must (attenuation.ops.backends.Backend)")
        ops = {op: getattr(implementation, op) for op in REQUIRED_OPS}
        for op, fallback in OPTIONAL_OPS.items():
            ops[op] = getattr(implementation, op, None) or fallback
        return cls(name=name, **ops)


_BACKENDS: dict[str, Registered] = {"reference": Registered.of("reference", reference)}
# Per device type, backend names in order of preference.
_PREFERENCE: dict[str, list[str]] = {"cpu": ["reference"], "cuda": ["reference"]}
_default_override: Optional[str] = None


def register_backend(name: str, implementation: Backend, device_types: tuple[str, ...],
                     preferred: bool = True) -> None:
    """Make ``implementation`` available as ``name``; ``preferred`` puts it first for its devices.
    Raises TypeError when it lacks one of the ops every backend provides."""
    _BACKENDS[name] = Registered.of(name, implementation)
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


def get_backend(name: Optional[str], device: torch.device) -> Registered:
    """The backend ``name`` (None: the default for ``device``), every op of it present."""
    name = name or default_backend(device)
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend {name!r} is not available: available are "
                         f"{', '.join(available_backends())}") from None


def get_op(name: Optional[str], device: torch.device, op: str) -> Callable:
    """The backend's implementation of ``op``; for an optional op the backend does not implement,
    the reference's (its specification: pure PyTorch, any device)."""
    if op not in REQUIRED_OPS and op not in OPTIONAL_OPS:
        raise ValueError(f"unknown op {op!r}: the ops are {', '.join((*REQUIRED_OPS, *OPTIONAL_OPS))}")
    return getattr(get_backend(name, device), op)


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

"""The device and the ops backend a run computes on: chosen from the user's words, checked before
any work starts, and described in reports."""
from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .ops.backends import default_backend


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything
    else, or CUDA on a machine without it, is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: use cpu, cuda or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    return device


def check_backend(name: Optional[str], device: torch.device) -> str:
    """The backend the ops will use on ``device`` (``name``, else the device's default), after
    checking that it exists and runs there: a tiny op is tried, so that a backend that cannot run
    on this device (Triton on the CPU outside its interpreter) fails here with a clear error
    rather than deep inside the first training step."""
    name = name or default_backend(device)
    if name not in ops.available_backends():
        raise ValueError(f"backend {name!r} is not available "
                         f"(available: {', '.join(ops.available_backends())})")
    try:
        ops.filter_norms([torch.ones(1, 1, device=device)], backend=name)
    except Exception as error:
        raise ValueError(f"backend {name!r} cannot run on {device.type}: "
                         f"{type(error).__name__}: {error}") from error
    return name


PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: every CUDA device this library runs on, and
    CPUs with AVX-512 BF16 or AMX (elsewhere oneDNN emulates bfloat16, slower than float32)."""
    if device.type == "cuda":
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}")


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of training and evaluation, None for plain float32. ``auto``: bfloat16
    where the device computes it natively (:func:`native_bfloat16`), else float32."""
    check_precision(name)
    if name == "bfloat16" or (name == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    return None


def precision_name(autocast_dtype: Optional[torch.dtype]) -> str:
    """What :func:`resolve_precision` gave, in words: ``float32`` or the autocast dtype's name."""
    return str(autocast_dtype or torch.float32).removeprefix("torch.")


def describe_device(device: torch.device, autocast_dtype: Optional[torch.dtype] = None) -> str:
    """The device in words, with the precision a run computes in."""
    precision = precision_name(autocast_dtype) + ("" if autocast_dtype is None else " autocast")
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, {precision})"
    return f"cpu ({torch.get_num_threads()} threads, {precision})"

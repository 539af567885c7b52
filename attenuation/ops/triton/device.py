"""Where the triton backend runs: on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` when the kernels were decorated), which is how the kernels are tested
without a GPU."""
from __future__ import annotations

import contextlib

import torch
from attenuation_triton.runtime import INTERPRET

__all__ = ["INTERPRET", "check_device", "launch_context"]


def check_device(device: torch.device) -> None:
    """Raise a clear error for tensors the kernels cannot take (instead of a crash in a kernel)."""
    if INTERPRET:
        if device.type != "cpu":
            raise RuntimeError("the triton backend runs under Triton's interpreter (TRITON_INTERPRET=1): "
                               f"it takes CPU tensors only, got {device.type} tensors")
    elif device.type != "cuda":
        raise RuntimeError(f"the triton backend takes CUDA tensors, got {device.type} tensors "
                           "(CPU tensors run only under TRITON_INTERPRET=1)")


def launch_context(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

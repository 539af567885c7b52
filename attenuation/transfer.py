"""Copies between the host and the device that do not make the host wait for the device."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A copy of the host tensor ``t`` on ``device``. On CUDA it goes through pinned memory, so the
    host does not wait (a copy from pageable memory synchronises the stream)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, copy=True)


class HostCopy:
    """A copy of the tensor ``t`` on the host, started at once; :meth:`wait` returns it.

    On CUDA the copy goes into pinned memory without blocking and ``wait`` waits for an event
    recorded after it, so the host waits only if the device has not got that far yet. Elsewhere it
    is a plain copy."""

    def __init__(self, t: Tensor):
        self._ready: Optional[torch.cuda.Event] = None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(t.device))
        else:
            self._host = t.to("cpu", copy=True)

    def wait(self) -> Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host

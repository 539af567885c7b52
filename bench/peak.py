"""The device's measured peaks, taken in the same run as every other figure so that the ratios
against them are honest: copy bandwidth (bytes read plus bytes written per second of a large
device-to-device copy) and the FLOP rate of a large square matrix product per dtype."""
from __future__ import annotations

import contextlib

import torch

from . import section
from .timing import interleaved
from .workload import Settings


def _sizes(device: torch.device, settings: Settings) -> tuple[int, int]:
    """(bytes copied, matrix size n): well beyond the caches, and long enough to time."""
    if settings.quick:
        return 32 << 20, 512
    return (1 << 30, 8192) if device.type == "cuda" else (256 << 20, 2048)


@contextlib.contextmanager
def _matmul_precision(precision: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def copy_bandwidth(device: torch.device, nbytes: int, settings: Settings) -> dict:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = interleaved({"copy": lambda: dst.copy_(src)}, device, settings.warmup, settings.repeats)["copy"]
    return {"bytes": nbytes, **timing, "gb_per_s": 2 * nbytes / timing["median_ms"] / 1e6}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, precision: str,
                settings: Settings) -> dict:
    """``precision`` is torch's float32 matmul precision: "highest" is true float32, "high" lets
    float32 products run on TF32 tensor cores (cuDNN convolutions use TF32 by default)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    with _matmul_precision(precision):
        timing = interleaved({"mm": lambda: a @ b}, device, settings.warmup, settings.repeats)["mm"]
    return {"n": n, **timing, "tflop_per_s": 2 * n ** 3 / timing["median_ms"] / 1e9}


def measure(device: torch.device, settings: Settings) -> dict:
    """Copy bandwidth and matrix-product FLOP rates of the device."""
    nbytes, n = _sizes(device, settings)
    kinds = {"float32": (torch.float32, "highest"), "bfloat16": (torch.bfloat16, "highest")}
    if device.type == "cuda":
        kinds["tf32"] = (torch.float32, "high")
    return {"copy": copy_bandwidth(device, nbytes, settings),
            "matmul": {name: matmul_rate(device, n, dtype, precision, settings)
                       for name, (dtype, precision) in kinds.items()}}


if __name__ == "__main__":
    section.main("peak", measure)

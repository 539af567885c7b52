"""Wall-clock timing shared by the measured sections: medians of repeated calls after warm-up,
with the device synchronised around every timed call."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def summarize(times_ms: list[float]) -> dict:
    """Median, min and interquartile range of a list of times in milliseconds."""
    ordered = sorted(times_ms)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median_ms": statistics.median(ordered), "min_ms": ordered[0],
            "iqr_ms": quartiles[2] - quartiles[0], "repeats": len(ordered)}


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                repeats: int) -> dict[str, dict]:
    """Time every callable ``repeats`` times, in turns (a, b, c, a, b, c, ...), after ``warmup``
    (at least one) untimed calls of each.

    Taking turns makes a change of the machine's load or clock during the measurement fall on
    every variant alike, so the ratios between variants measured in one call stay honest. A
    variant that raises during its warm-up is left out of the timing and reported as
    ``{"error": ...}``; the others are still measured."""
    failed = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 1)):
                fn()
        except Exception as error:
            failed[name] = {"error": f"{type(error).__name__}: {error}"}
    times: dict[str, list[float]] = {name: [] for name in fns if name not in failed}
    for _ in range(repeats):
        for name in times:
            times[name].append(timed_ms(fns[name], device))
    return {**{name: summarize(ts) for name, ts in times.items()}, **failed}


def one_shot(setup: Callable[[], object], fn: Callable[[object], object], device: torch.device,
             repeats: int) -> dict:
    """Time an operation that consumes its input (pruning a model, say): ``fn(setup())``, with
    only ``fn`` timed, ``repeats`` times on fresh inputs after one untimed warm-up call (the first
    call pays for imports, tracing and allocator growth)."""
    fn(setup())
    times = []
    for _ in range(repeats):
        state = setup()
        times.append(timed_ms(lambda: fn(state), device))
    return summarize(times)

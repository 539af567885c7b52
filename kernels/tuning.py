"""Run-time choice of block sizes for the masked-convolution kernels.

A :class:`Tuner` times every candidate configuration on the first launch of each problem key and
launches the fastest from then on. Keys are built by the caller from problem-size *buckets*
(powers of two, :func:`bucket`), not exact sizes: during pruning a layer's live channel count
takes many values, and tuning each one again would cost more than it saves. Tuning runs the kernel
several times on the real arguments, so it must not happen inside CUDA-graph capture: warm up
first. Configurations that do not fit the device (shared memory, registers) are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import triton
from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class Config:
    """Tile sizes of an implicit GEMM (M x N output tile, K step) and the launch parameters."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def launch_args(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    num_warps=self.num_warps, num_stages=self.num_stages)


def bucket(n: int) -> int:
    """The power of two at or above n (0 for 0): problems in one bucket share a configuration."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def _time_ms(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25)


class Tuner:
    """Per key, the fastest of ``configs`` (timed by ``time_ms``, a callable returning ms)."""

    def __init__(self, configs: Sequence[Config], time_ms: Optional[Callable] = None):
        self.configs = tuple(configs)
        self.best: dict[Hashable, Config] = {}
        self._time_ms = time_ms or _time_ms

    def launch(self, key: Hashable, launch: Callable[[Config], None],
               fits: Optional[Callable[[Config], bool]] = None) -> Config:
        """``launch(config)`` with the best configuration for ``key``, tuned on its first use among
        the configurations that ``fits`` admits (all of them when it admits none): ``fits`` must
        depend on nothing but what ``key`` holds."""
        config = self.best.get(key)
        if config is None:
            candidates = [c for c in self.configs if fits is None or fits(c)] or self.configs
            config = self.best[key] = self._choose(candidates, launch)
        launch(config)
        return config

    def _choose(self, candidates: Sequence[Config], launch: Callable[[Config], None]) -> Config:
        timings = {}
        for config in candidates:
            try:
                timings[config] = self._time_ms(lambda: launch(config))
            except OutOfResources:
                continue
        if not timings:
            raise RuntimeError("masked_conv2d: no kernel configuration fits this device")
        return min(timings, key=timings.get)

"""The host side of the model-wide ops on the triton backend: checks, launch plans (cached, see
:mod:`.tables`) and launches; no device value is ever read on the host.

``filter_norms``, ``select_weak``, ``select_weak_global``, ``attenuate_`` and ``zero_removed_``
are one launch each over the whole model: one per distinct weight dtype for the norms, one per
distinct combination of parameter dtypes for attenuate and zero (a model of one dtype takes one
launch). Per-layer vectors arrive as rows (bias, gamma, beta, running mean, running var), None
where absent. A weight whose filters do not each fill one dense block is copied first (the copy
is scaled and written back after the launch, for the in-place ops); 1-D vectors may have any
stride. The in-place ops raise TypeError for dtypes the kernels do not take.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from attenuation_triton import attenuate as attenuate_kernel
from attenuation_triton import filter_norms as norms_kernel
from attenuation_triton import select_weak as select_kernel
from attenuation_triton import select_weak_global as select_global_kernel
from attenuation_triton.runtime import TL_DTYPES
from torch import Tensor

from ..reference import MIN_LAYER_MEAN
from ..status import ACTIVE, REMOVED, WEAK
from .device import check_device, launch_context
from .tables import PLAN_CACHE, cached, layout, row_len, rows_dense, tables

# Block sizes (powers of two). The tests shrink them to exercise the block boundaries.
TUNING = {
    "norms_tile": 4096,          # BLOCK_F * BLOCK_K of filter_norms
    "norms_max_block_k": 128,    # BLOCK_K = next power of two of the longest row, at most this
    "attenuate_block_f": 32,
    "attenuate_block_k": 128,
    "select_block_i": 64,
    "select_block_j": 64,
}
STATUS_CODES = (ACTIVE, WEAK, REMOVED)
_VECTORS = ("bias", "gamma", "beta", "running mean", "running var")


def _empty(shape, dtype, device) -> Tensor:
    """Allocation of every fresh output (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _f32(x: float) -> float:
    """x rounded to float32 (what the kernel receives; huge values become inf, as in torch)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# ------------------------------------------------------------------------------------------ norms

def norms(weights: list[Tensor], ord: str) -> Tensor:
    """Per-filter norm of every (detached) weight, concatenated, float32."""
    device = weights[0].device
    check_device(device)
    out = _empty((sum(w.shape[0] for w in weights),), torch.float32, device)
    key = ("norms", device, TUNING["norms_tile"], TUNING["norms_max_block_k"], layout(weights))
    plan = PLAN_CACHE.get(key)
    if plan is None:
        plan, copies = _norms_plan(weights, device)    # copies: read by the kernel, alive until it is enqueued
        if not copies:
            cached(PLAN_CACHE, key, lambda: plan)
    with launch_context(device):
        for dtype, layers, blocks, n_blocks, block_f, block_k in plan:
            norms_kernel.launch(layers, blocks, out, n_blocks, dtype, ord, block_f, block_k)
    return out


def _norms_plan(weights: list[Tensor], device: torch.device) -> tuple[list, list[Tensor]]:
    """One launch per weight dtype: (dtype, tables, blocks, block sizes); and the copies made of
    weights the kernel cannot read where they lie (a plan holding their addresses is not reusable)."""
    groups: dict = {}
    copies = []
    offset = 0
    for original in weights:
        n = original.shape[0]
        if n:
            w = original if original.dtype in TL_DTYPES else original.float()  # the reference's conversion
            if not rows_dense(w):
                w = w.contiguous()
            if w is not original:
                copies.append(w)
            groups.setdefault(w.dtype, []).append((offset, w))
        offset += n
    plan = []
    for dtype, items in groups.items():
        max_k = max(row_len(w) for _, w in items)
        block_k = max(1, min(TUNING["norms_max_block_k"], _next_pow2(max_k)))
        block_f = max(1, TUNING["norms_tile"] // block_k)
        rows = [[off, w.shape[0], row_len(w), w.data_ptr(), w.stride(0)] for off, w in items]
        plan.append((dtype, *tables(rows, [w.shape[0] for _, w in items], block_f, device), block_f, block_k))
    return plan, copies


# ----------------------------------------------------------------------------------------- select

def select(scores: Tensor, removed: Tensor, counts: list[int], ks: Tensor) -> Tensor:
    """Per layer, the ``ks[l]`` lowest filters (removed first, ties by index): a flat bool mask."""
    device = scores.device
    check_device(device)
    scores = scores.float().contiguous()
    removed_u8 = removed.contiguous().view(torch.uint8)
    ks = ks.to(device=device, dtype=torch.int64).contiguous()
    out = _empty((sum(counts),), torch.uint8, device)
    layers, blocks, n_blocks = _select_tables(counts, device)
    if n_blocks:
        with launch_context(device):
            select_kernel.launch(layers, blocks, scores, removed_u8, ks, out, n_blocks, TUNING["select_block_i"],
                                 TUNING["select_block_j"])
    return out.view(torch.bool)


def _select_tables(counts: list[int], device: torch.device):
    """(layer table: flat offset and filter count per layer, block table, number of blocks) of the
    selection kernels, one program per ``select_block_i`` filters."""
    block_i = TUNING["select_block_i"]

    def build():
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return tables([[s, n] for s, n in zip(starts, counts)], counts, block_i, device)
    return cached(PLAN_CACHE, ("select", device, block_i, tuple(counts)), build)


def select_global(scores: Tensor, removed: Tensor, counts: list[int], n_weak: int) -> Tensor:
    """The n_weak lowest filters of the model by score relative to their layer's mean live score,
    every layer keeping one: a flat bool mask."""
    device = scores.device
    check_device(device)
    total = sum(counts)
    scores = scores.float().contiguous()
    removed_u8 = removed.contiguous().view(torch.uint8)
    out = _empty((total,), torch.uint8, device)
    layers, blocks, n_blocks = _select_tables(counts, device)
    if n_blocks:
        with launch_context(device):
            select_global_kernel.launch(layers, blocks, len(counts), scores, removed_u8, min(n_weak, total), out,
                                        n_blocks, MIN_LAYER_MEAN, TUNING["select_block_i"],
                                        TUNING["select_block_j"])
    return out.view(torch.bool)


# -------------------------------------------------------------------------------- attenuate, zero

def attenuate_filters(weights, vectors, weak, status, multiplier, factor, eps, restore) -> tuple[Tensor, Tensor]:
    """One attenuation step in place; ``vectors``: per layer (bias, gamma, beta, running mean,
    running var). Returns flat bool masks (returned, newly_removed)."""
    returned, newly = _scale_filters(weights, vectors, status, multiplier, weak, factor, eps, restore,
                                     zero_only=False)
    return returned.view(torch.bool), newly.view(torch.bool)


def zero_removed(weights, vectors, status: Tensor) -> None:
    """Zero (multiply by 0, as the reference does) every removed filter's weight row and vectors."""
    _scale_filters(weights, vectors, status.contiguous(), None, None, 1.0, 0.0, False, zero_only=True)


def _scale_filters(weights, vectors, status: Tensor, multiplier: Optional[Tensor], weak: Optional[Tensor],
                   factor: float, eps: float, restore: bool, zero_only: bool):
    """Shared host side of attenuate and zero: the (cached) plan, launches, autograd versions."""
    device = status.device
    check_device(device)
    total = status.shape[0]
    if zero_only:
        returned = newly = None
        mult_arg = weak_arg = returned_arg = newly_arg = status       # never touched
    else:
        returned = _empty((total,), torch.uint8, device)
        newly = _empty((total,), torch.uint8, device)
        mult_arg, weak_arg, returned_arg, newly_arg = multiplier, weak.contiguous().view(torch.uint8), returned, newly
    tensors = [t for w, vector in zip(weights, vectors) for t in (w, *vector)]
    key = ("scale", device, TUNING["attenuate_block_f"], status.data_ptr(), layout(tensors))
    plan = PLAN_CACHE.get(key)
    write_back: list[tuple[Tensor, Tensor]] = []
    if plan is None:
        plan, write_back = _scale_plan(weights, vectors, status, device)
        if not write_back:      # a plan holding the addresses of fresh copies is not reusable
            cached(PLAN_CACHE, key, lambda: plan)
    block_f, block_k = TUNING["attenuate_block_f"], TUNING["attenuate_block_k"]
    with launch_context(device):
        for dtypes, layers, blocks, n_blocks in plan:
            attenuate_kernel.launch(layers, blocks, status, mult_arg, weak_arg, returned_arg, newly_arg, n_blocks,
                                    _f32(factor), _f32(eps), dtypes, STATUS_CODES, zero_only, restore,
                                    block_f, block_k)
    for target, copy in write_back:
        target.copy_(copy)
    written = [t for t in tensors if t is not None] + ([] if zero_only else [status, multiplier])
    torch.autograd.graph.increment_version(written)     # tensors modified in place: autograd versions
    return returned, newly


def _checked_dtype(t: Tensor, layer: int, what: str) -> torch.dtype:
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"triton backend: layer {layer} {what} has dtype {t.dtype}; supported are "
                        "float16, bfloat16, float32, float64")
    return t.dtype


def _scale_plan(weights, vectors, status: Tensor, device: torch.device):
    """One launch per combination of parameter dtypes: [(dtypes, layer table, block table, number of
    blocks)], and the (tensor, copy) pairs of tensors the kernel cannot update where they lie (it
    updates the copy, written back after the launch)."""
    dummy = status.data_ptr()           # a valid address for missing tensors, never dereferenced
    write_back: list[tuple[Tensor, Tensor]] = []
    groups: dict = {}
    start = 0
    for i, w in enumerate(weights):
        n = w.shape[0]
        dtypes = [_checked_dtype(w, i, "weight")]
        data = w.detach()
        k = row_len(data)
        if not (rows_dense(data) and (n <= 1 or data.stride(0) >= k)):
            copy = data.contiguous()
            write_back.append((data, copy))
            data = copy
        row = [start, n, k, data.data_ptr(), data.stride(0)]
        for what, t in zip(_VECTORS, vectors[i]):
            if t is None:
                row += [dummy, 0, 0]
                dtypes.append(torch.float32)        # any dtype: never read, and groups stay few
                continue
            dtypes.append(_checked_dtype(t, i, what))
            v = t.detach()
            if n > 1 and v.stride(0) == 0:   # overlapping elements: let copy_ say what the reference says
                copy = v.contiguous()
                write_back.append((v, copy))
                v = copy
            row += [v.data_ptr(), v.stride(0), 1]
        groups.setdefault(tuple(dtypes), []).append((row, n))
        start += n
    plan = []
    for dtypes, items in groups.items():
        layers, blocks, n_blocks = tables([row for row, _ in items], [n for _, n in items],
                                          TUNING["attenuate_block_f"], device)
        if n_blocks:
            plan.append((dtypes, layers, blocks, n_blocks))
    return plan, write_back

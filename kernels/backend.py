"""The Triton backend: the ops of :mod:`attenuation.ops.reference`, same signatures.

``filter_norms``, ``select_weak``, ``select_weak_global``, ``attenuate_`` and ``zero_removed_`` are
one kernel launch each over the whole model (one per distinct weight dtype for ``filter_norms``, one
per distinct combination of parameter dtypes for ``attenuate_`` and ``zero_removed_``; a model of
one dtype takes one launch). They
never read a device value on the host: the tables of addresses and shapes are built from host
metadata only, and uploaded once per distinct content (cached, see ``_device_table``).
``masked_conv2d`` runs the implicit-GEMM kernels of :mod:`.masked_conv2d` (forward and backward,
registered as torch custom ops); cases they do not cover fall back to the reference with a
one-time warning.

Tensor contract:
- A weight is read (and written, for the in-place ops) where it lies when each filter's elements
  fill one dense block (``_rows_dense``): contiguous, channels-last, any permutation of the inner
  dimensions, any filter stride. Other weights are copied with ``.contiguous()`` first; for the
  in-place ops the copy is scaled and written back with ``copy_`` after the launch (extra
  operations, still no synchronisation). 1-D per-filter tensors may have any stride.
- Supported dtypes: float16, bfloat16, float32, float64 (``filter_norms`` converts other floating
  weights to float32, as the reference does; the in-place ops raise TypeError for them).
- Devices: CUDA tensors; CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``),
  which is how the kernels are tested without a GPU.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from . import attenuate as _attenuate
from . import filter_norms as _filter_norms
from . import masked_conv2d as _masked_conv2d
from . import select_weak as _select_weak
from . import select_weak_global as _select_weak_global

INTERPRET = not isinstance(_filter_norms.filter_norms_kernel, triton.runtime.jit.JITFunction)
"""True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 when they were decorated):
``triton.jit`` then returns an interpreted function instead of a JITFunction."""

ACTIVE, WEAK, REMOVED = _attenuate.ACTIVE, _attenuate.WEAK, _attenuate.REMOVED

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}

# Block sizes (powers of two). The tests shrink them to exercise the block boundaries.
TUNING = {
    "norms_tile": 4096,          # BLOCK_F * BLOCK_K of filter_norms
    "norms_max_block_k": 128,    # BLOCK_K = next power of two of the longest row, at most this
    "attenuate_block_f": 32,
    "attenuate_block_k": 128,
    "select_block_i": 64,
    "select_block_j": 64,
}


def _empty(shape, dtype, device) -> Tensor:
    """Allocation of every fresh output (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_device(device: torch.device) -> None:
    if INTERPRET:
        if device.type != "cpu":
            raise RuntimeError("the triton backend runs under Triton's interpreter (TRITON_INTERPRET=1): "
                               f"it takes CPU tensors only, got {device.type} tensors")
    elif device.type != "cuda":
        raise RuntimeError(f"the triton backend takes CUDA tensors, got {device.type} tensors "
                           "(CPU tensors run only under TRITON_INTERPRET=1)")


def _launch_context(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


_CACHE_SIZE = 64
_TABLE_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_PLAN_CACHE: "OrderedDict[tuple, list]" = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, build):
    """``cache[key]``, built by ``build()`` on a miss (least recently used entries are dropped)."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _layout(tensors: Sequence[Optional[Tensor]]) -> tuple:
    """Everything a launch plan reads of ``tensors``: address, dtype, shape, strides (None: absent).

    A plan (the dtype groups and device tables of a launch) is a pure function of this, so a plan
    cached under it is always right, even for a tensor freed and another allocated at its address;
    computing it costs a small part of building the plan (the host side of a step over VGG-16)."""
    return tuple(None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors)


def _device_table(values: list[int], device: torch.device) -> Tensor:
    """``values`` as an int64 tensor on ``device``, uploaded once per distinct content.

    The table is a pure function of its values (addresses included), so a cached copy is always
    right. On CUDA the upload goes through pinned memory, asynchronously (no synchronisation).
    """
    def upload() -> Tensor:
        from attenuation.transfer import to_device   # here: importing attenuation imports this module
        return to_device(torch.tensor(values, dtype=torch.int64), device)
    return _cached(_TABLE_CACHE, (device, tuple(values)), upload)


def _tables(layer_rows: list[list[int]], counts: Sequence[int], block: int, device: torch.device):
    """Upload the layer table and the block table (layer, first filter) of one program per block
    of ``block`` filters; returns (layers, blocks, number of blocks)."""
    blocks = [v for layer, n in enumerate(counts) for f0 in range(0, n, block) for v in (layer, f0)]
    flat = [v for row in layer_rows for v in row]
    table = _device_table(flat + blocks, device)
    return table[:len(flat)], table[len(flat):], len(blocks) // 2


def _rows_dense(t: Tensor) -> bool:
    """Does every filter (index along dim 0) fill one dense block of t[0].numel() elements?"""
    if t.shape[0] == 0 or _row_len(t) == 0:
        return True
    dims = sorted((stride, size) for size, stride in zip(t.shape[1:], t.stride()[1:]) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _row_len(t: Tensor) -> int:
    return math.prod(t.shape[1:])


def _f32(x: float) -> float:
    """x rounded to float32 (what the kernel receives; huge values become inf, as in torch)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# ------------------------------------------------------------------------------------------ norms

def filter_norms(weights: Sequence[Tensor], ord: str) -> Tensor:
    """Per-filter norm of every weight (filter = index along dim 0), concatenated, float32."""
    if ord not in _filter_norms.ORD_CODES:
        raise ValueError(f"unknown norm {ord!r}: expected 'l1', 'l2' or 'linf'")
    weights = [w.detach() for w in weights]
    return (_filter_norms_op if torch.compiler.is_compiling() else _norms)(weights, ord)


def _norms(weights: list[Tensor], ord: str) -> Tensor:
    device = weights[0].device
    _check_device(device)
    out = _empty((sum(w.shape[0] for w in weights),), torch.float32, device)
    key = ("norms", device, TUNING["norms_tile"], TUNING["norms_max_block_k"], _layout(weights))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan, copies = _norms_plan(weights, device)    # copies: read by the kernel, alive until it is enqueued
        if not copies:
            _cached(_PLAN_CACHE, key, lambda: plan)
    with _launch_context(device):
        for dtype, layers, blocks, n_blocks, block_f, block_k in plan:
            _filter_norms.launch(layers, blocks, out, n_blocks, _TL_DTYPES[dtype], ord, block_f, block_k)
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
            w = original if original.dtype in _TL_DTYPES else original.float()  # the reference's conversion
            if not _rows_dense(w):
                w = w.contiguous()
            if w is not original:
                copies.append(w)
            groups.setdefault(w.dtype, []).append((offset, w))
        offset += n
    plan = []
    for dtype, items in groups.items():
        max_k = max(_row_len(w) for _, w in items)
        block_k = max(1, min(TUNING["norms_max_block_k"], _next_pow2(max_k)))
        block_f = max(1, TUNING["norms_tile"] // block_k)
        rows = [[off, w.shape[0], _row_len(w), w.data_ptr(), w.stride(0)] for off, w in items]
        plan.append((dtype, *_tables(rows, [w.shape[0] for _, w in items], block_f, device), block_f, block_k))
    return plan, copies


# ----------------------------------------------------------------------------------------- select

def select_weak(scores: Tensor, removed: Tensor, counts: Sequence[int], ks: Tensor) -> Tensor:
    """Per layer, mark the ``ks[l]`` lowest-scoring filters: removed filters first, then by score,
    ties broken by lower index. Returns a flat bool mask."""
    counts = [int(c) for c in counts]
    return (_select_weak_op if torch.compiler.is_compiling() else _select)(scores, removed, counts, ks)


def _select(scores: Tensor, removed: Tensor, counts: list[int], ks: Tensor) -> Tensor:
    device = scores.device
    _check_device(device)
    scores = scores.float().contiguous()
    removed_u8 = removed.contiguous().view(torch.uint8)
    ks = ks.to(device=device, dtype=torch.int64).contiguous()
    out = _empty((sum(counts),), torch.uint8, device)
    layers, blocks, n_blocks = _select_tables(counts, device)
    if n_blocks:
        with _launch_context(device):
            _select_weak.launch(layers, blocks, scores, removed_u8, ks, out, n_blocks, TUNING["select_block_i"],
                                TUNING["select_block_j"])
    return out.view(torch.bool)


def _select_tables(counts: list[int], device: torch.device):
    """(layer table: flat offset and filter count per layer, block table, number of blocks) of the
    selection kernels, one program per ``select_block_i`` filters."""
    block_i = TUNING["select_block_i"]

    def build():
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return _tables([[s, n] for s, n in zip(starts, counts)], counts, block_i, device)
    return _cached(_PLAN_CACHE, ("select", device, block_i, tuple(counts)), build)


def select_weak_global(scores: Tensor, removed: Tensor, counts: Sequence[int], n_weak: int) -> Tensor:
    """The reference's ``select_weak_global`` (one threshold over all layers on scores relative to
    their layer's mean live score) in one launch; returns a flat bool mask."""
    counts = [int(c) for c in counts]
    op = _select_weak_global_op if torch.compiler.is_compiling() else _select_global
    return op(scores, removed, counts, int(n_weak))


def _select_global(scores: Tensor, removed: Tensor, counts: list[int], n_weak: int) -> Tensor:
    device = scores.device
    _check_device(device)
    total = sum(counts)
    scores = scores.float().contiguous()
    removed_u8 = removed.contiguous().view(torch.uint8)
    out = _empty((total,), torch.uint8, device)
    layers, blocks, n_blocks = _select_tables(counts, device)
    if n_blocks:
        with _launch_context(device):
            _select_weak_global.launch(layers, blocks, len(counts), scores, removed_u8, min(n_weak, total), out,
                                       n_blocks, TUNING["select_block_i"], TUNING["select_block_j"])
    return out.view(torch.bool)


# -------------------------------------------------------------------------------- attenuate, zero

_SLOTS = ("bias", "gamma", "beta", "running mean", "running var")


def _scale_filters(weights, vectors, status: Tensor, multiplier: Optional[Tensor], weak: Optional[Tensor],
                   factor: float, eps: float, restore: bool, zero_only: bool):
    """Shared host side of attenuate_ and zero_removed_: the (cached) plan, launches, versions."""
    device = status.device
    _check_device(device)
    total = status.shape[0]
    if zero_only:
        returned = newly = None
        mult_arg = weak_arg = returned_arg = newly_arg = status       # never touched
    else:
        returned = _empty((total,), torch.uint8, device)
        newly = _empty((total,), torch.uint8, device)
        mult_arg, weak_arg, returned_arg, newly_arg = multiplier, weak.contiguous().view(torch.uint8), returned, newly
    tensors = [t for w, vector in zip(weights, vectors) for t in (w, *vector)]
    key = ("scale", device, TUNING["attenuate_block_f"], status.data_ptr(), _layout(tensors))
    plan = _PLAN_CACHE.get(key)
    write_back: list[tuple[Tensor, Tensor]] = []
    if plan is None:
        plan, write_back = _scale_plan(weights, vectors, status, device)
        if not write_back:      # a plan holding the addresses of fresh copies is not reusable
            _cached(_PLAN_CACHE, key, lambda: plan)
    block_f, block_k = TUNING["attenuate_block_f"], TUNING["attenuate_block_k"]
    with _launch_context(device):
        for dtypes, layers, blocks, n_blocks in plan:
            _attenuate.launch(layers, blocks, status, mult_arg, weak_arg, returned_arg, newly_arg, n_blocks,
                              _f32(factor), _f32(eps), dtypes, zero_only, restore, block_f, block_k)
    for target, copy in write_back:
        target.copy_(copy)
    written = [t for t in tensors if t is not None] + ([] if zero_only else [status, multiplier])
    torch.autograd.graph.increment_version(written)     # tensors modified in place: autograd versions
    return returned, newly


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
        if w.dtype not in _TL_DTYPES:
            raise TypeError(f"triton backend: layer {i} weight has dtype {w.dtype}; supported are "
                            "float16, bfloat16, float32, float64")
        data = w.detach()
        k = _row_len(data)
        if not (_rows_dense(data) and (n <= 1 or data.stride(0) >= k)):
            copy = data.contiguous()
            write_back.append((data, copy))
            data = copy
        row = [start, n, k, data.data_ptr(), data.stride(0)]
        dtypes = [_TL_DTYPES[w.dtype]]
        for slot, t in zip(_SLOTS, vectors[i]):
            if t is None:
                row += [dummy, 0, 0]
                dtypes.append(tl.float32)
                continue
            if t.dtype not in _TL_DTYPES:
                raise TypeError(f"triton backend: layer {i} {slot} has dtype {t.dtype}; supported are "
                                "float16, bfloat16, float32, float64")
            v = t.detach()
            if n > 1 and v.stride(0) == 0:   # overlapping elements: let copy_ say what the reference says
                copy = v.contiguous()
                write_back.append((v, copy))
                v = copy
            row += [v.data_ptr(), v.stride(0), 1]
            dtypes.append(_TL_DTYPES[t.dtype])
        groups.setdefault(tuple(dtypes), []).append((row, n))
        start += n
    plan = []
    for dtypes, items in groups.items():
        layers, blocks, n_blocks = _tables([row for row, _ in items], [n for _, n in items],
                                           TUNING["attenuate_block_f"], device)
        if n_blocks:
            plan.append((dtypes, layers, blocks, n_blocks))
    return plan, write_back


def attenuate_(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
               gammas: Sequence[Optional[Tensor]], betas: Sequence[Optional[Tensor]],
               weak: Tensor, status: Tensor, multiplier: Tensor, factor: float,
               eps: float, restore: bool = False,
               running_means: Optional[Sequence[Optional[Tensor]]] = None,
               running_vars: Optional[Sequence[Optional[Tensor]]] = None) -> tuple[Tensor, Tensor]:
    """One attenuation step in place over the whole model, the rule of the reference's
    ``attenuate_``; returns flat bool masks (returned, newly_removed)."""
    for name, t in (("status", status), ("multiplier", multiplier)):
        if not t.is_contiguous():
            raise ValueError(f"triton backend: {name} must be contiguous (it is updated in place)")
    no_stats = [None] * len(weights)
    per_kind = (biases, gammas, betas, running_means or no_stats, running_vars or no_stats)
    if torch.compiler.is_compiling():
        from attenuation.ops.slots import flat_vectors
        return _attenuate_op([w.detach() for w in weights], *flat_vectors(*per_kind), weak, status, multiplier,
                             float(factor), float(eps), bool(restore))
    return _attenuate_filters(weights, list(zip(*per_kind)), weak, status, multiplier, factor, eps, restore)


def _attenuate_filters(weights, vectors, weak, status, multiplier, factor, eps, restore) -> tuple[Tensor, Tensor]:
    returned, newly = _scale_filters(weights, vectors, status, multiplier, weak, factor, eps, restore,
                                     zero_only=False)
    return returned.view(torch.bool), newly.view(torch.bool)


def zero_removed_(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                  gammas: Sequence[Optional[Tensor]], betas: Sequence[Optional[Tensor]],
                  status: Tensor) -> None:
    """Zero (multiply by 0, as the reference does) every removed filter's weight row, bias, gamma, beta."""
    if torch.compiler.is_compiling():
        from attenuation.ops.slots import flat_vectors
        _zero_removed_op([w.detach() for w in weights], *flat_vectors(biases, gammas, betas), status)
        return
    _zero_removed(weights, [(b, g, bt, None, None) for b, g, bt in zip(biases, gammas, betas)], status)


def _zero_removed(weights, vectors, status: Tensor) -> None:
    _scale_filters(weights, vectors, status.contiguous(), None, None, 1.0, 0.0, False, zero_only=True)


# ------------------------------------------------------------------ torch.library registration
# The model-wide ops as torch custom ops with fake implementations, so that torch.compile traces a
# step calling them (fullgraph). The optional per-layer vectors travel as a flat list plus slots
# (attenuation.ops.slots), as in the native extension. Eager calls run the same implementations
# without the dispatcher, whose Python custom-op path costs about 40 us a call on the 2-core Xeon:
# as much as the whole host side of a VGG-16 step.

@torch.library.custom_op("attenuation_triton::filter_norms", mutates_args=())
def _filter_norms_op(weights: list[Tensor], ord: str) -> Tensor:
    return _norms(weights, ord)


@_filter_norms_op.register_fake
def _(weights, ord):
    return weights[0].new_empty((sum(w.shape[0] for w in weights),), dtype=torch.float32)


@torch.library.custom_op("attenuation_triton::select_weak", mutates_args=())
def _select_weak_op(scores: Tensor, removed: Tensor, counts: list[int], ks: Tensor) -> Tensor:
    return _select(scores, removed, counts, ks)


@torch.library.custom_op("attenuation_triton::select_weak_global", mutates_args=())
def _select_weak_global_op(scores: Tensor, removed: Tensor, counts: list[int], n_weak: int) -> Tensor:
    return _select_global(scores, removed, counts, n_weak)


@_select_weak_op.register_fake
@_select_weak_global_op.register_fake
def _(scores, removed, counts, k):
    return torch.empty_like(removed)


@torch.library.custom_op("attenuation_triton::attenuate_",
                         mutates_args=("weights", "vectors", "status", "multiplier"))
def _attenuate_op(weights: list[Tensor], vectors: list[Tensor], slots: list[int], weak: Tensor, status: Tensor,
                  multiplier: Tensor, factor: float, eps: float, restore: bool) -> tuple[Tensor, Tensor]:
    from attenuation.ops.slots import per_layer_vectors
    return _attenuate_filters(weights, per_layer_vectors(len(weights), vectors, slots), weak, status,
                              multiplier, factor, eps, restore)


@_attenuate_op.register_fake
def _(weights, vectors, slots, weak, status, multiplier, factor, eps, restore):
    return torch.empty_like(weak), torch.empty_like(weak)


@torch.library.custom_op("attenuation_triton::zero_removed_", mutates_args=("weights", "vectors"))
def _zero_removed_op(weights: list[Tensor], vectors: list[Tensor], slots: list[int], status: Tensor) -> None:
    from attenuation.ops.slots import per_layer_vectors
    _zero_removed(weights, per_layer_vectors(len(weights), vectors, slots), status)


@_zero_removed_op.register_fake
def _(weights, vectors, slots, status):
    return None


# ------------------------------------------------------------------------------------ masked conv

def _autocast_operand(t: Optional[Tensor], device_type: str) -> Optional[Tensor]:
    """What autocast gives a convolution: float16/bfloat16/float32 tensors in the autocast dtype
    (float64 and non-floating tensors stay as they are)."""
    if t is None or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return t
    return t.to(torch.get_autocast_dtype(device_type))


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_index: Optional[Tensor],
                  in_index: Optional[Tensor], scale: Optional[Tensor], stride, padding, dilation,
                  groups: int = 1) -> Tensor:
    """The reference's masked convolution as Triton implicit-GEMM kernels (forward and backward,
    see :mod:`attenuation_triton.masked_conv2d`). Cases the kernels do not cover (groups != 1,
    other dtypes, string padding, ...) run the reference implementation, with a warning once per
    process. Under autocast the floating operands are cast to the autocast dtype first, as F.conv2d
    would cast them."""
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias, scale = (_autocast_operand(t, x.device.type) for t in (x, weight, bias, scale))
    why = _masked_conv2d.unsupported(x, weight, bias, scale, stride, padding, dilation, groups)
    if why is not None:
        from attenuation.ops import reference
        from attenuation.ops.backends import warn_reference_fallback
        warn_reference_fallback("triton", "masked_conv2d", why)
        return reference.masked_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding,
                                       dilation, groups)
    _check_device(x.device)
    out_index = None if out_index is None else out_index.contiguous()
    in_index = None if in_index is None else in_index.contiguous()
    bias = None if bias is None else bias.contiguous()
    scale = None if scale is None else scale.contiguous()
    with _launch_context(x.device):
        return _masked_conv2d.masked_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding,
                                            dilation)

"""Per-filter L1 / L2 / Linf norms of many conv weights in one launch (a multi-tensor kernel).

The weights are not kernel arguments: a device table holds, per layer, the weight's base address
(an int64 cast to a typed pointer in the kernel), its number of filters, row length and filter
stride, and where its norms start in the flat output. A second table maps each program to
(layer, first filter): one program per block of ``BLOCK_F`` filters of one layer, over all layers.

Layout contract (the caller's to meet): each filter's elements fill one dense
block of ``K`` elements starting at ``base + f * filter_stride`` (any order inside the block, so
contiguous, channels-last and inner-transposed weights are read in place). Norms accumulate in
float32 whatever the weight dtype; one launch handles one weight dtype (``DTYPE`` is a
compile-time constant).
"""
import triton
import triton.language as tl

from .layer_table import program_filters
from .runtime import TL_DTYPES

# Columns of a layer row of the table: output offset, number of filters, row length K, weight
# address, filter stride (elements).
NCOL = 5
ORD_CODES = {"l1": 0, "l2": 1, "linf": 2}


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def filter_norms_kernel(layers_ptr, blocks_ptr, out_ptr,
                        DTYPE: tl.constexpr, ORD: tl.constexpr, NCOL: tl.constexpr,
                        BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    row, out_offset, K, f, fmask = program_filters(layers_ptr, blocks_ptr, NCOL, BLOCK_F)
    base = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    fstride = tl.load(row + 4)
    rows = base + f * fstride
    acc = tl.zeros([BLOCK_F, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = fmask[:, None] & (k < K)[None, :]
        x = tl.load(rows[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if ORD == 0:
            acc += tl.abs(x)
        elif ORD == 1:
            acc += x * x
        else:
            acc = tl.maximum(acc, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    if ORD == 2:
        norm = tl.reduce(acc, 1, _max_keep_nan)
    elif ORD == 1:
        norm = tl.sqrt(tl.sum(acc, axis=1))
    else:
        norm = tl.sum(acc, axis=1)
    tl.store(out_ptr + out_offset + f, norm, mask=fmask)


def launch(layers, blocks, out, n_blocks: int, dtype, ord: str, block_f: int, block_k: int) -> None:
    """``layers``: int64 device table, NCOL columns per layer; ``blocks``: (layer, first filter)
    per program; ``out``: flat float32; ``dtype``: the torch dtype of every weight in the table."""
    filter_norms_kernel[(n_blocks,)](layers, blocks, out, DTYPE=TL_DTYPES[dtype], ORD=ORD_CODES[ord],
                                     NCOL=NCOL, BLOCK_F=block_f, BLOCK_K=block_k)

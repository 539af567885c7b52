"""The attenuation step (and the removed-filter re-zeroing) over the whole model in one launch.

One program per block of ``BLOCK_F`` filters of one layer (a block table maps programs to
(layer, first filter)). Each program

1. reads its filters' status / multiplier / weak flag from the flat per-filter state and applies
   the rule of the reference implementation's ``attenuate_`` to get each filter's scale
   (``ZERO_ONLY``: scale = 0 for removed filters, 1 otherwise, the state is left alone). The
   status codes are the caller's, compile-time constants of the launch (ACTIVE, WEAK, REMOVED);
2. writes the new status and multiplier and the ``returned`` / ``newly_removed`` masks;
3. multiplies the filter's bias, BN gamma, beta and running mean by the scale and the running
   variance by its square, then the filter's weight row, block by block. Rows whose scale is
   exactly 1 are not touched at all (x * 1 == x), so a step costs the traffic of the scaled
   filters only.

The tensors are reached through a device table, one row of ``NCOL`` int64 per layer: the flat
offset of the layer's first filter, its number of filters, the weight row length, the weight's base
address and filter stride, then (address, stride, present) for bias, gamma, beta, running mean,
running variance. A missing tensor has present = 0 (its address is a valid dummy that is never
dereferenced). Addresses are cast to typed pointers in the kernel; the element types are
compile-time constants, so one launch covers the layers sharing one combination of dtypes.
Arithmetic follows the reference: the scale is rounded to the tensor's dtype, then multiplied in
float32 (exact for 16-bit types, the product of two 16-bit floats fits in float32) and rounded
back; float64 tensors are scaled in float64.
"""
import triton
import triton.language as tl

from .layer_table import program_filters
from .runtime import TL_DTYPES

# Columns of a layer row of the table: flat offset of the first filter, number of filters, weight
# row length, weight address, weight filter stride, then (address, stride, present) per vector.
BIAS, GAMMA, BETA, MEAN, VAR = (tl.constexpr(c) for c in (5, 8, 11, 14, 17))
NCOL = 20


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE, rounding to nearest even. For bfloat16 this is done on the bits: Triton's
    interpreter truncates float32 -> bfloat16 (compiled code would round), and one code path for
    both keeps what the CPU tests check what the GPU runs. NaN becomes torch's quiet NaN."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _scaled(x, s, DTYPE: tl.constexpr):
    """x * s as the reference computes it: s (float32) rounded to DTYPE first, the product rounded
    to DTYPE (computed in float32, where the product of two 16-bit floats is exact)."""
    if DTYPE == tl.float64:
        y = x * s.to(tl.float64)
    elif DTYPE == tl.float32:
        y = x * s
    else:
        y = _round(x.to(tl.float32) * _round(s, DTYPE).to(tl.float32), DTYPE)
    return y


@triton.jit
def _scale_vector_(row, COL: tl.constexpr, f, need, s, DTYPE: tl.constexpr):
    present = tl.load(row + COL + 2)
    base = tl.load(row + COL).to(tl.pointer_type(DTYPE))
    stride = tl.load(row + COL + 1)
    mask = need & (present != 0)
    ptrs = base + f * stride
    x = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, _scaled(x, s, DTYPE), mask=mask)


@triton.jit
def attenuate_kernel(layers_ptr, blocks_ptr, status_ptr, mult_ptr, weak_ptr, returned_ptr, newly_ptr,
                     factor, eps,
                     W_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                     BT_DTYPE: tl.constexpr, RM_DTYPE: tl.constexpr, RV_DTYPE: tl.constexpr,
                     ACTIVE: tl.constexpr, WEAK: tl.constexpr, REMOVED: tl.constexpr,
                     ZERO_ONLY: tl.constexpr, RESTORE: tl.constexpr, NCOL: tl.constexpr,
                     BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    row, start, K, f, fmask = program_filters(layers_ptr, blocks_ptr, NCOL, BLOCK_F)  # K: weight row length
    flat = start + f
    status = tl.load(status_ptr + flat, mask=fmask, other=0)
    if ZERO_ONLY:
        scale = tl.where(status == REMOVED, 0.0, 1.0)
    else:
        mult = tl.load(mult_ptr + flat, mask=fmask, other=1.0)
        weak = tl.load(weak_ptr + flat, mask=fmask, other=0) != 0
        was_removed = status == REMOVED
        hit = weak & ~was_removed
        new_mult = tl.where(hit, mult * factor, 1.0)
        newly = hit & (new_mult < eps)
        returned = (status == WEAK) & ~weak
        removed = was_removed | newly
        kept = tl.where(hit, factor, 1.0)
        if RESTORE:
            undo = returned & (mult > 0)
            kept = tl.where(undo, tl.math.div_rn(tl.full([BLOCK_F], 1.0, tl.float32),
                                                 tl.maximum(mult, 1e-30)), kept)
        scale = tl.where(removed, 0.0, kept)
        new_status = tl.where(removed, REMOVED, tl.where(weak, WEAK, ACTIVE))
        tl.store(status_ptr + flat, new_status.to(tl.uint8), mask=fmask)
        tl.store(mult_ptr + flat, tl.where(removed, 0.0, new_mult), mask=fmask)
        tl.store(returned_ptr + flat, returned.to(tl.uint8), mask=fmask)
        tl.store(newly_ptr + flat, newly.to(tl.uint8), mask=fmask)

    need = fmask & (scale != 1.0)
    _scale_vector_(row, BIAS, f, need, scale, B_DTYPE)
    _scale_vector_(row, GAMMA, f, need, scale, G_DTYPE)
    _scale_vector_(row, BETA, f, need, scale, BT_DTYPE)
    if not ZERO_ONLY:
        _scale_vector_(row, MEAN, f, need, scale, RM_DTYPE)
        _scale_vector_(row, VAR, f, need, scale * scale, RV_DTYPE)

    if tl.max(need.to(tl.int32), axis=0) > 0:           # any weight row of this block to scale?
        base = tl.load(row + 3).to(tl.pointer_type(W_DTYPE))
        fstride = tl.load(row + 4)
        rows = base + f * fstride
        s = scale[:, None]
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = need[:, None] & (k < K)[None, :]
            ptrs = rows[:, None] + k[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, _scaled(x, s, W_DTYPE), mask=mask)


def launch(layers, blocks, status, multiplier, weak_u8, returned_u8, newly_u8, n_blocks: int,
           factor: float, eps: float, dtypes, codes, zero_only: bool, restore: bool,
           block_f: int, block_k: int) -> None:
    """``dtypes``: torch dtypes of (weight, bias, gamma, beta, running mean, running var) of every
    layer in the table (any of the kernels' dtypes for a vector no layer has); ``codes``: the
    status codes (active, weak, removed) that ``status`` holds. With ``zero_only`` the multiplier /
    weak / returned / newly arguments are not touched (any tensor of the device will do)."""
    w, b, g, bt, rm, rv = (TL_DTYPES[dtype] for dtype in dtypes)
    active, weak, removed = (int(code) for code in codes)
    attenuate_kernel[(n_blocks,)](layers, blocks, status, multiplier, weak_u8, returned_u8, newly_u8,
                                  float(factor), float(eps),
                                  W_DTYPE=w, B_DTYPE=b, G_DTYPE=g, BT_DTYPE=bt, RM_DTYPE=rm, RV_DTYPE=rv,
                                  ACTIVE=active, WEAK=weak, REMOVED=removed,
                                  ZERO_ONLY=bool(zero_only), RESTORE=bool(restore), NCOL=NCOL,
                                  BLOCK_F=block_f, BLOCK_K=block_k)

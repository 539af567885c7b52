"""Per layer, the k lowest filters, as a flat mask, in one launch over all layers.

Order (exactly the reference's): removed filters first, then ascending score, ties broken by the
lower index; NaN scores sort after every number and equal each other (as torch.sort does), and
-0.0 equals 0.0. A filter's rank is the number of filters of its layer that precede it under this
strict total order, counted by pairwise comparison of (removed, score, index) keys in
``BLOCK_I x BLOCK_J`` tiles; the filter is selected when rank < k. Ranks are a permutation of
0..n-1, so exactly min(max(k, 0), n) filters are selected per layer. ``ks`` is read on the device.

One program per block of ``BLOCK_I`` filters of one layer (a block table maps programs to
(layer, first filter)); each loops over its whole layer. Cost O(n^2) per layer: fine for conv
layers (n <= a few thousand filters).
"""
import triton
import triton.language as tl

from .layer_table import program_layer

# Columns of a layer row of the table: flat offset of the layer's first filter, number of filters.
NCOL = 2


@triton.jit
def _precedes(r_a, s_a, i_a, r_b, s_b, i_b):
    """Does filter a come before filter b? (removed first, then score, NaN last, then index)"""
    a_nan = s_a != s_a
    b_nan = s_b != s_b
    s_less = (s_a < s_b) | (~a_nan & b_nan)
    s_equal = (s_a == s_b) | (a_nan & b_nan)
    same_removed = r_a == r_b
    return (r_a & ~r_b) | (same_removed & (s_less | (s_equal & (i_a < i_b))))


@triton.jit
def load_keys(scores_ptr, removed_ptr, flat, mask):
    """(removed flags, scores) of the filters at flat indices ``flat`` (masked ones: live, 0.0)."""
    s = tl.load(scores_ptr + flat, mask=mask, other=0.0)
    r = tl.load(removed_ptr + flat, mask=mask, other=0) != 0
    return r, s


@triton.jit
def select_weak_kernel(layers_ptr, blocks_ptr, scores_ptr, removed_ptr, ks_ptr, out_ptr,
                       NCOL: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    layer, i0, start, n = program_layer(layers_ptr, blocks_ptr, NCOL)
    k = tl.load(ks_ptr + layer)

    i = i0 + tl.arange(0, BLOCK_I)
    imask = i < n
    r_i, s_i = load_keys(scores_ptr, removed_ptr, start + i, imask)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jmask = j < n
        r_j, s_j = load_keys(scores_ptr, removed_ptr, start + j, jmask)
        before = _precedes(r_j[None, :], s_j[None, :], j[None, :], r_i[:, None], s_i[:, None], i[:, None])
        before = before & jmask[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    tl.store(out_ptr + start + i, (rank.to(tl.int64) < k).to(tl.uint8), mask=imask)


def launch(layers, blocks, scores, removed_u8, ks, out_u8, n_blocks: int, block_i: int, block_j: int) -> None:
    """``scores``: flat float32; ``removed_u8`` / ``out_u8``: flat uint8 (bool viewed as bytes);
    ``ks``: int64 per layer; all on the device."""
    select_weak_kernel[(n_blocks,)](layers, blocks, scores, removed_u8, ks, out_u8, NCOL=NCOL,
                                    BLOCK_I=block_i, BLOCK_J=block_j)

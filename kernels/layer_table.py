"""The layer tables of the model-wide kernels (filter_norms, attenuate): what every program reads
first. A launch gets an int64 table with one row of NCOL entries per layer (its first three: the
layer's flat filter offset, its filter count, its weight row length) and a block table of
(layer, first filter) pairs, one per program (see backend._tables)."""
import triton
import triton.language as tl


@triton.jit
def program_filters(layers_ptr, blocks_ptr, NCOL: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's block of filters: its layer's table row, the layer's flat filter offset and
    row length, the filter indices within the layer (int64) and the mask of those that exist."""
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    f0 = tl.load(blocks_ptr + 2 * pid + 1)
    row = layers_ptr + layer * NCOL
    start = tl.load(row + 0)
    n = tl.load(row + 1)
    K = tl.load(row + 2)
    f = f0 + tl.arange(0, BLOCK_F)
    return row, start, K, f, f < n

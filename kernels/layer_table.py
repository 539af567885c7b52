"""The layer tables of the model-wide kernels: what every program reads first. A launch gets an
int64 table with one row of NCOL entries per layer (its first two: the layer's flat filter offset
and its filter count; for filter_norms and attenuate the third is its weight row length) and a
block table of (layer, first filter) pairs, one per program, both built by the caller."""
import triton
import triton.language as tl


@triton.jit
def program_layer(layers_ptr, blocks_ptr, NCOL: tl.constexpr):
    """This program's layer, its first filter within the layer, the layer's flat filter offset and
    its filter count."""
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    first = tl.load(blocks_ptr + 2 * pid + 1)
    return layer, first, tl.load(layers_ptr + layer * NCOL), tl.load(layers_ptr + layer * NCOL + 1)


@triton.jit
def program_filters(layers_ptr, blocks_ptr, NCOL: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's block of filters: its layer's table row, the layer's flat filter offset and
    row length, the filter indices within the layer (int64) and the mask of those that exist."""
    layer, f0, start, n = program_layer(layers_ptr, blocks_ptr, NCOL)
    row = layers_ptr + layer * NCOL
    K = tl.load(row + 2)
    f = f0 + tl.arange(0, BLOCK_F)
    return row, start, K, f, f < n

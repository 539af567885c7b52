"""Over all layers, the n_weak lowest filters by score relative to their layer's mean live score,
every layer keeping one filter: a flat mask in one launch (the rule of the reference
implementation's ``select_weak_global``).

A filter's key is (removed first, normalised score, flat index), compared by ``_precedes`` (NaN
after every number, -0.0 equal to 0.0); normalised = score / its layer's mean live score (clamped
at MIN_MEAN, given by the caller), -inf for removed filters. A filter is selected iff its rank over
the whole model is < n_weak and its rank within its layer is < n - 1. This is the reference's
three steps (the n_weak lowest of the model, counted per layer, each count clamped to n - 1, then
the per-layer selection) because the model's order restricted to a layer is the layer's own order: the chosen
filters of a layer are a prefix of its order, and the clamp drops only its last filter, when all
of the layer was chosen.

One program per block of ``BLOCK_I`` filters of one layer (a block table maps programs to (layer,
first filter)). Each walks every layer: computes that layer's mean (``_layer_mean``: the same code
in every program, so all see bitwise the same means), then compares the layer's filters with its
own in ``BLOCK_I x BLOCK_J`` tiles, counting the model rank and, for its own layer, the layer rank.
Recomputing the means costs each program one more pass over the scores and spares a second launch.
Cost O(N^2) comparisons for the N filters of the model (VGG-16: 4,224 filters, 18 M).
"""
import triton
import triton.language as tl

from .layer_table import program_layer
from .select_weak import NCOL, _precedes, load_keys


@triton.jit
def _layer_mean(scores_ptr, removed_ptr, start, n, MIN_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """Mean score of the layer's live filters (0 when none), at least MIN_MEAN; NaN stays NaN.
    Divisions round to nearest, as torch's do (Triton's ``/`` may approximate on a GPU)."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    live = tl.zeros([BLOCK], dtype=tl.int32)
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jmask = j < n
        r, s = load_keys(scores_ptr, removed_ptr, start + j, jmask)
        counted = jmask & ~r
        total += tl.where(counted, s, 0.0)
        live += counted.to(tl.int32)
    mean = tl.math.div_rn(tl.sum(total, axis=0), tl.maximum(tl.sum(live, axis=0), 1).to(tl.float32))
    return tl.where(mean < MIN_MEAN, MIN_MEAN, mean)


@triton.jit
def _normalised(scores_ptr, removed_ptr, flat, mask, mean):
    """(removed flags, normalised scores) of the filters at flat indices ``flat``."""
    r, s = load_keys(scores_ptr, removed_ptr, flat, mask)
    return r, tl.where(r, float("-inf"), tl.math.div_rn(s, mean))


@triton.jit(do_not_specialize=["n_weak"])
def select_weak_global_kernel(layers_ptr, blocks_ptr, n_layers, scores_ptr, removed_ptr, n_weak, out_ptr,
                              MIN_MEAN: tl.constexpr, NCOL: tl.constexpr, BLOCK_I: tl.constexpr,
                              BLOCK_J: tl.constexpr):
    layer, i0, start, n = program_layer(layers_ptr, blocks_ptr, NCOL)

    i = i0 + tl.arange(0, BLOCK_I)
    imask = i < n
    flat_i = start + i
    r_i, s_i = _normalised(scores_ptr, removed_ptr, flat_i, imask,
                           _layer_mean(scores_ptr, removed_ptr, start, n, MIN_MEAN, BLOCK_J))
    model_rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    layer_rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for other in range(0, n_layers):
        other_start = tl.load(layers_ptr + other * NCOL)
        other_n = tl.load(layers_ptr + other * NCOL + 1)
        mean = _layer_mean(scores_ptr, removed_ptr, other_start, other_n, MIN_MEAN, BLOCK_J)
        for j0 in range(0, other_n, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            jmask = j < other_n
            flat_j = other_start + j
            r_j, s_j = _normalised(scores_ptr, removed_ptr, flat_j, jmask, mean)
            before = _precedes(r_j[None, :], s_j[None, :], flat_j[None, :], r_i[:, None], s_i[:, None],
                               flat_i[:, None])
            preceding = tl.sum((before & jmask[None, :]).to(tl.int32), axis=1)
            model_rank += preceding
            layer_rank += tl.where(other == layer, preceding, 0)
    selected = (model_rank.to(tl.int64) < n_weak) & (layer_rank.to(tl.int64) < n - 1)
    tl.store(out_ptr + flat_i, selected.to(tl.uint8), mask=imask)


def launch(layers, blocks, n_layers: int, scores, removed_u8, n_weak: int, out_u8, n_blocks: int,
           min_layer_mean: float, block_i: int, block_j: int) -> None:
    """``layers``: the select table (NCOL columns: flat offset, filter count) of every layer;
    ``scores``: flat float32; ``removed_u8`` / ``out_u8``: flat uint8 (bool viewed as bytes);
    ``min_layer_mean``: the clamp of the layer means (a compile-time constant)."""
    select_weak_global_kernel[(n_blocks,)](layers, blocks, n_layers, scores, removed_u8, n_weak, out_u8,
                                           MIN_MEAN=float(min_layer_mean), NCOL=NCOL, BLOCK_I=block_i,
                                           BLOCK_J=block_j)

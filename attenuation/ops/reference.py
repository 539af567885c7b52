"""Pure-PyTorch reference implementations of the ops: the specification every backend must meet.

Filters of all layers are laid out in one flat vector (layer 0's filters first); ``counts[l]`` is the
number of filters of layer ``l``. Per-filter state uses the ``status`` codes ACTIVE / WEAK / REMOVED
(:mod:`attenuation.ops.status`).
None of these functions reads a device value on the host, so they never synchronise.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .status import ACTIVE, REMOVED, WEAK


def filter_norms(weights: Sequence[Tensor], ord: str) -> Tensor:
    """Per-filter norm of every weight (filter = row 0 of the weight), concatenated, float32."""
    norms = []
    for w in weights:
        rows = w.detach().reshape(w.shape[0], w[0].numel() if w.shape[0] else w.shape[1:].numel()).float()
        if ord == "l1":
            norms.append(rows.abs().sum(1))
        elif ord == "l2":
            norms.append(torch.linalg.vector_norm(rows, 2, dim=1))
        elif ord == "linf":
            norms.append(rows.abs().amax(1))
        else:
            raise ValueError(f"unknown norm {ord!r}: expected 'l1', 'l2' or 'linf'")
    return torch.cat(norms)


def _selection_order(scores: Tensor, removed: Tensor) -> Tensor:
    """Indices in selection order: removed filters first, then ascending score (NaN after every
    number, as torch.sort puts it), ties broken by lower index."""
    order = torch.sort(scores, stable=True).indices                                # by score, then index
    return order[torch.sort((~removed[order]).to(torch.uint8), stable=True).indices]  # removed first


def select_weak(scores: Tensor, removed: Tensor, counts: Sequence[int], ks: Tensor) -> Tensor:
    """Per layer, mark the ``ks[l]`` lowest-scoring filters: removed filters first, then by score,
    ties broken by lower index. Returns a flat bool mask."""
    weak = torch.empty_like(removed)
    start = 0
    for layer, n in enumerate(counts):
        order = _selection_order(scores[start:start + n], removed[start:start + n])
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=order.device)
        weak[start:start + n] = rank < ks[layer]
        start += n
    return weak


# A layer's mean live score is clamped here before dividing by it (an all-zero layer would divide by 0).
MIN_LAYER_MEAN = 1e-12


def select_weak_global(scores: Tensor, removed: Tensor, counts: Sequence[int], n_weak: int) -> Tensor:
    """One threshold over all layers: the ``n_weak`` lowest filters of the model by score relative
    to their layer, every layer keeping at least one filter. Returns a flat bool mask.

    1. Each filter's score is divided by its layer's mean live score (removed filters do not
       count; the mean is clamped at MIN_LAYER_MEAN); removed filters get -inf.
    2. The model's filters are ordered as ``select_weak`` orders a layer's (removed first, then
       normalised score, NaN last, ties by flat index) and the first ``n_weak`` are chosen. (The
       removed filters' -inf alone would put them first too, unless a live filter's normalised
       score is -inf; ordering them explicitly makes the order of a layer's filters within the
       model's order the layer's own order, which a backend may exploit.)
    3. Layer l's count of chosen filters, at most ``counts[l] - 1``, is its k for ``select_weak``
       on the normalised scores.

    A NaN score of a live filter makes its layer's mean NaN: all the layer's live filters then
    normalise to NaN and come after every number (a layer with an untrustworthy score is pruned
    last). The means are float32 sums: another backend summing in another order agrees bitwise
    when the sums are exact, and otherwise may order differently only filters of different layers
    whose normalised scores lie within a rounding of each other.
    """
    normalised = torch.empty_like(scores)
    bounds = list(itertools.accumulate(counts, initial=0))
    for start, end in zip(bounds, bounds[1:]):
        s, r = scores[start:end], removed[start:end]
        live_mean = torch.where(r, 0.0, s).sum() / (~r).sum().clamp_min(1)
        normalised[start:end] = torch.where(r, -math.inf, s / live_mean.clamp_min(MIN_LAYER_MEAN))
    chosen = torch.zeros_like(removed).index_fill_(0, _selection_order(normalised, removed)[:n_weak], True)
    ks = torch.empty(len(counts), dtype=torch.int64, device=scores.device)   # no upload: no stream sync
    for layer, (start, end) in enumerate(zip(bounds, bounds[1:])):
        ks[layer] = chosen[start:end].sum().clamp_max(end - start - 1)
    return select_weak(normalised, removed, counts, ks)


def _scale_filters_(tensors: Sequence[Optional[Tensor]], scale: Tensor) -> None:
    for t in tensors:
        if t is not None:
            with torch.no_grad():
                t.mul_(scale.to(t.dtype).view(-1, *([1] * (t.dim() - 1))))


def attenuate_(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
               gammas: Sequence[Optional[Tensor]], betas: Sequence[Optional[Tensor]],
               weak: Tensor, status: Tensor, multiplier: Tensor, factor: float,
               eps: float, restore: bool = False,
               running_means: Optional[Sequence[Optional[Tensor]]] = None,
               running_vars: Optional[Sequence[Optional[Tensor]]] = None) -> tuple[Tensor, Tensor]:
    """One attenuation step, in place over the whole model.

    Weak, not yet removed filters are scaled by ``factor`` (weight row, bias, gamma, beta) and their
    multiplier too; one whose multiplier falls below ``eps`` is zeroed and marked removed. A filter
    that was weak and is no longer in the weak set returns: active again, multiplier 1, and with
    ``restore`` its parameters are divided by its old multiplier (the attenuation is undone).
    The following BatchNorm's running mean and variance, when given, follow the conv's output
    (times s and s^2 for a filter scaled by s), so eval mode sees what train mode sees.
    Returns flat bool masks (returned, newly_removed).
    """
    was_removed = status == REMOVED
    hit = weak & ~was_removed
    new_mult = torch.where(hit, multiplier * factor, 1.0)
    newly_removed = hit & (new_mult < eps)
    returned = (status == WEAK) & ~weak
    removed = was_removed | newly_removed
    kept_scale = torch.where(hit, factor, 1.0)
    if restore:
        undo = returned & (multiplier > 0)
        kept_scale = torch.where(undo, 1.0 / multiplier.clamp_min(1e-30), kept_scale)
    scale = torch.where(removed, 0.0, kept_scale).float()
    no_stats = [None] * len(weights)
    start = 0
    for w, b, g, bt, mean, var in zip(weights, biases, gammas, betas, running_means or no_stats,
                                      running_vars or no_stats):
        n = w.shape[0]
        _scale_filters_((w, b, g, bt, mean), scale[start:start + n])
        _scale_filters_((var,), scale[start:start + n].square())
        start += n
    status.copy_(torch.where(removed, REMOVED, torch.where(weak, WEAK, ACTIVE)).to(status.dtype))
    multiplier.copy_(torch.where(removed, 0.0, new_mult))
    return returned, newly_removed


def zero_removed_(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                  gammas: Sequence[Optional[Tensor]], betas: Sequence[Optional[Tensor]],
                  status: Tensor) -> None:
    """Zero every removed filter (after an optimizer step, momentum or weight decay may move it)."""
    keep = (status != REMOVED).float()
    start = 0
    for w, b, g, bt in zip(weights, biases, gammas, betas):
        n = w.shape[0]
        _scale_filters_((w, b, g, bt), keep[start:start + n])
        start += n


def _output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    if padding == "same":  # F.conv2d takes it with stride 1 only: the input's size
        return x.shape[2], x.shape[3]
    if padding == "valid":
        padding = 0
    size = []
    for i in range(2):
        pick = lambda v: v if isinstance(v, int) else v[i]  # noqa: E731
        extent = pick(dilation) * (weight.shape[2 + i] - 1) + 1
        size.append((x.shape[2 + i] + 2 * pick(padding) - extent) // pick(stride) + 1)
    return size[0], size[1]


# Below this fraction of the dense MACs the compact problem is computed (gather, convolve, scatter);
# above it the gathers and scatters of whole activations cost more than the skipped MACs save
# (measured on a 2-core CPU with oneDNN: the break-even lies near 0.3-0.4), so the dense convolution
# runs on weights with the dead rows and columns masked to zero, which gives the same result.
GATHER_BELOW_MAC_FRACTION = 0.3


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_index: Optional[Tensor],
                  in_index: Optional[Tensor], scale: Optional[Tensor], stride, padding, dilation,
                  groups: int = 1) -> Tensor:
    """Convolution over the live channels only, ``y * scale + bias`` per output channel, zeros for
    the dead output channels. ``None`` index = all channels live. Its cost falls with the live
    fraction: below GATHER_BELOW_MAC_FRACTION it gathers the live weights and input channels,
    convolves the compact problem and scatters into a zero output."""
    if groups != 1 and (out_index is not None or in_index is not None):
        raise ValueError("masked_conv2d: channel index lists need groups == 1")
    n_out, n_in = weight.shape[0], weight.shape[1]
    live_out = n_out if out_index is None else out_index.numel()
    live_in = n_in if in_index is None else in_index.numel()
    if live_out * live_in >= GATHER_BELOW_MAC_FRACTION * n_out * n_in:
        return masked_dense_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding, dilation, groups)
    return gathered_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding, dilation)


def _channel_mask(index: Optional[Tensor], n: int, like: Tensor) -> Optional[Tensor]:
    if index is None:
        return None
    return torch.zeros(n, dtype=like.dtype, device=like.device).index_fill_(0, index, 1)


def masked_dense_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding, dilation, groups=1):
    """The masked convolution as the dense convolution on weights whose dead rows and columns are
    zeroed: the cheaper strategy when most MACs are live."""
    out_mask = _channel_mask(out_index, weight.shape[0], weight)
    in_mask = _channel_mask(in_index, weight.shape[1], weight)
    w = weight
    if out_mask is not None:
        w = w * out_mask.view(-1, 1, 1, 1)
    if in_mask is not None:
        w = w * in_mask.view(1, -1, 1, 1)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if scale is not None:
        y = y * scale.to(y.dtype).view(1, -1, 1, 1)
    if bias is not None:
        b = bias if out_mask is None else bias * out_mask.to(bias.dtype)
        y = y + b.to(y.dtype).view(1, -1, 1, 1)
    return y


def gathered_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding, dilation):
    """The masked convolution as gather (live input channels, live weight block), the compact
    convolution, scatter into a zero output: the cheaper strategy when few MACs are live."""
    w = weight
    if in_index is not None:
        x = x.index_select(1, in_index)
        w = w.index_select(1, in_index)
    if out_index is not None:
        w = w.index_select(0, out_index)
    if w.shape[0] and w.shape[1]:
        y = F.conv2d(x, w, None, stride, padding, dilation)
    else:  # no live output or no live input channel: the convolution part is empty or zero
        y = x.new_zeros((x.shape[0], w.shape[0], *_output_size(x, weight, stride, padding, dilation)))
    if scale is not None:
        s = scale if out_index is None else scale.index_select(0, out_index)
        y = y * s.to(y.dtype).view(1, -1, 1, 1)
    if bias is not None:
        b = bias if out_index is None else bias.index_select(0, out_index)
        y = y + b.to(y.dtype).view(1, -1, 1, 1)
    if out_index is None:
        return y
    out = y.new_zeros((y.shape[0], weight.shape[0], y.shape[2], y.shape[3]))
    if y.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out.index_copy(1, out_index, y)

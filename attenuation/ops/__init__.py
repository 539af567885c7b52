"""The ops facade: every module and the pruner call these, never a backend directly.

Each op takes ``backend=None`` (the default for the tensors' device) or a backend name. Backends
register themselves in :mod:`attenuation.ops.backends`; ``reference`` (pure PyTorch, the
specification) is always there.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends import available_backends, get_backend, get_op, set_default_backend
from .status import ACTIVE, REMOVED, WEAK

NORMS = ("l1", "l2", "linf")

__all__ = [
    "ACTIVE", "WEAK", "REMOVED", "NORMS", "available_backends", "set_default_backend",
    "filter_norms", "select_weak", "select_weak_global", "attenuate_", "zero_removed_", "masked_conv2d",
]


def _check_same_device(tensors: Sequence[Optional[Tensor]], what: str) -> torch.device:
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError(f"{what}: no tensors given")
    device = present[0].device
    for t in present:
        if t.device != device:
            raise ValueError(f"{what}: tensors on different devices ({device} and {t.device})")
    return device


def _check_filter_lists(weights, biases, gammas, betas, what: str) -> int:
    n_layers = len(weights)
    for name, seq in (("biases", biases), ("gammas", gammas), ("betas", betas)):
        if len(seq) != n_layers:
            raise ValueError(f"{what}: {len(seq)} {name} for {n_layers} weights")
    total = 0
    for i, w in enumerate(weights):
        for name, seq in (("bias", biases), ("gamma", gammas), ("beta", betas)):
            t = seq[i]
            if t is not None and t.shape != (w.shape[0],):
                raise ValueError(f"{what}: layer {i} {name} has shape {tuple(t.shape)}, "
                                 f"expected ({w.shape[0]},)")
        total += w.shape[0]
    return total


def filter_norms(weights: Sequence[Tensor], ord: str = "l1", backend: Optional[str] = None) -> Tensor:
    """Per-filter L1 / L2 / Linf norms of all the given weights at once, concatenated (float32)."""
    if ord not in NORMS:
        raise ValueError(f"unknown norm {ord!r}: expected one of {', '.join(NORMS)}")
    weights = list(weights)
    device = _check_same_device(weights, "filter_norms")
    for i, w in enumerate(weights):
        if w.dim() < 2 or not w.is_floating_point():
            raise ValueError(f"filter_norms: weight {i} must be a floating tensor with a filter "
                             f"dimension, got {w.dtype} of shape {tuple(w.shape)}")
    return get_backend(backend, device).filter_norms(weights, ord)


def _check_flat_scores(scores: Tensor, removed: Tensor, counts: Sequence[int], what: str) -> list[int]:
    """The checks shared by the selection ops; returns ``counts`` as ints."""
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"{what}: counts must be >= 0, got {counts}")
    if scores.dim() != 1 or scores.shape != removed.shape or scores.numel() != sum(counts):
        raise ValueError(f"{what}: scores {tuple(scores.shape)} and removed "
                         f"{tuple(removed.shape)} must be flat with sum(counts)={sum(counts)} entries")
    if removed.dtype != torch.bool:
        raise ValueError(f"{what}: removed must be bool, got {removed.dtype}")
    _check_same_device([scores, removed], what)
    return counts


def select_weak(scores: Tensor, removed: Tensor, counts: Sequence[int], ks,
                backend: Optional[str] = None) -> Tensor:
    """Per layer, the ``ks[l]`` lowest-score filters (removed ones first, ties by index): a flat
    bool mask. ``counts[l]`` is layer l's number of filters; ``ks`` a list or int64 tensor."""
    counts = _check_flat_scores(scores, removed, counts, "select_weak")
    ks = torch.as_tensor(ks, dtype=torch.int64, device=scores.device)
    if ks.shape != (len(counts),):
        raise ValueError(f"select_weak: {ks.numel()} ks for {len(counts)} layers")
    return get_backend(backend, scores.device).select_weak(scores.float(), removed, counts, ks)


def select_weak_global(scores: Tensor, removed: Tensor, counts: Sequence[int], n_weak: int,
                       backend: Optional[str] = None) -> Tensor:
    """Over all layers at once, the ``n_weak`` lowest filters by score divided by their layer's
    mean live score (removed ones first, ties by flat index), every layer keeping at least one
    filter: a flat bool mask (the rule: :func:`attenuation.ops.reference.select_weak_global`).
    ``n_weak`` is a host int, so the op needs no host read."""
    counts = _check_flat_scores(scores, removed, counts, "select_weak_global")
    if isinstance(n_weak, bool) or not isinstance(n_weak, numbers.Integral) or n_weak < 0:
        raise ValueError(f"select_weak_global: n_weak must be an int >= 0, got {n_weak!r}")
    return get_op(backend, scores.device, "select_weak_global")(scores.float(), removed, counts, int(n_weak))


def attenuate_(weights, biases, gammas, betas, weak: Tensor, status: Tensor, multiplier: Tensor,
               factor: float, eps: float, restore: bool = False, running_means=None,
               running_vars=None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """One attenuation step over the whole model, in place (see the reference for the rule).
    ``running_means`` / ``running_vars``: the following BatchNorms' statistics (or None), kept
    consistent with the scaled conv outputs. Returns flat bool masks (returned, newly_removed)."""
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"attenuation factor must be in [0, 1], got {factor}")
    if eps < 0:
        raise ValueError(f"removal threshold eps must be >= 0, got {eps}")
    total = _check_filter_lists(weights, biases, gammas, betas, "attenuate_")
    no_stats = [None] * len(weights)
    running_means = list(running_means) if running_means is not None else no_stats
    running_vars = list(running_vars) if running_vars is not None else no_stats
    _check_filter_lists(weights, running_means, running_vars, no_stats, "attenuate_ (running stats)")
    for name, t, dtype in (("weak", weak, torch.bool), ("status", status, torch.uint8),
                           ("multiplier", multiplier, torch.float32)):
        if t.shape != (total,) or t.dtype != dtype:
            raise ValueError(f"attenuate_: {name} must be {dtype} of shape ({total},), "
                             f"got {t.dtype} {tuple(t.shape)}")
    device = _check_same_device([*weights, *biases, *gammas, *betas, weak, status, multiplier],
                                "attenuate_")
    return get_backend(backend, device).attenuate_(weights, biases, gammas, betas, weak, status,
                                                   multiplier, float(factor), float(eps), bool(restore),
                                                   running_means, running_vars)


def zero_removed_(weights, biases, gammas, betas, status: Tensor, backend: Optional[str] = None) -> None:
    """Zero the weight rows, biases, gammas and betas of every removed filter, in place."""
    total = _check_filter_lists(weights, biases, gammas, betas, "zero_removed_")
    if status.shape != (total,) or status.dtype != torch.uint8:
        raise ValueError(f"zero_removed_: status must be uint8 of shape ({total},)")
    device = _check_same_device([*weights, *biases, *gammas, *betas, status], "zero_removed_")
    get_backend(backend, device).zero_removed_(weights, biases, gammas, betas, status)


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                  backend: Optional[str] = None) -> Tensor:
    """Convolution computing only the output channels in ``out_index`` from the input channels in
    ``in_index`` (None = all), ``y * scale + bias`` per output channel, zeros for the others."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"masked_conv2d: expected 4-D input and weight, got {x.dim()}-D and "
                         f"{weight.dim()}-D")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"masked_conv2d: input has {x.shape[1]} channels, weight expects "
                         f"{weight.shape[1] * groups}")
    for name, idx in (("out_index", out_index), ("in_index", in_index)):
        if idx is not None and (idx.dim() != 1 or idx.dtype != torch.int64):
            raise ValueError(f"masked_conv2d: {name} must be a 1-D int64 tensor")
    _check_same_device([x, weight, bias, out_index, in_index, scale], "masked_conv2d")
    return get_backend(backend, x.device).masked_conv2d(
        x, weight, bias, out_index, in_index, scale, stride, padding, dilation, groups)

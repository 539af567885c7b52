"""The ops facade: every module and the pruner call these, never a backend directly.

Each op takes ``backend=None`` (the default for the tensors' device) or a backend name. Backends
register themselves in :mod:`attenuation.ops.backends`; ``reference`` (pure PyTorch, the
specification) is always there.

Every argument is checked here, once, before any backend runs, so that all backends accept the
same calls: a bad one is a ValueError (a wrong value, shape or dtype) or TypeError (a wrong Python
type) naming it. Values inside tensors (index lists, ``ks``) are checked when the tensor is on the
CPU; on a device that would need a host read, and while compiling a data-dependent branch, so
there the caller vouches for them (the drop-in conv and the pruner build them on the host).
"""
from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------- checks

def _check_same_device(tensors: Sequence[Optional[Tensor]], what: str) -> torch.device:
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError(f"{what}: no tensors given")
    device = present[0].device
    for t in present:
        if t.device != device:
            raise ValueError(f"{what}: tensors on different devices ({device} and {t.device})")
    return device


def _check_int(value, name: str, what: str) -> int:
    """An integer (a Python or numpy int; bool and float are not), as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}: {name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_finite(value, name: str, what: str) -> float:
    """A finite real number (bool is not one), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what}: {name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{what}: {name} must be finite, got {value!r}")
    return float(value)


def _check_weights(weights: Sequence[Tensor], what: str) -> None:
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor) or w.dim() < 2 or not w.is_floating_point():
            described = f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"{what}: weight {i} must be a floating tensor with a filter dimension, "
                             f"got {described}")


def _check_filter_lists(weights, vectors: dict, what: str) -> int:
    """Per layer, each of the named per-layer ``vectors`` is None or a floating (n,) tensor for
    the layer's n filters; returns the number of filters."""
    n_layers = len(weights)
    for name, seq in vectors.items():
        if len(seq) != n_layers:
            raise ValueError(f"{what}: {len(seq)} {name} entries for {n_layers} weights")
    total = 0
    for i, w in enumerate(weights):
        for name, seq in vectors.items():
            t = seq[i]
            if t is not None and (t.shape != (w.shape[0],) or not t.is_floating_point()):
                raise ValueError(f"{what}: layer {i} {name} must be floating of shape ({w.shape[0]},), "
                                 f"got {t.dtype} {tuple(t.shape)}")
        total += w.shape[0]
    return total


def _check_counts(counts: Sequence[int], what: str) -> list[int]:
    counts = [_check_int(c, "counts", what) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"{what}: counts must be >= 0, got {counts}")
    return counts


def _check_flat_scores(scores: Tensor, removed: Tensor, counts: Sequence[int], what: str) -> list[int]:
    """The checks shared by the selection ops; returns ``counts`` as ints."""
    counts = _check_counts(counts, what)
    if scores.dim() != 1 or scores.shape != removed.shape or scores.numel() != sum(counts):
        raise ValueError(f"{what}: scores {tuple(scores.shape)} and removed "
                         f"{tuple(removed.shape)} must be flat with sum(counts)={sum(counts)} entries")
    if not scores.is_floating_point():
        raise ValueError(f"{what}: scores must be floating, got {scores.dtype}")
    if removed.dtype != torch.bool:
        raise ValueError(f"{what}: removed must be bool, got {removed.dtype}")
    _check_same_device([scores, removed], what)
    return counts


def _host_values(t: Tensor) -> Optional[Tensor]:
    """``t`` when its values may be read here: on the CPU and not while compiling."""
    return t if t.device.type == "cpu" and not torch.compiler.is_compiling() else None


def _check_ks(ks, counts: list[int]) -> Tensor:
    """``ks`` (a sequence of ints or an integer tensor, one per layer, 0 <= ks[l] <= counts[l]) as
    an int64 tensor; the bounds are checked where the values may be read (:func:`_host_values`)."""
    if isinstance(ks, Tensor):
        if ks.dtype == torch.bool or ks.is_floating_point() or ks.is_complex():
            raise ValueError(f"select_weak: ks must be an integer tensor, got {ks.dtype}")
        host = _host_values(ks)
        values = None if host is None or ks.dim() != 1 else host.tolist()
    else:
        values = [_check_int(k, "ks", "select_weak") for k in ks]
        ks = torch.tensor(values, dtype=torch.int64)
    if ks.shape != (len(counts),):
        raise ValueError(f"select_weak: {ks.numel()} ks for {len(counts)} layers")
    for layer, (k, n) in enumerate(zip(values or (), counts)):
        if not 0 <= k <= n:
            raise ValueError(f"select_weak: ks[{layer}] = {k} is outside [0, {n}] (layer {layer} has {n} filters)")
    return ks.to(torch.int64)


def _check_index(index: Optional[Tensor], n: int, name: str) -> None:
    """A channel index list: 1-D int64, strictly increasing, within [0, n). The values are read
    only on the CPU (one pass), see the module docstring."""
    if index is None:
        return
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"masked_conv2d: {name} must be a 1-D int64 tensor, got {index.dtype} "
                         f"{tuple(index.shape)}")
    if _host_values(index) is None or index.numel() == 0:
        return
    if bool(index[0] < 0) or bool(index[-1] >= n) or bool((index[1:] <= index[:-1]).any()):
        raise ValueError(f"masked_conv2d: {name} must be strictly increasing channel indices in [0, {n}), "
                         f"got {index.tolist()}")


def _check_conv_vectors(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor]) -> None:
    """Floating input and weight of one dtype (under autocast they may differ: it casts them);
    bias (x's dtype) and scale floating, one entry per output channel."""
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"masked_conv2d: input and weight must be floating, got {x.dtype} and {weight.dtype}")
    autocast = torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocast:
        raise ValueError(f"masked_conv2d: input and weight must have the same dtype (outside autocast), "
                         f"got {x.dtype} and {weight.dtype}")
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and (t.shape != (weight.shape[0],) or not t.is_floating_point()):
            raise ValueError(f"masked_conv2d: {name} must be floating of shape ({weight.shape[0]},), "
                             f"got {t.dtype} {tuple(t.shape)}")
    if bias is not None and bias.dtype != x.dtype and not autocast:
        raise ValueError(f"masked_conv2d: bias must have the input's dtype {x.dtype}, got {bias.dtype}")


def _check_groups(x: Tensor, weight: Tensor, groups, indexed: bool) -> int:
    groups = _check_int(groups, "groups", "masked_conv2d")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"masked_conv2d: groups must be >= 1 and divide the {weight.shape[0]} output "
                         f"channels, got {groups}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"masked_conv2d: input has {x.shape[1]} channels, weight expects "
                         f"{weight.shape[1] * groups}")
    if groups != 1 and indexed:
        raise ValueError(f"masked_conv2d: channel index lists need groups == 1, got groups={groups}")
    return groups


# ------------------------------------------------------------------------------------------- ops

def filter_norms(weights: Sequence[Tensor], ord: str = "l1", backend: Optional[str] = None) -> Tensor:
    """Per-filter L1 / L2 / Linf norms of all the given weights at once, concatenated (float32)."""
    if ord not in NORMS:
        raise ValueError(f"unknown norm {ord!r}: expected one of {', '.join(NORMS)}")
    weights = list(weights)
    _check_weights(weights, "filter_norms")
    device = _check_same_device(weights, "filter_norms")
    return get_backend(backend, device).filter_norms(weights, ord)


def select_weak(scores: Tensor, removed: Tensor, counts: Sequence[int], ks,
                backend: Optional[str] = None) -> Tensor:
    """Per layer, the ``ks[l]`` lowest-score filters (removed ones first, ties by index): a flat
    bool mask. ``counts[l]`` is layer l's number of filters; ``ks`` a list of ints or an integer
    tensor with 0 <= ks[l] <= counts[l]."""
    counts = _check_flat_scores(scores, removed, counts, "select_weak")
    ks = _check_ks(ks, counts).to(scores.device)
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


def _check_attenuate_args(weights, biases, gammas, betas, weak, status, multiplier, factor, eps, restore,
                          running_means, running_vars) -> tuple:
    """The checks of :func:`attenuate_`; returns (factor, eps, running_means, running_vars, device)."""
    factor = _check_finite(factor, "attenuation factor", "attenuate_")
    eps = _check_finite(eps, "removal threshold eps", "attenuate_")
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"attenuate_: attenuation factor must be in [0, 1], got {factor}")
    if eps < 0:
        raise ValueError(f"attenuate_: removal threshold eps must be >= 0, got {eps}")
    if not isinstance(restore, bool):
        raise TypeError(f"attenuate_: restore must be True or False, got {restore!r}")
    _check_weights(weights, "attenuate_")
    no_stats = [None] * len(weights)
    running_means = list(running_means) if running_means is not None else no_stats
    running_vars = list(running_vars) if running_vars is not None else no_stats
    total = _check_filter_lists(weights, {"bias": biases, "gamma": gammas, "beta": betas,
                                          "running mean": running_means, "running var": running_vars},
                                "attenuate_")
    for name, t, dtype in (("weak", weak, torch.bool), ("status", status, torch.uint8),
                           ("multiplier", multiplier, torch.float32)):
        if t.shape != (total,) or t.dtype != dtype:
            raise ValueError(f"attenuate_: {name} must be {dtype} of shape ({total},), "
                             f"got {t.dtype} {tuple(t.shape)}")
    device = _check_same_device([*weights, *biases, *gammas, *betas, *running_means, *running_vars,
                                 weak, status, multiplier], "attenuate_")
    return factor, eps, running_means, running_vars, device


def attenuate_(weights, biases, gammas, betas, weak: Tensor, status: Tensor, multiplier: Tensor,
               factor: float, eps: float, restore: bool = False, running_means=None,
               running_vars=None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """One attenuation step over the whole model, in place (see the reference for the rule).
    ``factor`` in [0, 1] and ``eps`` >= 0, both finite. ``running_means`` / ``running_vars``: the
    following BatchNorms' statistics (or None), kept consistent with the scaled conv outputs.
    Returns flat bool masks (returned, newly_removed)."""
    factor, eps, running_means, running_vars, device = _check_attenuate_args(
        weights, biases, gammas, betas, weak, status, multiplier, factor, eps, restore, running_means,
        running_vars)
    return get_backend(backend, device).attenuate_(weights, biases, gammas, betas, weak, status,
                                                   multiplier, factor, eps, restore,
                                                   running_means, running_vars)


def zero_removed_(weights, biases, gammas, betas, status: Tensor, backend: Optional[str] = None) -> None:
    """Zero the weight rows, biases, gammas and betas of every removed filter, in place."""
    _check_weights(weights, "zero_removed_")
    total = _check_filter_lists(weights, {"bias": biases, "gamma": gammas, "beta": betas}, "zero_removed_")
    if status.shape != (total,) or status.dtype != torch.uint8:
        raise ValueError(f"zero_removed_: status must be uint8 of shape ({total},)")
    device = _check_same_device([*weights, *biases, *gammas, *betas, status], "zero_removed_")
    get_backend(backend, device).zero_removed_(weights, biases, gammas, betas, status)


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None, stride=1, padding=0, dilation=1, groups: int = 1,
                  backend: Optional[str] = None) -> Tensor:
    """Convolution computing only the output channels in ``out_index`` from the input channels in
    ``in_index`` (None = all), ``y * scale + bias`` per output channel, zeros for the others.

    The index lists are 1-D int64, strictly increasing (each channel once: the canonical form,
    which ``mask.nonzero()`` gives) and in range; they need ``groups == 1``."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"masked_conv2d: expected 4-D input and weight, got {x.dim()}-D and "
                         f"{weight.dim()}-D")
    groups = _check_groups(x, weight, groups, out_index is not None or in_index is not None)
    _check_conv_vectors(x, weight, bias, scale)
    _check_index(out_index, weight.shape[0], "out_index")
    _check_index(in_index, weight.shape[1], "in_index")
    _check_same_device([x, weight, bias, out_index, in_index, scale], "masked_conv2d")
    return get_backend(backend, x.device).masked_conv2d(
        x, weight, bias, out_index, in_index, scale, stride, padding, dilation, groups)

"""The triton backend: the kernels of ``attenuation_triton`` (kernels/) adapted to the ops facade,
as :mod:`attenuation.ops.native` adapts ``attenuation._C``; it conforms to
:class:`attenuation.ops.backends.Backend` and provides ``select_weak_global`` too.

- :mod:`.device`: the tensors it takes (CUDA; CPU under Triton's interpreter, ``TRITON_INTERPRET=1``).
- :mod:`.tables`: layer tables uploaded to the device, and the plan caches.
- :mod:`.host`: the five model-wide ops' host paths (one launch each, no host read).
- :mod:`.library`: the same ops as torch custom ops with fake implementations, for torch.compile.
- :mod:`.masked_conv`: the masked convolution's custom ops, autograd, autocast and fallback.

The model-wide functions below run the host paths directly when called eagerly (the dispatcher's
Python custom-op path would cost about as much as the rest of a step's host side) and the custom
ops while torch.compile traces them. Importing this package raises ImportError without triton
(see :func:`attenuation.ops.backends.register_triton_backend`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from attenuation_triton.filter_norms import ORD_CODES
from torch import Tensor

from ..slots import flat_vectors
from . import host, library
from .device import INTERPRET
from .masked_conv import masked_conv2d

__all__ = ["INTERPRET", "filter_norms", "select_weak", "select_weak_global", "attenuate_", "zero_removed_",
           "masked_conv2d"]


def filter_norms(weights: Sequence[Tensor], ord: str) -> Tensor:
    """Per-filter norm of every weight (filter = index along dim 0), concatenated, float32."""
    if ord not in ORD_CODES:
        raise ValueError(f"unknown norm {ord!r}: expected 'l1', 'l2' or 'linf'")
    weights = [w.detach() for w in weights]
    return (library.filter_norms_op if torch.compiler.is_compiling() else host.norms)(weights, ord)


def select_weak(scores: Tensor, removed: Tensor, counts: Sequence[int], ks: Tensor) -> Tensor:
    """Per layer, mark the ``ks[l]`` lowest-scoring filters: removed filters first, then by score,
    ties broken by lower index. Returns a flat bool mask."""
    counts = [int(c) for c in counts]
    return (library.select_weak_op if torch.compiler.is_compiling() else host.select)(scores, removed, counts, ks)


def select_weak_global(scores: Tensor, removed: Tensor, counts: Sequence[int], n_weak: int) -> Tensor:
    """The reference's ``select_weak_global`` (one threshold over all layers on scores relative to
    their layer's mean live score) in one launch; returns a flat bool mask."""
    counts = [int(c) for c in counts]
    op = library.select_weak_global_op if torch.compiler.is_compiling() else host.select_global
    return op(scores, removed, counts, int(n_weak))


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
        return library.attenuate_op([w.detach() for w in weights], *flat_vectors(*per_kind), weak, status,
                                    multiplier, float(factor), float(eps), bool(restore))
    return host.attenuate_filters(weights, list(zip(*per_kind)), weak, status, multiplier, factor, eps, restore)


def zero_removed_(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                  gammas: Sequence[Optional[Tensor]], betas: Sequence[Optional[Tensor]],
                  status: Tensor) -> None:
    """Zero (multiply by 0, as the reference does) every removed filter's weight row, bias, gamma, beta."""
    if torch.compiler.is_compiling():
        library.zero_removed_op([w.detach() for w in weights], *flat_vectors(biases, gammas, betas), status)
        return
    host.zero_removed(weights, [(b, g, bt, None, None) for b, g, bt in zip(biases, gammas, betas)], status)

"""The model-wide ops of the triton backend as torch custom ops with fake implementations, so that
torch.compile traces a step calling them (fullgraph). The optional per-layer vectors travel as a
flat list plus slots (:mod:`attenuation.ops.slots`), as in the native extension's schemas.

Only traced calls go through these: eager calls run the same host paths (:mod:`.host`) without
the dispatcher, whose Python custom-op path costs about 40 us a call on the 2-core Xeon, as much
as the whole host side of a VGG-16 step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..slots import per_layer_vectors
from . import host


@torch.library.custom_op("attenuation_triton::filter_norms", mutates_args=())
def filter_norms_op(weights: list[Tensor], ord: str) -> Tensor:
    return host.norms(weights, ord)


@filter_norms_op.register_fake
def _(weights, ord):
    return weights[0].new_empty((sum(w.shape[0] for w in weights),), dtype=torch.float32)


@torch.library.custom_op("attenuation_triton::select_weak", mutates_args=())
def select_weak_op(scores: Tensor, removed: Tensor, counts: list[int], ks: Tensor) -> Tensor:
    return host.select(scores, removed, counts, ks)


@torch.library.custom_op("attenuation_triton::select_weak_global", mutates_args=())
def select_weak_global_op(scores: Tensor, removed: Tensor, counts: list[int], n_weak: int) -> Tensor:
    return host.select_global(scores, removed, counts, n_weak)


@select_weak_op.register_fake
@select_weak_global_op.register_fake
def _(scores, removed, counts, k):
    return torch.empty_like(removed)


@torch.library.custom_op("attenuation_triton::attenuate_",
                         mutates_args=("weights", "vectors", "status", "multiplier"))
def attenuate_op(weights: list[Tensor], vectors: list[Tensor], slots: list[int], weak: Tensor, status: Tensor,
                 multiplier: Tensor, factor: float, eps: float, restore: bool) -> tuple[Tensor, Tensor]:
    return host.attenuate_filters(weights, per_layer_vectors(len(weights), vectors, slots), weak, status,
                                  multiplier, factor, eps, restore)


@attenuate_op.register_fake
def _(weights, vectors, slots, weak, status, multiplier, factor, eps, restore):
    return torch.empty_like(weak), torch.empty_like(weak)


@torch.library.custom_op("attenuation_triton::zero_removed_", mutates_args=("weights", "vectors"))
def zero_removed_op(weights: list[Tensor], vectors: list[Tensor], slots: list[int], status: Tensor) -> None:
    host.zero_removed(weights, per_layer_vectors(len(weights), vectors, slots), status)


@zero_removed_op.register_fake
def _(weights, vectors, slots, status):
    return None

"""The per-filter vectors of the in-place ops as custom-op schemas take them.

The backends' Python signature has five per-layer lists (biases, gammas, betas, running means,
running variances) with None where a layer has no such tensor. A torch custom op gets the present
tensors as one flat list plus their slots, ``layer * 5 + kind``: torch.compile's functionalization
fails on mutable lists with None entries.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

KINDS = 5   # bias, gamma, beta, running mean, running var


def flat_vectors(*per_kind: Sequence[Optional[Tensor]]) -> tuple[list[Tensor], list[int]]:
    """The present vectors of up to five per-layer lists (detached) and their slots."""
    vectors, slots = [], []
    for kind, tensors in enumerate(per_kind):
        for layer, t in enumerate(tensors):
            if t is not None:
                vectors.append(t.detach())
                slots.append(layer * KINDS + kind)
    return vectors, slots


def per_layer_vectors(n_layers: int, vectors: Sequence[Tensor], slots: Sequence[int]) -> list[tuple]:
    """The inverse: per layer, the tuple (bias, gamma, beta, running mean, running var), None where absent."""
    rows = [[None] * KINDS for _ in range(n_layers)]
    for t, slot in zip(vectors, slots):
        rows[slot // KINDS][slot % KINDS] = t
    return [tuple(row) for row in rows]

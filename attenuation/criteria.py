"""Filter-importance criteria: each maps the member convs of the channel groups to one flat float32
score per filter (lower = weaker); the pruner reduces them per group channel. Add your own with
:func:`register_criterion`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .layers import GroupMember
from .transfer import to_device


@dataclass
class CriterionContext:
    layers: Sequence[GroupMember]   # the member convs, module order
    removed: Tensor                 # flat bool over their filters, the filters removed so far
    generator: torch.Generator      # CPU generator owned (and checkpointed) by the pruner
    backend: Optional[str] = None
    # Per layer, the weights a weight criterion scores (None: the convs' own): the pruner gives
    # them with the columns that read removed channels zeroed, and with attenuate="gamma" the
    # BatchNorms folded in.
    weights: Optional[Sequence[Tensor]] = None
    # After Pruner.compact: per filter, its index among the filters of the model the pruner was
    # built on (host int64; None: the same filters), and how many that model has. A criterion that
    # draws per filter draws for all of those and takes the survivors', as without compaction.
    original_filters: Optional[Tensor] = None
    n_original_filters: Optional[int] = None

    def scored_weights(self) -> Sequence[Tensor]:
        return self.weights if self.weights is not None else [layer.conv.weight for layer in self.layers]


Criterion = Callable[[CriterionContext], Tensor]
_CRITERIA: dict[str, Criterion] = {}
_SCALES_WITH_FILTER: set[str] = set()


def register_criterion(name: str, scales_with_filter: bool = False) -> Callable[[Criterion], Criterion]:
    """Decorator: ``@register_criterion("mine")`` makes ``criterion="mine"`` usable everywhere.

    ``scales_with_filter``: the score is proportional to the filter's scale (a norm of its
    parameters), so the pruner can undo the attenuation when it scores a weak filter."""
    def add(fn: Criterion) -> Criterion:
        _CRITERIA[name] = fn
        _SCALES_WITH_FILTER.discard(name)
        if scales_with_filter:
            _SCALES_WITH_FILTER.add(name)
        return fn
    return add


def scales_with_filter(name: str) -> bool:
    get_criterion(name)
    return name in _SCALES_WITH_FILTER


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}: available are "
                         f"{', '.join(available_criteria())}") from None


@register_criterion("l1", scales_with_filter=True)
def l1_norm(ctx: CriterionContext) -> Tensor:
    return ops.filter_norms(ctx.scored_weights(), "l1", ctx.backend)


@register_criterion("l2", scales_with_filter=True)
def l2_norm(ctx: CriterionContext) -> Tensor:
    return ops.filter_norms(ctx.scored_weights(), "l2", ctx.backend)


@register_criterion("fpgm")
def geometric_median(ctx: CriterionContext) -> Tensor:
    """FPGM (He et al. 2019): a filter close to the others (near their geometric median) is
    replaceable. Score = sum of Euclidean distances to the layer's other non-removed filters."""
    scores, start = [], 0
    for weight in ctx.scored_weights():
        rows = weight.detach().flatten(1).float()
        live = ~ctx.removed[start:start + rows.shape[0]]
        distances = torch.cdist(rows, rows)
        scores.append((distances * live.float().unsqueeze(0)).sum(1))
        start += rows.shape[0]
    return torch.cat(scores)


# The criteria that read each conv's affine BatchNorm (gamma, beta and their gradients).
NEEDS_AFFINE_BN = ("bn", "bn_taylor")


def require_affine_bn(layers: Sequence[GroupMember], criterion: str = "bn") -> None:
    """The criteria of NEEDS_AFFINE_BN read each conv's BatchNorm: refuse layers without one (the
    pruner calls this at construction, so that a bad model fails before the first step)."""
    missing = [layer.name for layer in layers if layer.bn is None or layer.bn.weight is None]
    if missing:
        raise ValueError(f"criterion {criterion!r} needs an affine BatchNorm2d after every pruned conv; "
                         f"none follows: {', '.join(missing)}")


@register_criterion("bn", scales_with_filter=True)
def bn_scale(ctx: CriterionContext) -> Tensor:
    """|gamma| of the BatchNorm following each conv (network slimming, Liu et al. 2017)."""
    require_affine_bn(ctx.layers)
    return torch.cat([layer.bn.weight.detach().float().abs() for layer in ctx.layers])


@register_criterion("taylor", scales_with_filter=True)
def first_order_taylor(ctx: CriterionContext) -> Tensor:
    """First-order Taylor estimate of the loss change (Molchanov et al. 2019): sum |w * dL/dw|."""
    missing = [layer.name for layer in ctx.layers if layer.conv.weight.grad is None]
    if missing:
        raise RuntimeError(f"criterion 'taylor' needs gradients, but these convs have none: "
                           f"{', '.join(missing)} (step the pruner after backward())")
    return torch.cat([(layer.conv.weight.detach() * layer.conv.weight.grad).float().abs().flatten(1).sum(1)
                      for layer in ctx.layers])


@register_criterion("bn_taylor", scales_with_filter=True)
def bn_taylor(ctx: CriterionContext) -> Tensor:
    """First-order Taylor estimate of removing the channel after its BatchNorm:
    |gamma * dL/dgamma + beta * dL/dbeta|, which equals |sum over the batch and pixels of
    dL/dz * z| for the BN's output z. Unlike a norm of the conv weight it sees what the loss sees:
    behind a BN the weight's scale is invisible (docs/METHOD.md, "Scores under attenuation")."""
    require_affine_bn(ctx.layers, "bn_taylor")
    missing = [layer.name for layer in ctx.layers if layer.bn.weight.grad is None or layer.bn.bias.grad is None]
    if missing:
        raise RuntimeError(f"criterion 'bn_taylor' needs the BatchNorms' gradients, but these layers have "
                           f"none: {', '.join(missing)} (step the pruner after backward())")
    return torch.cat([(layer.bn.weight.detach() * layer.bn.weight.grad
                       + layer.bn.bias.detach() * layer.bn.bias.grad).float().abs() for layer in ctx.layers])


@register_criterion("random")
def random_scores(ctx: CriterionContext) -> Tensor:
    """A control: uniformly random importance."""
    n = ctx.removed.numel() if ctx.n_original_filters is None else ctx.n_original_filters
    drawn = torch.rand(n, generator=ctx.generator)
    if ctx.original_filters is not None:
        drawn = drawn[ctx.original_filters]
    return to_device(drawn, ctx.removed.device)

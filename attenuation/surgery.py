"""Physical filter removal: turn a network whose removed filters are zeroed into the
dense, smaller network that computes the same thing, and save / load the result.

VGG only for now (`attenuation.models.VGG`, or any model with the same layout whose
convolutions are nn.Conv2d subclasses).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .files import atomic_torch_save
from .models.vgg import VGG, build_model

__all__ = ["remove_filters", "save_pruned", "load_pruned", "PRUNED_FORMAT"]

PRUNED_FORMAT = "attenuation.pruned_model/1"

_Slicer = Callable[[torch.Tensor], torch.Tensor]


def _pair(v) -> tuple:
    return v if isinstance(v, tuple) else (v, v)


def _not_vgg(why: str) -> NotImplementedError:
    return NotImplementedError(
        f"filter removal is VGG-only for now (a `features` Sequential of "
        f"Conv2d(3x3, padding 1)/BatchNorm2d/ReLU blocks and MaxPool2d(2), then a `classifier` "
        f"Linear): {why}")


def _parse_vgg(model: nn.Module):
    """Check the VGG layout; return (layout, convs, classifier) where layout is the
    config template (conv entries hold the index of the conv in `features`) and
    convs is a list of (features index, conv, bn)."""
    features = getattr(model, "features", None)
    classifier = getattr(model, "classifier", None)
    if not isinstance(features, nn.Sequential):
        raise _not_vgg(f"{type(model).__name__} has no `features` nn.Sequential")
    if not isinstance(classifier, nn.Linear) or classifier.bias is None:
        raise _not_vgg(f"{type(model).__name__} has no `classifier` nn.Linear with bias")
    mods = list(features)
    layout, convs = [], []
    c_prev, i = None, 0
    while i < len(mods):
        m = mods[i]
        if (isinstance(m, nn.MaxPool2d) and _pair(m.kernel_size) == (2, 2)
                and _pair(m.stride) == (2, 2) and _pair(m.padding) == (0, 0)
                and _pair(m.dilation) == (1, 1) and not m.ceil_mode):
            layout.append("M")
            i += 1
            continue
        bn = mods[i + 1] if i + 1 < len(mods) else None
        relu = mods[i + 2] if i + 2 < len(mods) else None
        if not (isinstance(m, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                and isinstance(relu, nn.ReLU)):
            raise _not_vgg(f"features[{i}] ({type(m).__name__}) does not start a "
                           f"Conv2d/BatchNorm2d/ReLU block or a MaxPool2d(2)")
        if (m.kernel_size != (3, 3) or m.stride != (1, 1) or m.padding != (1, 1)
                or m.dilation != (1, 1) or m.groups != 1 or m.padding_mode != "zeros"):
            raise _not_vgg(f"features[{i}] is not a 3x3, stride-1, padding-1 convolution")
        if not (bn.affine and bn.track_running_stats) or bn.num_features != m.out_channels:
            raise _not_vgg(f"features[{i + 1}] is not an affine BatchNorm2d with running "
                           f"stats over the {m.out_channels} channels of features[{i}]")
        if c_prev is not None and m.in_channels != c_prev:
            raise _not_vgg(f"features[{i}] expects {m.in_channels} input channels, "
                           f"the previous conv gives {c_prev}")
        layout.append(i)
        convs.append((i, m, bn))
        c_prev = m.out_channels
        i += 3
    if not convs:
        raise _not_vgg("`features` has no convolution")
    if classifier.in_features != c_prev:
        raise _not_vgg(f"classifier expects {classifier.in_features} features, "
                       f"the last conv gives {c_prev}")
    return layout, convs, classifier


def _zero_filters(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Bool mask of the filters whose weight row, bias, gamma and beta are all zero."""
    with torch.no_grad():
        dead = conv.weight.flatten(1).eq(0).all(1) & bn.weight.eq(0) & bn.bias.eq(0)
        if conv.bias is not None:
            dead &= conv.bias.eq(0)
    return dead


def _check_keep(keep, convs) -> list[torch.Tensor]:
    if not isinstance(keep, (list, tuple)):
        raise TypeError(f"keep must be a list of bool tensors, got {type(keep).__name__}")
    if len(keep) != len(convs):
        raise ValueError(f"keep has {len(keep)} masks but the model has {len(convs)} "
                         f"convolutions")
    masks = []
    for j, (mask, (i, conv, _)) in enumerate(zip(keep, convs)):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"keep[{j}] (features.{i}) must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask)}")
        if mask.shape != (conv.out_channels,):
            raise ValueError(f"keep[{j}] (features.{i}) has shape {tuple(mask.shape)}, "
                             f"expected ({conv.out_channels},)")
        masks.append(mask.to(conv.weight.device))
    return masks


def _round_up(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Keep extra (lowest-index) dropped filters until the kept count is a multiple
    of k or the whole layer."""
    kept = int(mask.sum())
    extra = min(mask.numel(), -(-kept // k) * k) - kept
    if extra == 0:
        return mask
    mask = mask.clone()
    mask[(~mask).nonzero().flatten()[:extra]] = True
    return mask


def remove_filters(model: nn.Module, keep: list[torch.Tensor] | None = None,
                   optimizer: torch.optim.Optimizer | None = None, round_to: int = 1) -> VGG:
    """Return a new dense `VGG` without the dropped filters of `model`.

    keep: one bool mask per conv of `model.features` (True = keep); by default a filter
    is dropped when its weight row, bias, gamma and beta are all exactly zero, in which
    case the result computes exactly what `model` computes, in train and eval mode.
    round_to: round each layer's kept count up to a multiple of this.
    optimizer: if given, its references to `model`'s parameters are switched to the new
    parameters, with per-element state (momentum, Adam moments) sliced alike.

    A conv bias cannot survive in the bias-free VGG; it is folded into the BatchNorm's
    running mean, which is exact because a bias in front of a BatchNorm only shifts
    the batch mean.
    """
    layout, convs, classifier = _parse_vgg(model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
    if keep is None:
        masks = [~_zero_filters(conv, bn) for _, conv, bn in convs]
    else:
        masks = _check_keep(keep, convs)
    masks = [_round_up(m, round_to) for m in masks]
    for (i, conv, _), m in zip(convs, masks):
        if not m.any():
            raise ValueError(f"features.{i} would be left with no filter "
                             f"(all {conv.out_channels} removed)")

    counts = iter(int(m.sum()) for m in masks)
    config = [v if v == "M" else next(counts) for v in layout]
    # Built on the meta device: every tensor is replaced below by a slice of the old one,
    # which keeps each tensor's device and dtype.
    with torch.device("meta"):
        new = VGG(config, num_classes=classifier.out_features,
                  in_channels=convs[0][1].in_channels)
    swaps: list[tuple[nn.Parameter, nn.Parameter | None, _Slicer | None]] = []

    def swap(new_module: nn.Module, name: str, old: nn.Parameter, slicer: _Slicer) -> None:
        param = nn.Parameter(slicer(old.detach()), requires_grad=old.requires_grad)
        if old.grad is not None:
            param.grad = slicer(old.grad)
        setattr(new_module, name, param)
        swaps.append((old, param, slicer))

    in_idx = None
    with torch.no_grad():
        for (i, conv, bn), mask in zip(convs, masks):
            new_conv, new_bn = new.features[i], new.features[i + 1]
            out_idx = mask.nonzero().flatten()

            def rows(t: torch.Tensor, out_idx=out_idx) -> torch.Tensor:
                return t.index_select(0, out_idx)

            def weight_slice(t: torch.Tensor, out_idx=out_idx, in_idx=in_idx) -> torch.Tensor:
                t = t.index_select(0, out_idx)
                return t if in_idx is None else t.index_select(1, in_idx)

            swap(new_conv, "weight", conv.weight, weight_slice)
            swap(new_bn, "weight", bn.weight, rows)
            swap(new_bn, "bias", bn.bias, rows)
            new_bn.running_mean = rows(bn.running_mean)
            if conv.bias is not None:
                new_bn.running_mean -= rows(conv.bias)
                swaps.append((conv.bias, None, None))
            new_bn.running_var = rows(bn.running_var)
            new_bn.num_batches_tracked = bn.num_batches_tracked.clone()
            new_bn.eps, new_bn.momentum = bn.eps, bn.momentum
            in_idx = out_idx

        swap(new.classifier, "weight", classifier.weight,
             lambda t, in_idx=in_idx: t.index_select(1, in_idx))
        swap(new.classifier, "bias", classifier.bias, torch.clone)

    new.train(model.training)
    if optimizer is not None:
        _retarget(optimizer, swaps)
    return new


def _retarget(optimizer: torch.optim.Optimizer, swaps) -> None:
    """Put each new parameter where its old one was in `optimizer`, with the old
    state: tensors shaped like the parameter are sliced like it, others (Adam's step)
    cloned. A parameter with no successor (a folded conv bias) is dropped with its
    state."""
    where = {id(p): (g, j) for g in optimizer.param_groups for j, p in enumerate(g["params"])}
    dropped = set()
    for old, param, slicer in swaps:
        if id(old) not in where:
            continue
        group, j = where[id(old)]
        state = optimizer.state.pop(old, None)
        if param is None:
            dropped.add(id(old))
            continue
        group["params"][j] = param
        if state is not None:
            optimizer.state[param] = {k: _move_state(v, old, slicer) for k, v in state.items()}
    if dropped:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in dropped]


def _move_state(value, old: nn.Parameter, slicer: _Slicer):
    if not isinstance(value, torch.Tensor):
        return value
    with torch.no_grad():
        return slicer(value) if value.shape == old.shape else value.clone()


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """Save `model` (with a `spec()` method, e.g. a VGG) so that `load_pruned` can rebuild
    it without the original network. The file is replaced atomically."""
    if not callable(getattr(model, "spec", None)):
        raise TypeError(f"{type(model).__name__} has no spec() method; only models built "
                        f"by attenuation.models can be saved as pruned checkpoints")
    checkpoint = {
        "format": PRUNED_FORMAT,
        "spec": model.spec(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_torch_save(checkpoint, path)


def load_pruned(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by `save_pruned` (returned in train mode, like any new
    module)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no pruned-model checkpoint at {path!r}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable pruned-model checkpoint: {e}") from e
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == PRUNED_FORMAT
            and isinstance(checkpoint.get("spec"), dict)
            and isinstance(checkpoint.get("state_dict"), dict)):
        raise ValueError(f"{path!r} is not an {PRUNED_FORMAT!r} checkpoint "
                         f"(expected a dict with 'format', 'spec' and 'state_dict')")
    with torch.device("meta"):
        model = build_model(checkpoint["spec"])
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the state_dict in {path!r} does not match its spec: {e}") from e
    return model

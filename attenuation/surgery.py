"""Physical filter removal: turn a network whose removed filters are zeroed into the dense, smaller
network that computes the same thing, and save / load the result.

The unit of removal is a group channel of :func:`attenuation.layers.find_groups`: its filter in
every member conv (weight row, bias, BatchNorm entries) and its input channel in every reader
(conv weight columns, a Linear's block of features) go together, so any model that find_groups
traces can be cut (plain chains, residual adds, depthwise convs, concatenations).
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .files import atomic_torch_save
from .layers import ModelGroups, find_groups
from .models import build_model, create_model_from_spec, model_spec
from .modules import AttenuatedConv2d

__all__ = ["remove_filters", "pruned_architecture", "build_pruned", "save_pruned", "load_pruned",
           "PRUNED_FORMAT"]

PRUNED_FORMAT = "attenuation.pruned_model/2"
_VGG_FORMAT = "attenuation.pruned_model/1"  # read only: a VGG spec with its channel config

Keep = Union[Sequence[Tensor], Mapping[str, Tensor], None]
_Slicer = Callable[[Tensor], Tensor]


def remove_filters(model: nn.Module, keep: Keep = None,
                   optimizer: Optional[torch.optim.Optimizer] = None, round_to: int = 1, *,
                   ignored: Sequence[str] = ()) -> nn.Module:
    """Return a new dense model without the dropped group channels of `model` (left unmodified).

    keep: one bool mask per member conv of ``find_groups(model, ignored)`` (True = keep the
    filter; what ``Pruner.keep_masks()`` returns), or a dict {conv name: mask} in which absent
    convs keep every filter. The filters of one group channel must agree across its members.
    By default a group channel is dropped when every member's weight row, bias, BatchNorm gamma
    and beta are exactly zero; the result then computes exactly what `model` computes, in train
    and eval mode.
    round_to: round each group's kept count up to a multiple of this (or the whole group), keeping
    the lowest-index dropped channels.
    optimizer: if given, its references to `model`'s parameters are switched to the new ones, with
    per-element state (momentum, Adam moments) sliced alike.

    Every conv of the result is a plain ``nn.Conv2d`` (an AttenuatedConv2d, or any subclass, as
    for convert_model): with its dead channels gone an AttenuatedConv2d would only run the dense
    convolution, and a plain network runs and loads without this package's modules. Live masks
    are not carried over: a kept filter is computed from its weights (zero, when the pruner
    removed it and `round_to` kept it back).
    """
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
    new = _copy_sharing_tensors(model)
    groups = find_groups(new, ignored)
    channel_keep = _zero_channels(groups).logical_not() if keep is None else _agreed_keep(groups, keep)
    channel_keep = _round_up(groups, channel_keep, round_to)
    for group in groups.groups:
        if not channel_keep[group.offset:group.offset + group.n_channels].any():
            names = ", ".join(groups.members[j].name for j in group.members)
            raise ValueError(f"the channel group of {names} would be left with no channel "
                             f"(all {group.n_channels} removed)")
    swaps = _shrink(new, groups, channel_keep)
    if optimizer is not None:
        _retarget(optimizer, swaps)
    return new


def _copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are still `model`'s own tensors (no
    memory is copied): `_shrink` replaces every one of them."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------ which group channels stay

def _filter_index(groups: ModelGroups) -> list[Tensor]:
    """Per member, the flat group channel of each of its filters."""
    return [m.channels.cpu() + groups.groups[m.group].offset for m in groups.members]


def _zero_channels(groups: ModelGroups) -> Tensor:
    """Bool [n_channels]: the group channels whose filters are all exactly zero (weight row, bias,
    gamma, beta). Behind a BatchNorm without affine parameters no filter counts as zero: its
    eval-mode output is not."""
    zero_count = torch.zeros(groups.n_channels, dtype=torch.long)
    filter_count = torch.zeros(groups.n_channels, dtype=torch.long)
    with torch.no_grad():
        for member, index in zip(groups.members, _filter_index(groups)):
            conv, bn = member.conv, member.bn
            zero = conv.weight.flatten(1).eq(0).all(1)
            if conv.bias is not None:
                zero &= conv.bias.eq(0)
            if bn is not None and bn.affine:
                zero &= bn.weight.eq(0) & bn.bias.eq(0)
            elif bn is not None:
                zero.fill_(False)
            zero_count.index_add_(0, index, zero.long().cpu())
            filter_count.index_add_(0, index, torch.ones_like(index))
    return zero_count == filter_count


def _member_masks(groups: ModelGroups, keep) -> list[Tensor]:
    """`keep` checked and made one CPU bool mask per member."""
    members = groups.members
    if isinstance(keep, Mapping):
        index = {m.name: j for j, m in enumerate(members)}
        for name in keep:
            if name not in index:
                why = ("is not prunable (see find_groups' unprunable)" if name in groups.unprunable
                       else "is not a conv of the model")
                raise ValueError(f"keep names {name!r}, which {why}")
        keep = [keep.get(m.name) for m in members]
    elif isinstance(keep, (list, tuple)):
        if len(keep) != len(members):
            raise ValueError(f"keep has {len(keep)} masks but the model has {len(members)} "
                             f"prunable convs")
    else:
        raise TypeError(f"keep must be a list of bool tensors (one per prunable conv) or a dict "
                        f"{{conv name: bool tensor}}, got {type(keep).__name__}")
    masks = []
    for member, mask in zip(members, keep):
        if mask is None:
            masks.append(torch.ones(member.n_filters, dtype=torch.bool))
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"the keep mask of {member.name} must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if mask.shape != (member.n_filters,):
            raise ValueError(f"the keep mask of {member.name} has shape {tuple(mask.shape)}, "
                             f"expected ({member.n_filters},)")
        masks.append(mask.cpu())
    return masks


def _agreed_keep(groups: ModelGroups, keep) -> Tensor:
    """Bool [n_channels] from per-member masks, which must agree on every group channel."""
    kept_count = torch.zeros(groups.n_channels, dtype=torch.long)
    filter_count = torch.zeros(groups.n_channels, dtype=torch.long)
    masks, indices = _member_masks(groups, keep), _filter_index(groups)
    for mask, index in zip(masks, indices):
        kept_count.index_add_(0, index, mask.long())
        filter_count.index_add_(0, index, torch.ones_like(index))
    split = ((kept_count > 0) & (kept_count < filter_count)).nonzero().flatten()
    if len(split):
        channel = int(split[0])
        says = {True: [], False: []}
        for member, mask, index in zip(groups.members, masks, indices):
            for f in (index == channel).nonzero().flatten().tolist():
                says[bool(mask[f])].append(f"{member.name}[{f}]")
        raise ValueError(f"keep disagrees within a channel group (convs joined by an add or a "
                         f"depthwise conv lose a channel together): {', '.join(says[True])} "
                         f"kept but {', '.join(says[False])} dropped")
    return kept_count > 0


def _round_up(groups: ModelGroups, channel_keep: Tensor, k: int) -> Tensor:
    """Keep extra (lowest-index) dropped channels until each group's kept count is a multiple of
    k or the whole group."""
    channel_keep = channel_keep.clone()
    for group in groups.groups:
        mask = channel_keep[group.offset:group.offset + group.n_channels]  # a view
        kept = int(mask.sum())
        extra = min(group.n_channels, -(-kept // k) * k) - kept
        mask[(~mask).nonzero().flatten()[:extra]] = True
    return channel_keep


# ------------------------------------------------------------------ slicing

def _selector(*index_per_dim: Optional[Tensor]) -> _Slicer:
    """A new tensor holding the entries of dim d at index_per_dim[d] (None: all of them)."""
    def select(t: Tensor) -> Tensor:
        for dim, index in enumerate(index_per_dim):
            if index is not None:
                t = t.index_select(dim, index.to(t.device))
        return t if any(i is not None for i in index_per_dim) else t.clone()
    return select


def _index(mask: Optional[Tensor]) -> Optional[Tensor]:
    return None if mask is None or bool(mask.all()) else mask.nonzero().flatten()


class _Successors:
    """The new tensors of a shrinking model, each made once from its old one (tied parameters stay
    tied), and the (old, new, slicer) of every parameter, for the optimizer."""

    def __init__(self) -> None:
        self.params: dict[int, tuple[nn.Parameter, nn.Parameter, _Slicer]] = {}
        self.fresh: set[int] = set()

    def param(self, old: nn.Parameter, slicer: _Slicer) -> nn.Parameter:
        if id(old) not in self.params:
            with torch.no_grad():
                new = nn.Parameter(slicer(old.detach()), requires_grad=old.requires_grad)
                if old.grad is not None:
                    new.grad = slicer(old.grad)
            self.params[id(old)] = (old, new, slicer)
            self.fresh.add(id(new))
        return self.params[id(old)][1]

    def buffer(self, old: Optional[Tensor], slicer: _Slicer) -> Optional[Tensor]:
        if old is None:
            return None
        new = slicer(old)
        self.fresh.add(id(new))
        return new


def _shrink(model: nn.Module, groups: ModelGroups, channel_keep: Tensor) -> list:
    """Cut the dropped group channels out of `model` (from `_copy_sharing_tensors`) in place:
    every parameter and buffer becomes a new tensor (a slice or a clone) and every conv a plain
    nn.Conv2d. Returns the parameters' (old, new, slicer)."""
    out_keep = {m.name: channel_keep[index]
                for m, index in zip(groups.members, _filter_index(groups))}
    in_keep = {}
    for reader in groups.readers:
        channels = reader.channels.cpu()
        in_keep[reader.name] = (channels < 0) | channel_keep[channels.clamp(min=0)]  # -1: not prunable
    successors = _Successors()
    for member in groups.members:
        if member.bn is not None:
            _shrink_bn(member.bn, _index(out_keep[member.name]), successors)
    for reader in groups.readers:
        if isinstance(reader.module, nn.Linear):
            _shrink_linear(reader.module, in_keep[reader.name], reader.features_per_channel,
                           successors)
    plain = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, nn.Conv2d):
            if id(module) not in plain:
                plain[id(module)] = _plain_conv(module, out_keep.get(name),
                                                in_keep.get(name), successors)
            model.set_submodule(name, plain[id(module)])
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) not in successors.fresh:
                    setattr(module, name, successors.param(p, _selector()))
            for name, b in list(module.named_buffers(recurse=False)):
                if id(b) not in successors.fresh:
                    setattr(module, name, successors.buffer(b, _selector()))
    return list(successors.params.values())


def _shrink_bn(bn: nn.BatchNorm2d, rows: Optional[Tensor], successors: _Successors) -> None:
    select = _selector(rows)
    if bn.affine:
        bn.weight = successors.param(bn.weight, select)
        bn.bias = successors.param(bn.bias, select)
    with torch.no_grad():
        bn.running_mean = successors.buffer(bn.running_mean, select)
        bn.running_var = successors.buffer(bn.running_var, select)
    if rows is not None:
        bn.num_features = len(rows)


def _shrink_linear(linear: nn.Linear, channel_keep: Tensor, features_per_channel: int,
                   successors: _Successors) -> None:
    columns = _index(channel_keep.repeat_interleave(features_per_channel))
    linear.weight = successors.param(linear.weight, _selector(None, columns))
    if columns is not None:
        linear.in_features = len(columns)


def _plain_conv(conv: nn.Conv2d, out_keep: Optional[Tensor],
                in_keep: Optional[Tensor], successors: _Successors) -> nn.Conv2d:
    """The nn.Conv2d of `conv`'s kept output channels (member) computed from its kept input
    channels (reader)."""
    rows, columns = _index(out_keep), _index(in_keep)
    out_channels = conv.out_channels if rows is None else len(rows)
    in_channels = conv.in_channels if columns is None else len(columns)
    groups = conv.groups
    if groups > 1 and rows is not None:
        # find_groups joins a depthwise conv's output channel i with its input channel i (other
        # grouped convs are unprunable): its rows select its inputs too, its one column stays
        groups, columns = out_channels, None
    new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
    new.weight = successors.param(conv.weight, _selector(rows, columns))
    if conv.bias is not None:
        new.bias = successors.param(conv.bias, _selector(rows))
    new.train(conv.training)
    return new


def _retarget(optimizer: torch.optim.Optimizer, swaps) -> None:
    """Put each new parameter where its old one was in `optimizer`, with the old state: tensors
    shaped like the parameter are sliced like it, others (Adam's step) cloned."""
    where = {id(p): (g, j) for g in optimizer.param_groups for j, p in enumerate(g["params"])}
    for old, param, slicer in swaps:
        if id(old) not in where:
            continue
        group, j = where[id(old)]
        group["params"][j] = param
        state = optimizer.state.pop(old, None)
        if state is not None:
            optimizer.state[param] = {k: _move_state(v, old, slicer) for k, v in state.items()}


def _move_state(value, old: nn.Parameter, slicer: _Slicer):
    if not isinstance(value, Tensor):
        return value
    with torch.no_grad():
        return slicer(value) if value.shape == old.shape else value.clone()


# ------------------------------------------------------------------ the removed network's files

def pruned_architecture(model: nn.Module) -> dict:
    """What rebuilds the architecture of `model` (made by ``attenuation.models.create_model``, or
    cut from such a model by `remove_filters`, also while it trains: a compacted model whose convs
    are AttenuatedConv2d) without its code: ``{"spec": model_spec(model), "channels": {conv name:
    output channels}}``. See `build_pruned`."""
    spec = model_spec(model)
    if spec is None:
        raise TypeError(f"{type(model).__name__} was not made by attenuation.models.create_model "
                        f"(nor cut from such a model): nothing says how to rebuild it")
    return {"spec": spec, "channels": {name: m.out_channels for name, m in model.named_modules()
                                       if isinstance(m, nn.Conv2d)}}


def build_pruned(architecture: dict) -> nn.Module:
    """The fresh (untrained) model that `pruned_architecture` describes: the registry's model cut,
    in each channel group, to its first channels, as many as the saved counts of its convs. Its
    convs are plain ``nn.Conv2d``: ``convert_model`` (or a Pruner) makes a compacted training
    model's masked convs of them again."""
    channels = architecture.get("channels") if isinstance(architecture, dict) else None
    if not (isinstance(channels, dict) and set(architecture) == {"spec", "channels"}
            and all(type(n) is int and n > 0 for n in channels.values())):
        raise ValueError("a pruned architecture is a dict of 'spec' and 'channels' (a dict "
                         "{conv name: output channels > 0})")
    model = create_model_from_spec(architecture["spec"])
    with warnings.catch_warnings():  # the unprunable convs were named when the model was cut
        warnings.simplefilter("ignore")
        groups = find_groups(model)
    channel_keep = torch.zeros(groups.n_channels, dtype=torch.bool)
    for group in groups.groups:
        names = [groups.members[j].name for j in group.members]
        missing = [name for name in names if name not in channels]
        if missing:
            raise ValueError(f"the pruned architecture has no channel count for {', '.join(missing)}")
        channel_keep[group.offset:group.offset + max(channels[name] for name in names)] = True
    _shrink(model, groups, channel_keep)
    return model


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """Save `model` (see `pruned_architecture`) so that `load_pruned` rebuilds it without the
    original network or its class. The file is replaced atomically. A network with masked convs
    (AttenuatedConv2d) is refused: its dead channels would be stored as if they were kept."""
    masked = [name for name, m in model.named_modules() if isinstance(m, AttenuatedConv2d)]
    if masked:
        raise TypeError(f"{type(model).__name__} still has AttenuatedConv2d layers "
                        f"({', '.join(masked[:3])}{', ...' if len(masked) > 3 else ''}): store "
                        f"the network remove_filters returns")
    checkpoint = {"format": PRUNED_FORMAT, **pruned_architecture(model),
                  "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    atomic_torch_save(checkpoint, path)


def load_pruned(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by `save_pruned` (returned in train mode, like any new module).
    Files of the VGG-only format /1 (a VGG spec with its channel config) are read too."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no pruned-model checkpoint at {path!r}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable pruned-model checkpoint: {e}") from e
    layout = {PRUNED_FORMAT: {"format", "spec", "channels", "state_dict"},
              _VGG_FORMAT: {"format", "spec", "state_dict"}}
    form = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if form not in layout or set(checkpoint) != layout[form] or not isinstance(
            checkpoint["state_dict"], dict):
        raise ValueError(f"{path!r} is not an {PRUNED_FORMAT!r} checkpoint (expected a dict of "
                         f"{', '.join(sorted(layout[PRUNED_FORMAT]))}) nor an {_VGG_FORMAT!r} one")
    try:
        if form == PRUNED_FORMAT:
            model = build_pruned({"spec": checkpoint["spec"], "channels": checkpoint["channels"]})
        else:
            with torch.device("meta"):
                model = build_model(checkpoint["spec"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path!r} does not describe a model: {e}") from e
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the state_dict in {path!r} does not match its architecture: {e}") from e
    return model

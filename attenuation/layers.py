"""Find a model's channel groups: the convs whose output channels must be pruned together (joined
by residual adds, concats and depthwise convs), the BatchNorm2d that directly follows each, and the
layers that read them (:func:`find_groups`)."""
from __future__ import annotations

import numbers
import operator
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modules import AttenuatedConv2d


@dataclass
class GroupMember:
    """A conv whose filters belong to a channel group: filter f is group channel ``channels[f]``."""
    name: str
    conv: AttenuatedConv2d
    bn: Optional[nn.BatchNorm2d]  # the BatchNorm2d applied directly (and only) to its output, if any
    group: int                    # index into ModelGroups.groups
    channels: Tensor              # int64 [conv.out_channels], values in [0, group's n_channels)

    @property
    def n_filters(self) -> int:
        return self.conv.out_channels


@dataclass
class ChannelGroup:
    """Output channels that are removed together: channel c is filter ``members[j].channels == c``
    of every member j (the convs joined by a residual add, a depthwise conv following its input,
    index ranges mapped through a concat). A plain conv followed by its BN is a group of one."""
    members: list[int]            # indices into ModelGroups.members, in module order
    n_channels: int
    offset: int                   # where its channels start in the flat vector of all group channels


@dataclass
class ChannelReader:
    """A conv or linear layer whose input holds group channels (a removed one reads as zeros)."""
    name: str
    module: nn.Module             # an AttenuatedConv2d or nn.Linear
    channels: Tensor              # int64 [input channels]: flat group channel of each, -1 if not prunable
    features_per_channel: int = 1  # a Linear after a flatten reads each channel as h*w features


@dataclass
class ModelGroups:
    """What :func:`find_groups` found in a model."""
    members: list[GroupMember]    # module order
    groups: list[ChannelGroup]
    readers: list[ChannelReader]  # module order
    unprunable: list[str]         # convs left out (ignored, or touched by an op not understood)

    @property
    def n_channels(self) -> int:
        return sum(group.n_channels for group in self.groups)


class _ConvLeafTracer(fx.Tracer):
    """Keeps every conv, BatchNorm and max pool (our drop-in subclasses included) as one
    call_module node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d))
                or super().is_leaf_module(module, qualified_name))


# ---------------------------------------------------------------- channel groups (find_groups)
#
# The trace is read as a flow of channels. Each conv output channel is an *atom*; a tensor's
# channels are a list of atoms (-1: not from a conv, e.g. the image). An add joins the atoms of
# both operands channel by channel (union-find), a concat concatenates lists, a depthwise conv
# joins its output atom i with its input atom i. An op that is not understood *touches* the atoms
# it reads: their groups become unprunable. A removed group channel is exactly zero in every
# member (the invariant), so it stays zero through everything the flow lets pass: ops that map
# 0 to 0 channel by channel, adds and concats.

_ZERO_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Hardswish, nn.SiLU,
                            nn.GELU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                            nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)
_ZERO_PRESERVING_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.hardswish, F.silu, F.gelu,
                              F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                              F.dropout, torch.relu}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "contiguous", "clone"}
_ADDS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_SCALINGS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul}
_CONCATS = {torch.cat, torch.concat}
_FLATTENS = {torch.flatten}
_SHAPE_READS_METHODS = {"size", "dim"}
_EXTERNAL = -1


class _Channels(list):
    """A tensor's channels: one atom per channel (_EXTERNAL for a channel no conv produced)."""


@dataclass
class _Flat:
    """A tensor flattened from (N, C, H, W) to (N, C*H*W): channel-major feature blocks."""
    atoms: list


class _ChannelFlow:
    def __init__(self, modules: dict, ignored: set):
        self.modules = modules
        self.ignored = ignored
        self.parent: list[int] = []          # union-find over atoms
        self.owner: list[tuple[str, int]] = []  # atom -> (conv name, filter)
        self.atoms_of: dict[str, list[int]] = {}
        self.touched: set[int] = set()       # atoms an op not understood read
        self.by_ignored: set[int] = set()    # atoms of ignored convs
        self.touched_by: dict[int, str] = {}
        self.bn_of: dict[str, str] = {}
        self.reads: list[tuple[str, object]] = []  # (conv or linear name, the channels it reads)
        self.calls: dict[str, int] = {}

    # -- union-find
    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def new_atoms(self, conv: str, n: int) -> _Channels:
        start = len(self.parent)
        atoms = _Channels(range(start, start + n))
        self.parent.extend(atoms)
        self.owner.extend((conv, f) for f in range(n))
        return atoms

    def touch(self, value, why: str) -> None:
        for atom in _atoms_in(value):
            if atom != _EXTERNAL:
                self.touched.add(atom)
                self.touched_by.setdefault(atom, why)

    # -- the walk
    def run(self, graph: fx.Graph) -> None:
        values: dict[fx.Node, object] = {}

        def value(arg):
            if isinstance(arg, fx.Node):
                return values.get(arg)
            if isinstance(arg, (list, tuple)):
                return type(arg)(value(a) for a in arg)
            return arg

        for node in graph.nodes:
            args = [value(a) for a in node.args]
            kwargs = {k: value(v) for k, v in node.kwargs.items()}
            if node.op == "placeholder":
                values[node] = "external"
            elif node.op == "output":
                self.touch(args, "reaches the model's output")  # removal would change its shape
            elif node.op == "call_module":
                values[node] = self.call_module(node, args, kwargs)
            elif node.op == "call_function":
                values[node] = self.call_function(node, args, kwargs)
            elif node.op == "call_method":
                values[node] = self.call_method(node, args, kwargs)
            else:  # get_attr: a parameter or buffer used as a tensor
                values[node] = None

    def call_module(self, node: fx.Node, args: list, kwargs: dict):
        module = self.modules[node.target]
        name = node.target
        x = args[0] if args else None
        if isinstance(module, nn.Conv2d):
            self.calls[name] = self.calls.get(name, 0) + 1
            self.reads.append((name, x))
            atoms = self.new_atoms(name, module.out_channels)
            if self.calls[name] > 1:
                self.touch([atoms, self.atoms_of[name], x], f"{name} is called more than once")
            self.atoms_of.setdefault(name, atoms)
            if name in self.ignored:
                self.by_ignored.update(atoms)
            if module.groups == 1:
                return atoms
            if (module.groups == module.in_channels == module.out_channels
                    and isinstance(x, _Channels) and len(x) == module.in_channels):
                for out_atom, in_atom in zip(atoms, x):  # depthwise: channel i follows input i
                    if in_atom == _EXTERNAL:
                        self.touch([out_atom], f"{name} is a depthwise conv of the model's input")
                    else:
                        self.union(out_atom, in_atom)
                return atoms
            self.touch([atoms, x], f"{name} is a grouped convolution")
            return atoms
        if isinstance(module, nn.BatchNorm2d):
            producer = node.args[0] if node.args else None
            conv = self.modules.get(producer.target) if (
                isinstance(producer, fx.Node) and producer.op == "call_module") else None
            if (isinstance(conv, nn.Conv2d) and len(producer.users) == 1
                    and module.num_features == conv.out_channels and producer.target not in self.bn_of):
                self.bn_of[producer.target] = name
                return x
            self.touch(x, f"{name} is a BatchNorm not directly after a conv (it maps 0 to beta)")
            return None
        if isinstance(module, _ZERO_PRESERVING_MODULES):
            return x
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return _flatten(x)
        if isinstance(module, nn.Linear):
            if isinstance(x, _Flat) and module.in_features % len(x.atoms) == 0:
                self.reads.append((name, x))
            else:  # a Linear over the width of a feature map: it does not map 0 to 0 either
                self.touch(x, f"{name} is a Linear that does not read flattened channels")
            return None
        self.touch([args, kwargs], f"{name} ({type(module).__name__}) is not understood")
        return None

    def call_function(self, node: fx.Node, args: list, kwargs: dict):
        target = node.target
        if target in _ZERO_PRESERVING_FUNCTIONS:
            return args[0] if args else None
        if target is getattr:  # x.shape and the like: no value is read
            return None
        if target is operator.getitem:
            return self.getitem(args, node)
        if target in _ADDS and len(args) == 2 and not kwargs:
            return self.add(args[0], args[1], node)
        if target in _SCALINGS and len(args) == 2 and not kwargs:
            a, b = args
            if isinstance(b, numbers.Number) and isinstance(a, _Channels):
                return a  # a channel scaled by a constant: 0 stays 0
            if isinstance(a, numbers.Number) and isinstance(b, _Channels) and target not in (
                    operator.truediv, operator.itruediv):
                return b
        if target in _CONCATS:
            return self.concat(args, kwargs, node)
        if target in _FLATTENS and _flatten_dims(args[1:], kwargs) == (1, -1):
            return _flatten(args[0])
        if target is torch.mean:
            return self.mean(args[0], args[1:], kwargs, node)
        self.touch([args, kwargs], f"{node.name} ({getattr(target, '__name__', target)}) is not understood")
        return None

    def call_method(self, node: fx.Node, args: list, kwargs: dict):
        method = node.target
        if method in _SHAPE_READS_METHODS:
            return None
        if method in _ZERO_PRESERVING_METHODS:
            return args[0]
        if method == "flatten" and _flatten_dims(args[1:], kwargs) == (1, -1):
            return _flatten(args[0])
        if method in ("view", "reshape") and len(args) == 3 and args[2] == -1 and not kwargs:
            return _flatten(args[0])  # x.view(x.size(0), -1)
        if method == "mean":
            return self.mean(args[0], args[1:], kwargs, node)
        self.touch([args, kwargs], f"{node.name} (.{method}) is not understood")
        return None

    def getitem(self, args: list, node: fx.Node):
        x, index = args
        if isinstance(x, _Channels) and isinstance(index, tuple) and len(index) >= 2 and all(
                isinstance(i, slice) and i == slice(None) for i in index[:2]) and all(
                isinstance(i, slice) for i in index[2:]):
            return x  # spatial slicing: every channel kept, in order
        self.touch([x], f"{node.name} indexes channels")
        return None

    def add(self, a, b, node: fx.Node):
        if isinstance(a, _Channels) and isinstance(b, _Channels) and len(a) == len(b):
            for x, y in zip(a, b):
                if x == _EXTERNAL or y == _EXTERNAL:
                    self.touch([x, y], f"{node.name} adds a conv's channel to the model's input")
                else:
                    self.union(x, y)
            return _Channels(y if x == _EXTERNAL else x for x, y in zip(a, b))
        if a is None or b is None:  # the reason is upstream, named where it was touched
            self.touch([a, b], "an add takes the output of an op not understood")
        else:
            self.touch([a, b], f"{node.name} adds tensors whose channels do not align")
        return None

    def concat(self, args: list, kwargs: dict, node: fx.Node):
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if dim == 1 and isinstance(tensors, (list, tuple)) and all(isinstance(t, _Channels) for t in tensors):
            return _Channels(atom for t in tensors for atom in t)
        self.touch([args, kwargs], f"{node.name} concatenates other than channels")
        return None

    def mean(self, x, rest: list, kwargs: dict, node: fx.Node):
        dims = rest[0] if rest else kwargs.get("dim")
        keepdim = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
        if isinstance(x, _Channels) and isinstance(dims, (list, tuple)) and sorted(dims) in ([2, 3], [-2, -1]):
            return x if keepdim else _Flat(x)  # (N, C): one feature per channel
        self.touch([x], f"{node.name} averages other than the spatial dimensions")
        return None


def _atoms_in(value):
    if isinstance(value, _Flat):
        yield from value.atoms
    elif isinstance(value, _Channels):
        yield from value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _atoms_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _atoms_in(item)


def _flatten(x):
    return _Flat(x) if isinstance(x, _Channels) else None


def _flatten_dims(rest: list, kwargs: dict) -> tuple:
    start = rest[0] if rest else kwargs.get("start_dim", 0)
    end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
    return start, end


def find_groups(model: nn.Module, ignored: Sequence[str] = ()) -> ModelGroups:
    """The channel groups of ``model`` and the layers that read them, from a torch.fx trace.

    Every ``nn.Conv2d`` (``AttenuatedConv2d`` after :func:`convert_model`) not in ``ignored`` is a
    member of one group, unless an op the discovery does not understand reads its channels: then
    its whole group is unprunable (one warning names the convs and why). A model that torch.fx
    cannot trace is refused: without its graph nothing says which channels must go together.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in ignored if name not in modules]
    if unknown:
        raise ValueError(f"ignored layers not found in the model: {', '.join(unknown)}")
    if not any(isinstance(m, nn.Conv2d) for m in modules.values()):
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d to prune")
    try:
        graph = _ConvLeafTracer().trace(model)
    except Exception as error:
        raise ValueError(f"torch.fx cannot trace {type(model).__name__} ({error}): finding which "
                         "channels must be pruned together needs its graph; make forward traceable "
                         "(no control flow on tensor values)") from error
    flow = _ChannelFlow(modules, set(ignored))
    flow.run(graph)
    return _assemble(flow, modules, set(ignored))


def _assemble(flow: _ChannelFlow, modules: dict, ignored: set) -> ModelGroups:
    convs = [name for name in modules if name in flow.atoms_of]  # module order
    # convs joined through any atom are one group
    conv_parent = {name: name for name in convs}

    def find(c):
        while conv_parent[c] != c:
            c = conv_parent[c]
        return c

    root_conv: dict[int, str] = {}
    for name in convs:
        for atom in flow.atoms_of[name]:
            root = flow.find(atom)
            if root in root_conv:
                a, b = find(root_conv[root]), find(name)
                if a != b:
                    conv_parent[b] = a
            else:
                root_conv[root] = name
    blocked = {find(flow.owner[a][0]) for a in flow.touched | flow.by_ignored}
    warned = sorted({find(flow.owner[a][0]) for a in flow.touched})
    members: list[GroupMember] = []
    groups: list[ChannelGroup] = []
    group_of_root: dict[str, int] = {}
    channel_of: dict[int, int] = {}  # atom root -> flat group channel
    unprunable = []
    for name in convs:
        root_name = find(name)
        if root_name in blocked:
            if name not in ignored:
                unprunable.append(name)
            continue
        if root_name not in group_of_root:
            group_of_root[root_name] = len(groups)
            groups.append(ChannelGroup(members=[], n_channels=0, offset=0))
        g = group_of_root[root_name]
        group = groups[g]
        local = []
        for atom in flow.atoms_of[name]:
            root = flow.find(atom)
            if root not in channel_of:
                channel_of[root] = group.n_channels  # local for now, made flat below
                group.n_channels += 1
            local.append(channel_of[root])
        group.members.append(len(members))
        bn_name = flow.bn_of.get(name)
        members.append(GroupMember(name=name, conv=modules[name], bn=modules[bn_name] if bn_name else None,
                                   group=g, channels=torch.tensor(local, dtype=torch.int64)))
    offset = 0
    for group in groups:
        group.offset = offset
        offset += group.n_channels
    flat_of = {root: groups[group_of_root[find(flow.owner[root][0])]].offset + local
               for root, local in channel_of.items()}
    readers = []
    for name, read in flow.reads:
        reader = _reader(name, modules[name], read, lambda atom: flat_of.get(flow.find(atom), -1)
                         if atom != _EXTERNAL else -1)
        if reader is not None and bool((reader.channels >= 0).any()):
            readers.append(reader)
    order = {name: i for i, name in enumerate(modules)}
    readers.sort(key=lambda r: order[r.name])
    if warned:
        named = [name for name in convs if find(name) in warned and name not in ignored]
        reasons = sorted({flow.touched_by[a] for a in flow.touched})
        warnings.warn(f"attenuation: {len(named)} convs are left unprunable, because their channels "
                      f"pass through ops the channel-group discovery does not understand "
                      f"({'; '.join(reasons)}): {', '.join(named)}")
    return ModelGroups(members=members, groups=groups, readers=readers, unprunable=unprunable)


def _reader(name: str, module: nn.Module, read, flat) -> Optional[ChannelReader]:
    if isinstance(module, nn.Conv2d):
        if isinstance(read, _Channels) and len(read) == module.in_channels:
            return ChannelReader(name, module, torch.tensor([flat(a) for a in read], dtype=torch.int64))
        return None
    atoms = read.atoms  # call_module recorded only flattened channels it can map
    return ChannelReader(name, module, torch.tensor([flat(a) for a in atoms], dtype=torch.int64),
                         features_per_channel=module.in_features // len(atoms))

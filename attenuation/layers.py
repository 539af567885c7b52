"""Find a model's prunable filters: each conv, the BatchNorm2d that directly follows it, and which
earlier conv (if any) feeds its input through channel-wise layers only."""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .modules import AttenuatedConv2d

# Layers and functions that act on each channel separately: a zero channel stays zero through them.
_CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
                        nn.Identity)
_CHANNELWISE_FUNCTIONS = (F.relu, F.relu6, F.leaky_relu, F.max_pool2d, F.avg_pool2d,
                          F.adaptive_avg_pool2d, F.dropout, operator.getitem)


@dataclass
class PrunableLayer:
    """One conv layer whose filters the pruner scores and attenuates."""
    name: str
    conv: AttenuatedConv2d
    bn: Optional[nn.BatchNorm2d]
    source: Optional[int] = None  # index of the layer whose output channels are this conv's input

    @property
    def n_filters(self) -> int:
        return self.conv.out_channels


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
    """Keeps every conv (our subclass included) as one call_module node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


def _trace_graph(model: nn.Module) -> Optional[fx.Graph]:
    try:
        return _ConvLeafTracer().trace(model)
    except Exception as error:  # models with data-dependent control flow cannot be traced
        warnings.warn(f"attenuation: could not trace {type(model).__name__} ({error}); pairing "
                      "convs with BatchNorms by registration order and reading all input channels")
        return None


def find_prunable_layers(model: nn.Module, ignored: Sequence[str] = ()) -> list[PrunableLayer]:
    """Every ``AttenuatedConv2d`` of ``model`` (run :func:`convert_model` first), in module order,
    except those named in ``ignored``."""
    modules = dict(model.named_modules())
    unknown = [name for name in ignored if name not in modules]
    if unknown:
        raise ValueError(f"ignored layers not found in the model: {', '.join(unknown)}")
    convs = [name for name, m in modules.items()
             if isinstance(m, AttenuatedConv2d) and name not in ignored]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no AttenuatedConv2d: call convert_model first")
    graph = _trace_graph(model)
    bn_of, source_of = (_links_from_graph(graph, modules) if graph is not None
                        else (_bn_by_registration_order(modules), {}))
    index = {name: i for i, name in enumerate(convs)}
    layers = []
    for name in convs:
        bn_name = bn_of.get(name)
        source = source_of.get(name)
        layers.append(PrunableLayer(
            name=name, conv=modules[name], bn=modules[bn_name] if bn_name else None,
            source=index.get(source) if source is not None else None))
    return layers


def _links_from_graph(graph: fx.Graph, modules: dict) -> tuple[dict, dict]:
    def module_of(node):
        return modules.get(node.target) if node.op == "call_module" else None

    bn_of, source_of = {}, {}
    for node in graph.nodes:
        module = module_of(node)
        if isinstance(module, nn.BatchNorm2d) and node.args:
            producer = node.args[0]
            conv = module_of(producer) if isinstance(producer, fx.Node) else None
            if (isinstance(conv, nn.Conv2d) and len(producer.users) == 1
                    and module.num_features == conv.out_channels):
                bn_of[producer.target] = node.target
        elif isinstance(module, AttenuatedConv2d) and node.args:
            source, bns = _channelwise_source(node.args[0], module_of)
            # A removed filter's channel is zero only through its own (zeroed) BatchNorm.
            if (source is not None and modules[source].out_channels == module.in_channels
                    and all(bn == bn_of.get(source) for bn in bns)):
                source_of[node.target] = source
    return bn_of, source_of


def _channelwise_source(node, module_of) -> tuple[Optional[str], list[str]]:
    """Walk back from a conv's input through channel-wise ops to the conv that produced it;
    returns that conv's name (or None) and the BatchNorms passed on the way."""
    bns = []
    while isinstance(node, fx.Node):
        module = module_of(node)
        if isinstance(module, nn.Conv2d):
            return node.target, bns
        if isinstance(module, nn.BatchNorm2d):
            bns.append(node.target)
        channelwise = (isinstance(module, (nn.BatchNorm2d, *_CHANNELWISE_MODULES))
                       or (node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS)
                       or (node.op == "call_method" and node.target in ("relu", "relu_")))
        if not channelwise or not node.args:
            return None, bns
        node = node.args[0]
    return None, bns


def _bn_by_registration_order(modules: dict) -> dict:
    names = list(modules)
    pairs = {}
    for current, following in zip(names, names[1:]):
        conv, bn = modules[current], modules[following]
        if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                and bn.num_features == conv.out_channels):
            pairs[current] = following
    return pairs


def find_groups(model: nn.Module, ignored: Sequence[str] = ()) -> ModelGroups:
    """The channel groups of ``model`` (its convs swapped for ``AttenuatedConv2d``) and the layers
    that read them, from a torch.fx trace. Not written yet: the interface the engine and the
    surgery are being built against."""
    raise NotImplementedError("find_groups is being written")

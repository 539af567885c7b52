"""The pruner's two flat layouts and the maps between them: member filters (member conv 0's
filters first: what the ops take) and group channels (group 0's channels first: the unit of the
rule, docs/METHOD.md "Channel groups"), and where each conv's output and input channels sit among
the group channels (for the live masks)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .layers import ModelGroups
from .modules import AttenuatedConv2d

# How the member filters' scores of a group channel make its score (PruningConfig.group_reduce).
GROUP_REDUCTIONS = ("sum", "mean", "max")


@dataclass
class ConvChannels:
    """An AttenuatedConv2d that holds group channels: per output channel (a member's filters) and
    per input channel (a reader's), the flat group channel, or ``n_channels`` where none (always
    live). None: no group channel on that side."""
    conv: AttenuatedConv2d
    out_channels: Optional[Tensor]  # int64, host
    in_channels: Optional[Tensor]   # int64, host


class ChannelLayout:
    """Where every member filter and every reader's input channel sits among the group channels."""

    def __init__(self, groups: ModelGroups, device: torch.device):
        self.counts = [group.n_channels for group in groups.groups]          # per group
        self.offsets = list(itertools.accumulate(self.counts, initial=0))
        self.filter_counts = [member.n_filters for member in groups.members]  # per member conv
        self.filter_offsets = list(itertools.accumulate(self.filter_counts, initial=0))
        _check(groups, self.offsets)
        channel = torch.cat([member.channels.to("cpu", torch.int64) + self.offsets[member.group]
                             for member in groups.members])
        self.n_channels, self.n_filters = self.offsets[-1], channel.numel()
        # The filters of each channel in a (channels, most filters of a channel) table, in filter
        # order, padded with n_filters (the slot aggregate fills with the reduction's identity).
        per_channel = torch.bincount(channel, minlength=self.n_channels)
        if not bool((per_channel > 0).all()):
            empty = (per_channel == 0).nonzero().flatten().tolist()
            raise ValueError(f"find_groups gave group channels that no member filter holds: {empty}")
        order = torch.sort(channel, stable=True).indices
        starts = torch.cumsum(per_channel, 0) - per_channel
        rank = torch.arange(self.n_filters) - starts[channel[order]]
        table = torch.full((self.n_channels, int(per_channel.max())), self.n_filters, dtype=torch.int64)
        table[channel[order], rank] = order
        self.filter_channel_host = channel
        self.filter_channel = channel.to(device)
        self.first_filter = table[:, 0].to(device)   # one filter per channel: all share its state
        self._table = table.to(device)
        self._filters_per_channel = per_channel.to(device, torch.float32)
        self.convs = _conv_channels(groups, channel, self.filter_offsets, self.n_channels)

    def aggregate(self, scores: Tensor, how: str) -> Tensor:
        """Per group channel, the ``how`` (sum, mean or max) of its member filters' scores."""
        if scores.shape != (self.n_filters,):
            raise ValueError(f"the criterion gave scores of shape {tuple(scores.shape)}, expected one "
                             f"per member filter: ({self.n_filters},)")
        fill = -torch.inf if how == "max" else 0.0
        padded = torch.cat([scores, scores.new_full((1,), fill)])[self._table]
        if how == "max":
            return padded.amax(1)
        total = padded.sum(1)
        return total / self._filters_per_channel if how == "mean" else total

    def expand(self, values: Tensor) -> Tensor:
        """Per member filter, the value of its group channel."""
        return values[self.filter_channel]

    def of_channels(self, values: Tensor) -> Tensor:
        """Per group channel, the value of its first filter (a channel's filters share their state)."""
        return values[self.first_filter]


def _check(groups: ModelGroups, offsets: list[int]) -> None:
    for index, group in enumerate(groups.groups):
        if group.offset != offsets[index]:
            raise ValueError(f"find_groups gave group {index} offset {group.offset}, expected {offsets[index]}")
    for member in groups.members:
        n = groups.groups[member.group].n_channels
        channels = member.channels
        if channels.shape != (member.n_filters,) or (channels.numel() and not
                                                     (0 <= int(channels.min()) and int(channels.max()) < n)):
            raise ValueError(f"find_groups gave member {member.name} channels outside its group's {n}")


def _conv_channels(groups: ModelGroups, channel: Tensor, filter_offsets: list[int],
                   n_channels: int) -> list[ConvChannels]:
    """Every AttenuatedConv2d that is a member or reads group channels, members first."""
    found: dict[int, ConvChannels] = {}
    for i, member in enumerate(groups.members):
        found[id(member.conv)] = ConvChannels(member.conv, channel[filter_offsets[i]:filter_offsets[i + 1]], None)
    for reader in groups.readers:
        if not isinstance(reader.module, AttenuatedConv2d):
            continue
        inputs = reader.channels.to("cpu", torch.int64)
        inputs = torch.where(inputs < 0, n_channels, inputs)
        entry = found.setdefault(id(reader.module), ConvChannels(reader.module, None, None))
        entry.in_channels = inputs
    return list(found.values())

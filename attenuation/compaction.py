"""The original numbering of a pruner whose model was compacted (:meth:`Pruner.compact`): where each
of its group channels and member filters sat in the model it was built on, and the fates of the
channels cut out, so that its results (counts, fates, status history, keep masks) read as those of
a pruner that never compacted (docs/ARCHITECTURE.md, "Compaction")."""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor

from .layout import ChannelLayout

# The per-channel fates a pruner reports (Pruner.fates): dtype and the value of a channel without one.
FATES = {"steps_weak": (torch.int32, 0), "returns": (torch.int32, 0), "removed_at": (torch.int64, -1)}
_STATE_KEYS = ("counts", "filter_counts", "filter_channel", "channel", *FATES)


def new_fates(n: int, device: torch.device) -> dict[str, Tensor]:
    """The fates of ``n`` channels that have none yet."""
    return {key: torch.full((n,), fill, dtype=dtype, device=device) for key, (dtype, fill) in FATES.items()}


class OriginalNumbering:
    """The model as the pruner was built on it: its groups' sizes (``counts``), its member convs'
    filter counts and each filter's group channel; and per channel of the working layout (what is
    left after compactions) its index among the original channels (``channel``, increasing:
    compaction keeps the order). The fates of the cut channels are kept at their original index."""

    def __init__(self, counts: list[int], filter_counts: list[int], filter_channel: Tensor,
                 channel: Tensor, cut_fates: dict[str, Tensor]):
        self.counts = list(counts)
        self.offsets = list(itertools.accumulate(self.counts, initial=0))
        self.filter_counts = list(filter_counts)
        self.filter_channel = filter_channel   # int64, per original filter, on the pruner's device
        self.channel = channel                 # int64, per working channel, on the pruner's device
        self.cut_fates = cut_fates             # original width, on the pruner's device
        self.filter_index = self._filter_index()

    @classmethod
    def of(cls, layout: ChannelLayout, device: torch.device) -> "OriginalNumbering":
        """The numbering of a pruner that has not compacted: the layout's own."""
        n = layout.n_channels
        return cls(layout.counts, layout.filter_counts, layout.filter_channel_host.to(device),
                   torch.arange(n, device=device), new_fates(n, device))

    @property
    def n_channels(self) -> int:
        return self.offsets[-1]

    @property
    def n_cut(self) -> int:
        """Channels cut out of the model (all of them removed)."""
        return self.n_channels - self.channel.numel()

    def to_original(self, values: Tensor, fill) -> Tensor:
        """``values`` per working channel as a new vector over the original channels, ``fill`` at
        the cut ones."""
        out = values.new_full((self.n_channels,), fill)
        out[self.channel] = values
        return out

    def fates(self, current: dict[str, Tensor]) -> dict[str, Tensor]:
        """The fates over the original channels: the working channels' ``current`` ones, the cut
        channels' as they were when cut."""
        out = {}
        for key in FATES:
            out[key] = self.cut_fates[key].clone()
            out[key][self.channel] = current[key]
        return out

    def cut(self, keep: Tensor, current: dict[str, Tensor]) -> None:
        """Channels of the working layout cut out: ``keep`` (bool, per working channel) says which
        stay; the fates of the others (from ``current``) are kept."""
        gone = self.channel[~keep]
        for key in FATES:
            self.cut_fates[key][gone] = current[key][~keep]
        self.channel = self.channel[keep]
        self.filter_index = self._filter_index()

    def _filter_index(self) -> Optional[Tensor]:
        """Per filter of the working model, its index among the original filters (host); None
        before any cut. A member's filters keep their order, and the members theirs."""
        if not self.n_cut:
            return None
        present = torch.zeros(self.n_channels, dtype=torch.bool, device=self.channel.device)
        present[self.channel] = True
        return present[self.filter_channel].nonzero().flatten().cpu()

    def state_dict(self) -> dict:
        return {"counts": list(self.counts), "filter_counts": list(self.filter_counts),
                "filter_channel": self.filter_channel.cpu(), "channel": self.channel.cpu(),
                **{key: value.cpu() for key, value in self.cut_fates.items()}}

    @classmethod
    def from_state(cls, state: dict, layout: ChannelLayout, device: torch.device) -> "OriginalNumbering":
        """A saved numbering, checked against the working ``layout`` it must describe."""
        if not isinstance(state, dict) or set(state) != set(_STATE_KEYS):
            raise ValueError(f"the pruner state's original numbering must hold exactly {_STATE_KEYS}")
        counts, filter_counts = state["counts"], state["filter_counts"]
        n = sum(counts)
        channel = state["channel"].to(torch.int64)
        problem = None
        if len(counts) != len(layout.counts) or len(filter_counts) != len(layout.filter_counts):
            problem = "its groups or member convs are not the model's"
        elif state["filter_channel"].shape != (sum(filter_counts),):
            problem = "its filter map does not have one entry per original filter"
        elif channel.shape != (layout.n_channels,):
            problem = f"it maps {channel.numel()} channels, the model has {layout.n_channels}"
        elif channel.numel() and not (int(channel.min()) >= 0 and int(channel.max()) < n
                                      and bool((channel.diff() > 0).all())):
            problem = "its channel map is not increasing within the original channels"
        elif any(state[key].shape != (n,) for key in FATES):
            problem = "its fates do not have one entry per original channel"
        if problem:
            raise ValueError(f"the pruner state's original numbering does not fit this model: {problem}")
        return cls(counts, filter_counts, state["filter_channel"].to(device, torch.int64),
                   channel.to(device), {key: state[key].to(device) for key in FATES})


def kept_back(removed: Tensor, counts: list[int], round_to: int) -> Tensor:
    """Per group (``counts``: sizes), its ``round_to - 1`` lowest-index removed channels: those a
    final ``remove_filters(..., round_to=round_to)`` may keep back (it rounds a group's kept count
    up with its lowest-index dropped channels). Compaction leaves them in, so that the final
    network does not depend on it."""
    kept = torch.zeros_like(removed)
    if round_to > 1:
        for start, end in itertools.pairwise(itertools.accumulate(counts, initial=0)):
            kept[start + removed[start:end].nonzero().flatten()[:round_to - 1]] = True
    return kept

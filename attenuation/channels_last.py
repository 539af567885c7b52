"""The form every network takes in a run: channels-last weights, and the drop-in layers that keep
channels-last fast on the CPU for any channel count (the counts pruning leaves). One definition for
``attenuation run`` and the benchmarks that time what it trains."""
from __future__ import annotations

import torch
import torch.nn as nn

from .batch_norm import convert_batch_norms
from .max_pool import convert_max_pools

__all__ = ["as_channels_last"]


def as_channels_last(model: nn.Module) -> nn.Module:
    """``model`` in place with channels-last weights, every nn.BatchNorm2d a ChannelsLastBatchNorm2d
    and every nn.MaxPool2d a ChannelsLastMaxPool2d (the same parameters and buffers). Returns it."""
    convert_max_pools(convert_batch_norms(model))
    return model.to(memory_format=torch.channels_last)

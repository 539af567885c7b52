"""The CIFAR ResNets of He et al. 2016 (sec. 4.2): depth 6n + 2, three stages of n basic blocks
with 16, 32 and 64 channels (times the width multiplier) on 32x32 inputs.

Where a block changes the shape (the first block of stages 2 and 3: stride 2, more channels),
the shortcut is
- option A (parameter-free, as in Soft Filter Pruning and FPGM): the input subsampled
  (``x[:, :, ::2, ::2]``) and zero-padded with the missing channels after its own, so output
  channel i < in_channels is input channel i plus the residual;
- option B: a strided 1x1 convolution and a BatchNorm.
Every other shortcut is the identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .width import scale_channels

__all__ = ["SHORTCUTS", "STAGE_CHANNELS", "BasicBlock", "ResNet", "SubsampleAndPad", "resnet_blocks"]

SHORTCUTS = ("A", "B")
STAGE_CHANNELS = (16, 32, 64)


def resnet_blocks(depth: int) -> int:
    """n, the blocks per stage of the CIFAR ResNet of ``depth`` = 6n + 2 layers."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), "
                         f"got {depth!r}")
    return (depth - 2) // 6


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class SubsampleAndPad(nn.Module):
    """Shortcut option A: every ``stride``-th position of every channel, then ``extra`` zero
    channels after the input's own. No parameters."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra={self.extra}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = SubsampleAndPad(stride, out_channels - in_channels)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem conv3x3 (3 -> 16w) + BN + ReLU; stages layer1..layer3 of n blocks each (stride 2 at the
    first block of layer2 and layer3); global average pool; fc. Convs bias-free, Kaiming init."""

    def __init__(self, depth: int, shortcut: str = "A", width: float = 1.0, num_classes: int = 10):
        super().__init__()
        n = resnet_blocks(depth)
        if shortcut not in SHORTCUTS:
            raise ValueError(f"ResNet shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"ResNet num_classes must be a positive int, got {num_classes!r}")
        channels = [scale_channels(c, width) for c in STAGE_CHANNELS]
        self.conv1 = _conv3x3(3, channels[0], 1)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = channels[0]
        stages = []
        for i, c_out in enumerate(channels):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if i > 0 and b == 0 else 1, shortcut))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

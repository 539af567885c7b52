"""VGG for CIFAR-sized inputs (32x32), with a JSON-serialisable spec so that a
physically pruned network (irregular channel counts) can be rebuilt from its config."""

from __future__ import annotations

import torch
from torch import nn

from .width import check_width, scale_channels

__all__ = ["VGG_CONFIGS", "vgg_config", "VGG", "vgg", "build_model"]

VGG_CONFIGS: dict[int, list] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg_config(depth: int = 16, width: float = 1.0) -> list:
    """The standard layer list of VGG-`depth` with every channel count scaled by `width`."""
    if depth not in VGG_CONFIGS:
        raise ValueError(f"unknown VGG depth {depth!r}; expected one of {sorted(VGG_CONFIGS)}")
    check_width(width)
    return [v if v == "M" else scale_channels(v, width) for v in VGG_CONFIGS[depth]]


def _check_config(config) -> list:
    if not isinstance(config, (list, tuple)) or len(config) == 0:
        raise ValueError(f"VGG config must be a non-empty list, got {config!r}")
    for i, v in enumerate(config):
        is_channels = isinstance(v, int) and not isinstance(v, bool) and v > 0
        if not (is_channels or v == "M"):
            raise ValueError(
                f"VGG config entry {i} is {v!r}; expected a positive int (conv channels) or 'M'")
    if not any(v != "M" for v in config):
        raise ValueError(f"VGG config has no convolution: {config!r}")
    return list(config)


class VGG(nn.Module):
    """features: [Conv3x3(no bias) -> BN -> ReLU] per int, MaxPool2d(2) per "M";
    classifier: one Linear on the flattened features (1x1 spatial for 32x32 input
    after five pools)."""

    def __init__(self, config: list, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        config = _check_config(config)
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"VGG {name} must be a positive int, got {v!r}")
        self.config = config
        self.num_classes = num_classes
        self.in_channels = in_channels

        layers: list[nn.Module] = []
        c_in = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False),
                           nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def spec(self) -> dict:
        """Everything needed to rebuild this architecture as it was built (see `build_model`); a copy
        cut by ``surgery.remove_filters`` keeps it: its own is ``surgery.pruned_architecture``."""
        return {"arch": "vgg", "config": list(self.config),
                "num_classes": self.num_classes, "in_channels": self.in_channels}


def vgg(depth: int = 16, width: float = 1.0, num_classes: int = 10) -> VGG:
    return VGG(vgg_config(depth, width), num_classes=num_classes)


def build_model(spec: dict) -> nn.Module:
    """Rebuild an (untrained) model from the dict returned by its `spec()`."""
    if not isinstance(spec, dict):
        raise ValueError(f"model spec must be a dict, got {type(spec).__name__}")
    arch = spec.get("arch")
    if arch != "vgg":
        raise ValueError(f"unknown model arch {arch!r} in spec; supported: 'vgg'")
    missing = {"config", "num_classes", "in_channels"} - spec.keys()
    if missing:
        raise ValueError(f"malformed vgg spec: missing key(s) {sorted(missing)}")
    extra = spec.keys() - {"arch", "config", "num_classes", "in_channels"}
    if extra:
        raise ValueError(f"malformed vgg spec: unexpected key(s) {sorted(extra)}")
    return VGG(spec["config"], num_classes=spec["num_classes"], in_channels=spec["in_channels"])

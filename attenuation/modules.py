"""The drop-in ``AttenuatedConv2d`` and the swap that puts it into any model."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .transfer import to_device


class AttenuatedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes only its live output channels from its live input channels.

    Same constructor, parameters and state_dict keys as ``nn.Conv2d`` (plus the ``live_out`` and
    ``live_in`` masks, which a plain Conv2d state_dict may lack: they then default to all live).
    Dead output channels are written as zeros. With every channel live it runs the dense
    convolution, so it computes exactly what ``nn.Conv2d`` does. The masks change only through
    :meth:`set_live`, which caches the index lists so that forward never synchronises. Grouped
    convolutions and padding modes other than zeros, which the masked op does not take, run the
    dense convolution on the live input channels and zero the dead output channels.
    """

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.register_buffer("live_out", torch.ones(self.out_channels, dtype=torch.bool,
                                                    device=self.weight.device))
        self.register_buffer("live_in", None)
        self._out_index: Optional[Tensor] = None
        self._in_index: Optional[Tensor] = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, backend: Optional[str] = None) -> "AttenuatedConv2d":
        """The same convolution, sharing ``conv``'s Parameter objects (optimizers stay valid)."""
        with torch.device("meta"):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                      bias=conv.bias is not None, padding_mode=conv.padding_mode, backend=backend)
        new.weight = conv.weight
        new.bias = conv.bias
        new.live_out = torch.ones(conv.out_channels, dtype=torch.bool, device=conv.weight.device)
        new.train(conv.training)
        return new

    def set_live(self, live_out: Optional[Tensor] = None, live_in: Optional[Tensor] = None) -> None:
        """Set which output / input channels are live (None = all) and cache their index lists.

        The masks are read on the host: pass CPU masks and nothing is read from the device (on
        CUDA the masks and index lists are then copied to it without waiting). Call it when the
        masks change, not every step."""
        out_mask = (torch.ones(self.out_channels, dtype=torch.bool) if live_out is None
                    else live_out.to("cpu", torch.bool))
        if out_mask.shape != (self.out_channels,):
            raise ValueError(f"live_out must have shape ({self.out_channels},), got {tuple(out_mask.shape)}")
        in_mask = None if live_in is None else live_in.to("cpu", torch.bool)
        if in_mask is not None and in_mask.shape != (self.in_channels,):
            raise ValueError(f"live_in must have shape ({self.in_channels},), got {tuple(in_mask.shape)}")
        device = self.live_out.device
        self.live_out = to_device(out_mask, device)
        self.live_in = None if in_mask is None else to_device(in_mask, device)
        self._refresh_indices(out_mask, in_mask)

    def _refresh_indices(self, out_mask: Optional[Tensor] = None, in_mask: Optional[Tensor] = None) -> None:
        """Cache the index lists, computed on the host from the masks' host copies (read from
        the buffers when not given)."""
        if self.live_out.is_meta:
            self._out_index = self._in_index = None
            return
        if out_mask is None:
            out_mask = self.live_out.cpu()
            in_mask = None if self.live_in is None else self.live_in.cpu()
        device = self.live_out.device
        self._out_index = None if out_mask.all() else to_device(out_mask.nonzero().flatten(), device)
        self._in_index = (None if in_mask is None or in_mask.all()
                          else to_device(in_mask.nonzero().flatten(), device))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._refresh_indices()  # device moves must move the cached index lists too
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        out_key, in_key = prefix + "live_out", prefix + "live_in"
        state_dict.setdefault(out_key, torch.ones_like(self.live_out))
        live_in = state_dict.pop(in_key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if live_in is not None:
            self.live_in = live_in.to(self.live_out.device, torch.bool).clone()
        self._refresh_indices()

    @property
    def live_fraction(self) -> float:
        return float(self.live_out.float().mean())

    def forward(self, x: Tensor) -> Tensor:
        if self._out_index is None and self._in_index is None:
            return super().forward(x)
        if self.groups != 1 or self.padding_mode != "zeros":
            return self._masked_dense_forward(x)
        return ops.masked_conv2d(x, self.weight, self.bias, self._out_index, self._in_index, None,
                                 self.stride, self.padding, self.dilation, 1, backend=self.backend)

    def _masked_dense_forward(self, x: Tensor) -> Tensor:
        """The masked convolution's result for the convs the op does not take: dead input channels
        read as zeros, dead output channels written as zeros (whatever their weights hold)."""
        if self._in_index is not None:
            x = x.masked_fill(~self.live_in.view(1, -1, 1, 1), 0)
        y = super().forward(x)
        if self._out_index is not None:
            y = y.masked_fill(~self.live_out.view(1, -1, 1, 1), 0)
        return y

    def extra_repr(self) -> str:
        live = int(self.live_out.sum())
        return super().extra_repr() + (f", live={live}/{self.out_channels}" if live < self.out_channels else "")


def convert_model(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Swap every ``nn.Conv2d`` in ``model`` for an ``AttenuatedConv2d`` in place, keeping the very
    same weight and bias Parameters. Returns ``model``."""
    found = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AttenuatedConv2d):
                found = True
            elif isinstance(child, nn.Conv2d):
                setattr(parent, name, AttenuatedConv2d.from_conv(child, backend))
                found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d to prune")
    return model

"""A drop-in ``nn.MaxPool2d(2)`` for channels-last activations on the CPU, fast for any channel count.

PyTorch's channels-last max pool vectorises along the channels and runs the remainder of a count
that is not a multiple of the vector width as scalar code per pixel, so the pruned counts (10, 21,
83) pool slower than the unpruned 16, 32, 128. The native ops ``max_pool2x2`` and
``max_pool2x2_backward`` (csrc/cpu/max_pool.cpp) handle every pixel in whole 16-lane blocks.

:class:`ChannelsLastMaxPool2d` computes what ``nn.MaxPool2d`` computes (F.max_pool2d is the
reference in tests/test_max_pool.py: the same values, NaN included, and the same gradients) and
takes the native ops for a 2x2 window with stride 2 (no padding, dilation 1, no indices returned)
on a 4-D channels-last CPU tensor of even height and width, float32 / float64 / float16 /
bfloat16, whose channel count is not a multiple of 16 (where PyTorch's kernel is fast). Anything else, or a build of the extension without these ops, runs
``nn.MaxPool2d.forward``. :func:`convert_max_pools` swaps them into a model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from .cpu_layers import has_cpu_kernel, native_input

NATIVE = has_cpu_kernel("max_pool2x2")
_ops = torch.ops.attenuation

__all__ = ["ChannelsLastMaxPool2d", "convert_max_pools", "NATIVE"]

if NATIVE:
    @torch.library.register_fake("attenuation::max_pool2x2")
    def _(x):
        shape = (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
        out = x.new_empty(shape).contiguous(memory_format=torch.channels_last)
        return out, torch.empty_like(out, dtype=torch.uint8)

    @torch.library.register_fake("attenuation::max_pool2x2_backward")
    def _(grad_out, codes, x_size):
        return grad_out.new_empty(x_size).contiguous(memory_format=torch.channels_last)

    def _setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.x_size = list(inputs[0].shape)

    def _backward(ctx, grad_out, _grad_codes):
        (codes,) = ctx.saved_tensors
        return _ops.max_pool2x2_backward(grad_out, codes, ctx.x_size)

    torch.library.register_autograd("attenuation::max_pool2x2", _backward, setup_context=_setup_context)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools 2x2 windows with stride 2 of channels-last CPU activations
    through the native ops (see the module docstring); the same module otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._native_applies(x):
            return super().forward(x)
        return _ops.max_pool2x2(x)[0]

    def _native_applies(self, x: Tensor) -> bool:
        stride = self.kernel_size if self.stride is None else self.stride
        return (NATIVE and _pair(self.kernel_size) == (2, 2) and _pair(stride) == (2, 2)
                and _pair(self.padding) == (0, 0) and _pair(self.dilation) == (1, 1) and not self.ceil_mode
                and not self.return_indices and native_input(x) and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)


def convert_max_pools(model: nn.Module) -> nn.Module:
    """Swap every ``nn.MaxPool2d`` of ``model`` (exactly that class) for a
    :class:`ChannelsLastMaxPool2d` with the same settings, in place. Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MaxPool2d:
                new = ChannelsLastMaxPool2d.__new__(ChannelsLastMaxPool2d)
                new.__dict__.update(child.__dict__)  # the same settings, hooks and flags
                setattr(parent, name, new)
    return model

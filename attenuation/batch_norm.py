"""A drop-in ``nn.BatchNorm2d`` for channels-last activations on the CPU, fast for any channel count.

PyTorch's CPU BatchNorm vectorises channels-last tensors along the channels, so the counts pruning
leaves (10, 21, 83: not multiples of 16) take a scalar path: 3-10x slower than a multiple of 16, so
slow that a pruned network trained slower than the unpruned one (bench/RESULTS.md). The native ops
``batch_norm_train``, ``batch_norm_backward`` and ``channel_affine`` (csrc/cpu/batch_norm.cpp) read
the activations as one flat array with a channel pattern that repeats, and vectorise for any count.

:class:`ChannelsLastBatchNorm2d` computes what ``nn.BatchNorm2d`` computes (the same parameters,
buffers, state_dict and running-statistics update; F.batch_norm is the reference in
tests/test_batch_norm.py) and takes the native ops where they apply: a 4-D channels-last tensor on
the CPU, float32 / float64 / float16 / bfloat16, a channel count that is not a multiple of 16 (where
PyTorch's kernel is fast), in training mode (or without running statistics), or in evaluation mode
without gradients. Anything else, or a build of the extension without these ops, runs
``nn.BatchNorm2d.forward``. :func:`convert_batch_norms` swaps them into a model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .cpu_layers import has_cpu_kernel, native_input

NATIVE = has_cpu_kernel("batch_norm_train")
_ops = torch.ops.attenuation

__all__ = ["ChannelsLastBatchNorm2d", "convert_batch_norms", "NATIVE"]


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


if NATIVE:
    @torch.library.register_fake("attenuation::batch_norm_train")
    def _(x, weight, bias, eps):
        stats = x.new_empty((x.shape[1],), dtype=_stats_dtype(x))
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake("attenuation::channel_affine")
    def _(x, scale, shift):
        return torch.empty_like(x)

    @torch.library.register_fake("attenuation::batch_norm_backward")
    def _(grad_out, x, weight, mean, var, eps, output_mask):
        empty = x.new_empty((0,))
        param = x.new_empty((x.shape[1],), dtype=weight.dtype if weight is not None else _stats_dtype(x))
        return (torch.empty_like(x) if output_mask[0] else empty, param if output_mask[1] else empty,
                torch.empty_like(param) if output_mask[2] else empty)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None

    def _backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1] and ctx.has_weight, need[2] and ctx.has_bias]
        if grad_out is None or not any(mask):
            return None, None, None, None
        grads = _ops.batch_norm_backward(grad_out, x, weight, mean, var, ctx.eps, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,)

    torch.library.register_autograd("attenuation::batch_norm_train", _backward, setup_context=_setup_context)


class ChannelsLastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that runs channels-last CPU activations through the native ops (see the
    module docstring); the same module otherwise, down to its state_dict."""

    def forward(self, x: Tensor) -> Tensor:
        training = self.training or self.running_mean is None
        if not self._native_applies(x, training):
            return super().forward(x)
        self._check_input_dim(x)
        if training:
            out, mean, var = _ops.batch_norm_train(x, self.weight, self.bias, float(self.eps))
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, x.numel() // x.shape[1])
            return out
        invstd = torch.rsqrt(self.running_var + self.eps)
        scale = invstd if self.weight is None else self.weight * invstd
        shift = -self.running_mean * scale if self.bias is None else self.bias - self.running_mean * scale
        return _ops.channel_affine(x, scale, shift)

    def _native_applies(self, x: Tensor, training: bool) -> bool:
        if not (NATIVE and native_input(x) and x.shape[1] == self.num_features):
            return False
        if training:
            return x.numel() // x.shape[1] > 1  # else nn.BatchNorm2d's own error
        return not (torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in (self.weight, self.bias) if p is not None)))

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        """nn.BatchNorm2d's update: an exponential average with ``momentum`` (a cumulative one when
        it is None) of the batch mean and the unbiased batch variance."""
        momentum = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), momentum)


def convert_batch_norms(model: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` of ``model`` (exactly that class) for a
    :class:`ChannelsLastBatchNorm2d` in place, keeping the very same Parameters and buffers (an
    optimizer's references stay valid). Returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, _converted(child))
    return model


def _converted(bn: nn.BatchNorm2d) -> ChannelsLastBatchNorm2d:
    new = ChannelsLastBatchNorm2d.__new__(ChannelsLastBatchNorm2d)
    new.__dict__.update(bn.__dict__)  # the same parameters, buffers, hooks and flags
    new._parameters, new._buffers = dict(bn._parameters), dict(bn._buffers)
    new._modules = dict(bn._modules)
    return new

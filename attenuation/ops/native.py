"""The native backend: the ops of ``attenuation._C`` (C++ in csrc/, CUDA when it was compiled in).

The extension defines the operator schemas (``torch.ops.attenuation.*``) and their CPU / CUDA
kernels; this module adds what pytorch/extension-cpp adds from Python: fake (meta) kernels for
torch.compile and the autograd formula of ``masked_conv2d``, and it exposes the five backend
functions with the reference's signatures. Importing it raises ImportError when the extension was
not built (see :func:`attenuation.ops.backends.register_native_backend`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format
from torch.nn.modules.utils import _pair

from attenuation import _C  # noqa: F401  (loading it registers the ops)

from . import reference
from .fallback import warn_reference_fallback
from .slots import flat_vectors

_ops = torch.ops.attenuation


def has_kernel(device_type: str) -> bool:
    """Was the extension compiled with kernels for ``device_type`` ("cpu" / "cuda")?"""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("attenuation::filter_norms", key)


# ------------------------------------------------------------------------------ fake kernels

@torch.library.register_fake("attenuation::filter_norms")
def _(weights, ord):
    return weights[0].new_empty((sum(w.shape[0] for w in weights),), dtype=torch.float32)


@torch.library.register_fake("attenuation::select_weak")
def _(scores, removed, counts, ks):
    return torch.empty_like(removed)


@torch.library.register_fake("attenuation::attenuate_")
def _(weights, vectors, slots, weak, status, multiplier, factor, eps, restore):
    return torch.empty_like(weak), torch.empty_like(weak)


@torch.library.register_fake("attenuation::zero_removed_")
def _(weights, vectors, slots, status):
    return None


def _output_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The library convolution's choice, which every output of the op follows (output_format in
    csrc/masked_conv2d.cpp): channels-last when the input or the weight is."""
    channels_last = any(suggest_memory_format(t) == torch.channels_last for t in (x, weight))
    return torch.channels_last if channels_last else torch.contiguous_format


def _weight_format(weight: Tensor) -> torch.memory_format:
    return _output_format(weight, weight)


@torch.library.register_fake("attenuation::masked_conv2d")
def _(x, weight, bias, out_index, in_index, scale, stride, padding, dilation):
    size = reference._output_size(x, weight, stride, padding, dilation)
    y = x.new_empty((x.shape[0], weight.shape[0], *size)).contiguous(memory_format=_output_format(x, weight))
    if in_index is None:
        return y, x.new_empty((0,))
    live = x.new_empty((x.shape[0], in_index.shape[0], *x.shape[2:]))
    return y, live.contiguous(memory_format=suggest_memory_format(x))


@torch.library.register_fake("attenuation::masked_conv2d_backward")
def _(grad_out, x_live, weight, out_index, in_index, scale, stride, padding, dilation, output_mask):
    x = x_live
    empty = x.new_empty((0,))
    x_size = (x.shape[0], weight.shape[1], *x.shape[2:])
    grad_x = x.new_empty(x_size).contiguous(memory_format=_output_format(x, weight)) if output_mask[0] else empty
    grad_w = torch.empty_like(weight, memory_format=_weight_format(weight)) if output_mask[1] else empty
    grad_b = x.new_empty((weight.shape[0],)) if output_mask[2] else empty
    grad_s = scale.new_empty((weight.shape[0],)) if output_mask[3] else empty
    return grad_x, grad_w, grad_b, grad_s


# ------------------------------------------------------------------ autograd of masked_conv2d

def _setup_context(ctx, inputs, output):
    x, weight, bias, out_index, in_index, scale, stride, padding, dilation = inputs
    x_live = output[1] if in_index is not None else x
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x_live, weight, out_index, in_index, scale)
    ctx.geometry = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad, _grad_x_live):
    x_live, weight, out_index, in_index, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has_bias, need[5] and scale is not None]
    if not any(mask):
        return (None,) * 9
    grads = _ops.masked_conv2d_backward(grad, x_live, weight, out_index, in_index, scale, *ctx.geometry, mask)
    gx, gw, gb, gs = (g if wanted else None for g, wanted in zip(grads, mask))
    return gx, gw, gb, None, None, gs, None, None, None


torch.library.register_autograd("attenuation::masked_conv2d", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------ backend functions

def filter_norms(weights: Sequence[Tensor], ord: str) -> Tensor:
    return _ops.filter_norms([w.detach() for w in weights], ord)


def select_weak(scores: Tensor, removed: Tensor, counts: Sequence[int], ks: Tensor) -> Tensor:
    return _ops.select_weak(scores.float(), removed, [int(c) for c in counts], ks.to(torch.int64))


def attenuate_(weights, biases, gammas, betas, weak: Tensor, status: Tensor, multiplier: Tensor,
               factor: float, eps: float, restore: bool = False, running_means=None,
               running_vars=None) -> tuple[Tensor, Tensor]:
    no_stats = [None] * len(weights)
    vectors, slots = flat_vectors(biases, gammas, betas, running_means or no_stats, running_vars or no_stats)
    return _ops.attenuate_([w.detach() for w in weights], vectors, slots, weak, status, multiplier,
                           float(factor), float(eps), bool(restore))


def zero_removed_(weights, biases, gammas, betas, status: Tensor) -> None:
    vectors, slots = flat_vectors(biases, gammas, betas)
    _ops.zero_removed_([w.detach() for w in weights], vectors, slots, status)


# At or above this fraction of the dense MACs, the CPU runs the library's dense convolution on
# weights whose dead rows and columns are zeroed (the same result) instead of the compact problem:
# there the gathers and scatters of whole activations cost more than the skipped MACs save. The
# value is the break-even of a VGG-16 x0.25 training step at batch 256 on the 2-core CPU (0.3 was
# best at 0%, 35%, 50% and 75% of the filters removed). On CUDA the compact problem always runs
# (untuned: no GPU has measured it).
DENSE_FROM_MAC_FRACTION = {"cpu": 0.3}


def _unsupported(x: Tensor, weight: Tensor, padding, groups: int) -> Optional[str]:
    if groups != 1:
        return f"groups={groups}"
    if isinstance(padding, str):
        return f"padding={padding!r}"
    if not x.is_floating_point() or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {x.dtype}"
    return None


# The dtypes autocast casts for a convolution (float64 stays float64).
_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_index: Optional[Tensor],
                  in_index: Optional[Tensor], scale: Optional[Tensor], stride, padding, dilation,
                  groups: int = 1) -> Tensor:
    """``attenuation::masked_conv2d`` (see csrc/masked_conv2d.cpp). Under autocast the floating
    operands are cast to the autocast dtype first, as F.conv2d would; cases the op does not cover
    (groups != 1, string padding) run the reference, with a warning once per process."""
    why = _unsupported(x, weight, padding, groups)
    if why is not None:
        warn_reference_fallback("native", "masked_conv2d", why)
        return reference.masked_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding,
                                       dilation, groups)
    # A list naming every channel is the identity (the op requires strictly increasing lists): pass
    # None, so that nothing is gathered. A decision on shapes only: no host read, compile-friendly.
    if out_index is not None and out_index.numel() == weight.shape[0]:
        out_index = None
    if in_index is not None and in_index.numel() == weight.shape[1]:
        in_index = None
    live_out = weight.shape[0] if out_index is None else out_index.numel()
    live_in = weight.shape[1] if in_index is None else in_index.numel()
    dense_from = DENSE_FROM_MAC_FRACTION.get(x.device.type, 1.0)
    if (out_index is not None or in_index is not None) and live_out * live_in >= dense_from * weight.shape[0] * weight.shape[1]:
        return reference.masked_dense_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding, dilation)
    if torch.is_autocast_enabled(x.device.type) and x.dtype in _AUTOCAST_CASTS:
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _ops.masked_conv2d(x, weight, bias, out_index, in_index, scale, list(_pair(stride)),
                              list(_pair(padding)), list(_pair(dilation)))[0]

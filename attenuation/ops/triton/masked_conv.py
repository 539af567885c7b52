"""The masked convolution on the triton backend: the kernels' launchers (attenuation_triton's
``masked_conv2d``) as two torch custom ops with fake implementations and an autograd formula,
under autocast and with a fallback to the reference for the calls the kernels do not cover.

``attenuation_triton::masked_conv2d`` is the forward (autograd registered on it) and
``attenuation_triton::masked_conv2d_backward`` the grad-input / grad-weight pair, fed the upstream
gradient already multiplied by the scale. Grad bias and grad scale are torch reductions in the
backward formula (grad scale recomputes the unscaled convolution with the forward op). As in the
reference's autograd, no convolution happens when no channel is live on one side, and then the
input and weight get no gradient (None), not zeros. float32 is multiplied in TF32 when PyTorch
lets cuDNN convolutions use it (``torch.backends.cudnn.allow_tf32``, on by default), so that the
kernels compute what the convolution they replace computes.
"""
from __future__ import annotations

from typing import Optional

import torch
from attenuation_triton import masked_conv2d as launchers
from attenuation_triton.runtime import TL_DTYPES
from torch import Tensor
from torch.nn.modules.utils import _pair

from .. import reference
from ..fallback import warn_reference_fallback
from .device import check_device, launch_context


def _new4(like: Tensor, shape, channels_last: bool) -> Tensor:
    t = like.new_empty(shape)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@torch.library.custom_op("attenuation_triton::masked_conv2d", mutates_args=())
def masked_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                     out_index: Optional[Tensor], in_index: Optional[Tensor], stride: list[int],
                     padding: list[int], dilation: list[int]) -> Tensor:
    return launchers.conv_forward(x, weight, bias, scale, out_index, in_index, tuple(stride), tuple(padding),
                                  tuple(dilation), tf32=torch.backends.cudnn.allow_tf32)


@masked_conv2d_op.register_fake
def _(x, weight, bias, scale, out_index, in_index, stride, padding, dilation):
    size = launchers.output_size(x.shape, weight.shape, stride, padding, dilation)
    return _new4(x, (x.shape[0], weight.shape[0], *size), launchers.channels_last(x))


@torch.library.custom_op("attenuation_triton::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward_op(g: Tensor, x: Tensor, weight: Tensor, out_index: Optional[Tensor],
                              in_index: Optional[Tensor], stride: list[int], padding: list[int],
                              dilation: list[int], need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    """(grad input, grad weight) for g already multiplied by the scale; an empty tensor for one not
    needed."""
    conv = (tuple(stride), tuple(padding), tuple(dilation))
    tf32 = torch.backends.cudnn.allow_tf32
    dx = x.new_empty(0)
    if need_x:
        dx = launchers.conv_grad_input(g, weight, x.shape, launchers.channels_last(x), out_index, in_index, *conv,
                                       tf32=tf32)
    dw = weight.new_empty(0)
    if need_w:
        layout = weight.stride() if launchers.channels_last(weight) else None
        dw = launchers.conv_grad_weight(g, x, weight.shape, layout, out_index, in_index, *conv, tf32=tf32)
    return dx, dw


@masked_conv2d_backward_op.register_fake
def _(g, x, weight, out_index, in_index, stride, padding, dilation, need_x, need_w):
    dx = _new4(x, x.shape, launchers.channels_last(x)) if need_x else x.new_empty(0)
    dw = _new4(weight, weight.shape, launchers.channels_last(weight)) if need_w else weight.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, out_index, in_index, stride, padding, dilation = inputs
    ctx.conv = (stride, padding, dilation)
    ctx.save_for_backward(x, weight, bias, scale, out_index, in_index)


def _live_only(grad: Tensor, live: Optional[Tensor]) -> Tensor:
    """``grad`` with zeros in the dead output channels (``live``: None when every one is live)."""
    return grad if live is None else torch.where(live, grad, torch.zeros_like(grad))


def _backward(ctx, g):
    """Gradients as the reference's autograd gives them: grad-input in the live input channels
    only, grad-weight in the live (out, in) block only, none at all when no channel is live on
    one side (no convolution then), grad-bias and grad-scale the per-channel sums in the live
    output channels (zeros for the dead ones)."""
    x, weight, bias, scale, out_index, in_index = ctx.saved_tensors
    stride, padding, dilation = ctx.conv
    need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
    dx = dw = db = ds = None
    live = None
    if out_index is not None and (need_b or need_s):
        live = torch.zeros(weight.shape[0], dtype=torch.bool, device=g.device).index_fill(0, out_index, True)
    if any(i is not None and i.numel() == 0 for i in (out_index, in_index)):
        need_x = need_w = False     # no convolution at all: no gradient (None), as in the reference
    if need_x or need_w:
        gs = g if scale is None else g * scale.to(g.dtype).view(1, -1, 1, 1)
        dx, dw = masked_conv2d_backward_op(gs, x, weight, out_index, in_index, stride, padding,
                                           dilation, need_x, need_w)
        dx, dw = (dx if need_x else None), (dw if need_w else None)
    if need_b:
        db = _live_only(g.sum((0, 2, 3)), live).to(bias.dtype)
    if need_s:
        raw = masked_conv2d_op(x, weight, None, None, out_index, in_index, stride, padding, dilation)
        ds = _live_only((g * raw).sum((0, 2, 3)), live).to(scale.dtype)
    return dx, dw, db, ds, None, None, None, None, None


masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ backend function

def _unsupported(x, weight, bias, scale, stride, padding, dilation, groups) -> Optional[str]:
    """Why the kernels cannot run this call (None when they can): it then runs the reference."""
    if groups != 1:
        return "groups != 1"
    if x.dtype not in TL_DTYPES or weight.dtype != x.dtype:
        return f"input dtype {x.dtype} with weight dtype {weight.dtype}"
    for t in (bias, scale):
        if t is not None and (t.dtype not in TL_DTYPES or t.dim() != 1 or t.shape[0] != weight.shape[0]):
            return "a bias or scale that is not a float vector of one value per output channel"
    try:
        params = [_pair(v) for v in (stride, padding, dilation)]
    except TypeError:
        return f"padding {padding!r}"
    if any(len(p) != 2 or not all(isinstance(v, int) for v in p) for p in params):
        return f"stride {stride!r}, padding {padding!r}, dilation {dilation!r}"
    (sh, sw), (ph, pw), (dh, dw) = params
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        return "a non-positive stride or dilation, or a negative padding"
    if min(launchers.output_size(x.shape, weight.shape, *params)) <= 0:
        return "an empty output"
    return None


def _autocast_operand(t: Optional[Tensor], device_type: str) -> Optional[Tensor]:
    """What autocast gives a convolution: float16/bfloat16/float32 tensors in the autocast dtype
    (float64 and non-floating tensors stay as they are)."""
    if t is None or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return t
    return t.to(torch.get_autocast_dtype(device_type))


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_index: Optional[Tensor],
                  in_index: Optional[Tensor], scale: Optional[Tensor], stride, padding, dilation,
                  groups: int = 1) -> Tensor:
    """The reference's masked convolution on the Triton kernels (autograd-aware). Cases the kernels
    do not cover (groups != 1, other dtypes, string padding, ...) run the reference implementation,
    with a warning once per process. Under autocast the floating operands are cast to the autocast
    dtype first, as F.conv2d would cast them."""
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias, scale = (_autocast_operand(t, x.device.type) for t in (x, weight, bias, scale))
    why = _unsupported(x, weight, bias, scale, stride, padding, dilation, groups)
    if why is not None:
        warn_reference_fallback("triton", "masked_conv2d", why)
        return reference.masked_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding,
                                       dilation, groups)
    check_device(x.device)
    out_index, in_index, bias, scale = (None if t is None else t.contiguous()
                                        for t in (out_index, in_index, bias, scale))
    with launch_context(x.device):
        return masked_conv2d_op(x, weight, bias, scale, out_index, in_index, list(_pair(stride)),
                                list(_pair(padding)), list(_pair(dilation)))

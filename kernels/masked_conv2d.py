"""The masked convolution as Triton implicit-GEMM kernels: forward, grad-input, grad-weight.

Semantics: :func:`attenuation.ops.reference.masked_conv2d` (``groups == 1``). Only the live output
channels (``out_index``) are computed, only the live input channels (``in_index``) are read; the
index lists are read inside the kernels (no gathered copies of weights or activations). ``None``
index = all channels live (no list is read at all).

Forward (``masked_conv2d_fwd_kernel``): an implicit GEMM with M = N * H_out * W_out output
positions, N_gemm = live output channels, K = live input channels * KH * KW, looped as
``for (kh, kw): for block of live input channels`` so the padding / bounds masks are computed once
per filter tap. float32 accumulation (float64 for float64 inputs; float32 products in IEEE
precision, not TF32, so float32 results are close to the reference). The epilogue applies
``acc * scale[co] + bias[co]`` and stores in the input dtype. The programs of the second grid axis
beyond the live channels write zeros into the dead output channels (a list of them, computed on
the device without a host read), so every output element is written by the one launch.

Grad-input (``masked_conv2d_dx_kernel``): the transposed implicit GEMM, M = N * H * W input
positions, N_gemm = live input channels, K = live output channels * KH * KW; a tap contributes
where ``ih + pad - kh * dil`` is a non-negative multiple of the stride within the output.
Dead input channels get zeros from extra programs, as in the forward.

Grad-weight (``masked_conv2d_dw_kernel``): per filter tap, a GEMM [live out] x [live in] with
K = N * H_out * W_out. K is long and the channel tiles are few on early layers (64 x 64 channels:
nine programs), so K is split (split-K, third grid axis = tap x split) into enough parts to fill the
device; each part stores its partial sum into its own float32 slice and the host adds the slices
(deterministic, no atomics). Only the live (out, in) block is written; the host zero-fills the
result first when some channel is dead.

Registration: two torch.library custom ops with fake implementations,
``attenuation_triton::masked_conv2d`` (autograd registered on it) and
``attenuation_triton::masked_conv2d_backward`` (grad input, grad weight; fed the upstream gradient
already multiplied by the scale). Grad bias / grad scale are torch reductions in the backward
formula (grad scale recomputes the unscaled convolution with the forward kernel). As in the
reference's autograd, no convolution happens when no channel is live on one side, and then the
input and weight get no gradient (None), not zeros.

All tensors are addressed through their strides (NCHW, channels-last or any other strided layout);
offsets are computed in int64.

Precision: float32 inputs are multiplied in TF32 when PyTorch lets cuDNN convolutions use it
(``torch.backends.cudnn.allow_tf32``, on by default), so that the kernels compute what the
convolution they replace computes; in IEEE float32 otherwise, and always under the interpreter.

Block sizes: on a GPU each kernel's tile sizes are tuned at run time per problem-size bucket
(:mod:`.tuning`) among configurations chosen for Hopper (H100/H200) that also run elsewhere; under
the interpreter, and when ``TUNING["autotune"]`` is off (the tests shrink the blocks so that tiny
shapes cross block boundaries), the fixed sizes of ``TUNING`` are used.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .tuning import Config, Tuner, bucket

# Fixed tiles (interpreter, tests) and the switches: "autotune" (None: on, except under the
# interpreter, where timing means nothing), "dw_split" (a forced split-K count; None: chosen from the
# device's multiprocessor count).
TUNING = {"block_m": 64, "block_n": 32, "block_k": 32, "num_warps": 4, "autotune": None,
          "dw_split": None}

# Candidates for the forward and grad-input GEMMs (M = positions, N = live channels, K = channels
# per filter tap): the usual Hopper tiles of Triton's GEMM tutorials, plus small ones for pruned
# layers with few live channels.
CONV_CONFIGS = [Config(128, 128, 32, 8, 3), Config(128, 128, 64, 8, 3), Config(128, 64, 32, 4, 4),
                Config(64, 128, 32, 4, 4), Config(128, 256, 32, 8, 3), Config(256, 64, 32, 8, 3),
                Config(64, 64, 32, 4, 4), Config(64, 32, 32, 4, 4)]
# Grad-weight: M = live output channels, N = live input channels, K = output positions (long).
GRAD_WEIGHT_CONFIGS = [Config(64, 64, 64, 4, 3), Config(128, 64, 64, 8, 3), Config(64, 128, 64, 8, 3),
                       Config(128, 128, 32, 8, 3), Config(32, 64, 128, 4, 3), Config(32, 32, 128, 4, 3)]
_TUNERS = {"forward": Tuner(CONV_CONFIGS), "grad_input": Tuner(CONV_CONFIGS),
           "grad_weight": Tuner(GRAD_WEIGHT_CONFIGS)}
# Split-K aims at this many programs per multiprocessor, each part keeping at least this many positions.
_DW_PROGRAMS_PER_SM = 2
_DW_MIN_SPLIT_LEN = 2048

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _dot(a, b, acc, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bfloat16 tiles wrongly: it gets float32 ones
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ACC_DTYPE == tl.float64:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _channels(index_ptr, offs, mask, ALL: tl.constexpr):
    """The channel numbers of live positions ``offs``: ``offs`` itself when every channel is live,
    else read from the index list."""
    channels = offs.to(tl.int64)
    if not ALL:
        channels = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int64)
    return channels


@triton.jit
def _split_positions(offs, H, W):
    """Flat (batch, row, column) positions of an H x W map into their three coordinates."""
    nb = offs // (H * W)
    rem = offs % (H * W)
    return nb, rem // W, rem % W


@triton.jit
def masked_conv2d_fwd_kernel(
        x_ptr, w_ptr, y_ptr, scale_ptr, bias_ptr, out_idx_ptr, dead_idx_ptr, in_idx_ptr,
        N, H, W, HO, WO, n_live_out, n_dead_out, n_live_in,
        sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, ALL_OUT: tl.constexpr, ALL_IN: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * HO * WO
    nb, oh, ow = _split_positions(offs_m, HO, WO)
    y_row = nb.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    n_live_blocks = tl.cdiv(n_live_out, BLOCK_N)
    if pid_n < n_live_blocks:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_live_out
        co = _channels(out_idx_ptr, offs_n, n_mask, ALL_OUT)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        x_base = nb.to(tl.int64) * sxn
        for r in range(KH * KW):
            kh = r // KW
            kw = r % KW
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tap = x_base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = co * swo + kh * swh + kw * sww
            for c0 in range(0, n_live_in, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < n_live_in
                ci = _channels(in_idx_ptr, offs_k, k_mask, ALL_IN)
                a = tl.load(x_ptr + x_tap[:, None] + ci[None, :] * sxc,
                            mask=ok[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(w_ptr + w_tap[None, :] + ci[:, None] * swi,
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = _dot(a, b, acc, ACC_DTYPE, UPCAST, PRECISION)
        if HAS_SCALE:
            s = tl.load(scale_ptr + co, mask=n_mask, other=0.0).to(ACC_DTYPE)
            acc = acc * s[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + co, mask=n_mask, other=0.0).to(ACC_DTYPE)
            acc = acc + bias[None, :]
        tl.store(y_ptr + y_row[:, None] + co[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        offs_n = (pid_n - n_live_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_dead_out
        co = tl.load(dead_idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
        tl.store(y_ptr + y_row[:, None] + co[None, :] * syc, zero, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def masked_conv2d_dx_kernel(
        g_ptr, w_ptr, dx_ptr, out_idx_ptr, in_idx_ptr, dead_idx_ptr,
        N, H, W, HO, WO, n_live_out, n_live_in, n_dead_in,
        sgn, sgc, sgh, sgw, swo, swi, swh, sww, sdn, sdc, sdh, sdw,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, ALL_OUT: tl.constexpr, ALL_IN: tl.constexpr,
        ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * H * W
    nb, ih, iw = _split_positions(offs_m, H, W)
    d_row = nb.to(tl.int64) * sdn + ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw
    n_live_blocks = tl.cdiv(n_live_in, BLOCK_N)
    if pid_n < n_live_blocks:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_live_in
        ci = _channels(in_idx_ptr, offs_n, n_mask, ALL_IN)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        g_base = nb.to(tl.int64) * sgn
        for r in range(KH * KW):
            kh = r // KW
            kw = r % KW
            th = ih + pad_h - kh * dil_h
            tw = iw + pad_w - kw * dil_w
            th_ok = th >= 0
            tw_ok = tw >= 0
            th = tl.where(th_ok, th, 0)
            tw = tl.where(tw_ok, tw, 0)
            oh = th // stride_h
            ow = tw // stride_w
            ok = (m_mask & th_ok & tw_ok & (oh * stride_h == th) & (ow * stride_w == tw)
                  & (oh < HO) & (ow < WO))
            g_tap = g_base + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
            w_tap = ci * swi + kh * swh + kw * sww
            for c0 in range(0, n_live_out, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < n_live_out
                co = _channels(out_idx_ptr, offs_k, k_mask, ALL_OUT)
                a = tl.load(g_ptr + g_tap[:, None] + co[None, :] * sgc,
                            mask=ok[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(w_ptr + w_tap[None, :] + co[:, None] * swo,
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = _dot(a, b, acc, ACC_DTYPE, UPCAST, PRECISION)
        tl.store(dx_ptr + d_row[:, None] + ci[None, :] * sdc, acc.to(dx_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])
    else:
        offs_n = (pid_n - n_live_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_dead_in
        ci = tl.load(dead_idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + d_row[:, None] + ci[None, :] * sdc, zero, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def masked_conv2d_dw_kernel(
        g_ptr, x_ptr, dw_ptr, out_idx_ptr, in_idx_ptr,
        N, H, W, HO, WO, n_live_out, n_live_in, n_splits, split_len,
        sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, swo, swi, swh, sww, s_split,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KW: tl.constexpr, ALL_OUT: tl.constexpr, ALL_IN: tl.constexpr, ACC_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tap = tl.program_id(2) // n_splits
    split = tl.program_id(2) % n_splits
    kh = tap // KW
    kw = tap % KW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_live_out
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_live_in
    co = _channels(out_idx_ptr, offs_m, m_mask, ALL_OUT)
    ci = _channels(in_idx_ptr, offs_n, n_mask, ALL_IN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    p_start = split * split_len
    p_end = tl.minimum(p_start + split_len, N * HO * WO)
    for p0 in range(p_start, p_end, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        p_mask = offs_p < p_end
        nb = offs_p // (HO * WO)
        rem = offs_p % (HO * WO)
        oh = rem // WO
        ow = rem % WO
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        g_pos = nb.to(tl.int64) * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        x_pos = nb.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(g_ptr + co[:, None] * sgc + g_pos[None, :], mask=m_mask[:, None] & p_mask[None, :],
                    other=0.0)
        b = tl.load(x_ptr + x_pos[:, None] + ci[None, :] * sxc, mask=ok[:, None] & n_mask[None, :],
                    other=0.0)
        acc = _dot(a, b, acc, ACC_DTYPE, UPCAST, PRECISION)
    tl.store(dw_ptr + split.to(tl.int64) * s_split + co[:, None] * swo + ci[None, :] * swi + kh * swh
             + kw * sww, acc.to(dw_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------------------------- host side

INTERPRET = not isinstance(masked_conv2d_fwd_kernel, triton.runtime.jit.JITFunction)
"""True under Triton's interpreter (TRITON_INTERPRET=1 when the kernels were decorated)."""


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every fresh output (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _alloc4(shape, dtype, device, channels_last: bool) -> torch.Tensor:
    n, c, h, w = shape
    if channels_last:
        return _empty((n, h, w, c), dtype, device).permute(0, 3, 1, 2)
    return _empty((n, c, h, w), dtype, device)


def unsupported(x, weight, bias, scale, stride, padding, dilation, groups):
    """Why the kernels cannot run this call (None when they can): the caller falls back."""
    if groups != 1:
        return "groups != 1"
    if x.dtype not in _TL_DTYPES or weight.dtype != x.dtype:
        return f"input dtype {x.dtype} with weight dtype {weight.dtype}"
    for t in (bias, scale):
        if t is not None and (t.dtype not in _TL_DTYPES or t.dim() != 1 or t.shape[0] != weight.shape[0]):
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
    ho = (x.shape[2] + 2 * ph - dh * (weight.shape[2] - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (weight.shape[3] - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        return "an empty output"
    return None


def _dead_index(index, n, device):
    """The complement of ``index`` in range(n), on the device without a host read (its length is
    known from the shapes: n - index.numel(), indices assumed distinct, as the reference's
    index_copy needs)."""
    live = torch.zeros(n, dtype=torch.uint8, device=device).index_fill_(0, index, 1)
    return torch.argsort(live, stable=True)[:n - index.numel()]


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _upcast(dtype) -> bool:
    """bfloat16 tiles are multiplied as float32 under the interpreter only (compiled: bfloat16 MMA)."""
    return dtype == torch.bfloat16 and INTERPRET


def _precision(dtype) -> str:
    """tl.dot's input precision for float32 tiles: what cuDNN may use for the same convolution."""
    return "tf32" if dtype == torch.float32 and not INTERPRET and torch.backends.cudnn.allow_tf32 else "ieee"


def _launch(kind: str, key: tuple, launch, gemm_m: int, gemm_n: int) -> None:
    """``launch(config)`` with the tuned configuration for ``key`` (GPU) or the fixed one of TUNING.
    Tiles more than twice the GEMM's M or N bucket (key holds both) are not tried: they compute
    padding, and each costs a compilation and a timing."""
    autotune = TUNING.get("autotune")
    if autotune or (autotune is None and not INTERPRET):
        m, n = max(32, bucket(gemm_m)), max(32, bucket(gemm_n))
        _TUNERS[kind].launch(key, launch, fits=lambda c: c.block_m <= m and c.block_n <= n)
        return
    bm, bn, bk, warps = TUNING["block_m"], TUNING["block_n"], TUNING["block_k"], TUNING["num_warps"]
    # grad-weight: channel tiles of block_n on both sides, positions (K) by block_m
    launch(Config(bn, bn, bm, warps) if kind == "grad_weight" else Config(bm, bn, bk, warps))


def _grad_weight_splits(tiles: int, positions: int, device: torch.device) -> int:
    """Split-K count of the grad-weight GEMM: enough programs for every multiprocessor."""
    if TUNING.get("dw_split"):
        return max(1, min(int(TUNING["dw_split"]), positions))
    if device.type != "cuda" or tiles == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(_DW_PROGRAMS_PER_SM * sms, tiles)
    return max(1, min(wanted, positions // _DW_MIN_SPLIT_LEN))


def _tune_key(x, weight, stride, padding, dilation, all_out, all_in, *sizes):
    """What a tuned configuration depends on: dtype, layout, filter geometry, and size buckets."""
    return (x.dtype, _channels_last(x), tuple(weight.shape[2:]), stride, dilation, padding == (0, 0),
            all_out, all_in, *(bucket(n) for n in sizes))


def conv_forward(x, weight, bias, scale, out_index, in_index, stride, padding, dilation):
    """y = masked conv (live channels only) * scale + bias, zeros in the dead output channels."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, _, h, w = x.shape
    n_out, n_in, kh, kw = weight.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = _alloc4((n, n_out, ho, wo), x.dtype, x.device, _channels_last(x))
    live_out = n_out if out_index is None else out_index.numel()
    live_in = n_in if in_index is None else in_index.numel()
    dead = None if out_index is None else _dead_index(out_index, n_out, x.device)
    n_dead = 0 if dead is None else dead.numel()
    m = n * ho * wo
    if m == 0 or live_out + n_dead == 0:
        return y
    dummy = x

    def launch(c: Config):
        grid = (triton.cdiv(m, c.block_m), triton.cdiv(live_out, c.block_n) + triton.cdiv(n_dead, c.block_n))
        masked_conv2d_fwd_kernel[grid](
            x, weight, y, dummy if scale is None else scale, dummy if bias is None else bias,
            dummy if out_index is None else out_index, dummy if dead is None else dead,
            dummy if in_index is None else in_index,
            n, h, w, ho, wo, live_out, n_dead, live_in,
            *x.stride(), *weight.stride(), *y.stride(), sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, ALL_OUT=out_index is None, ALL_IN=in_index is None,
            HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACC_DTYPE=_acc(x.dtype),
            UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), **c.launch_args())
    _launch("forward", _tune_key(x, weight, stride, padding, dilation, out_index is None, in_index is None,
                                 m, live_out, live_in), launch, m, live_out)
    return y


def conv_grad_input(g, weight, x_shape, x_channels_last, out_index, in_index, stride, padding, dilation):
    """dL/dx for the live input channels (zeros in the dead ones); g already multiplied by scale."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, _, h, w = x_shape
    n_out, n_in, kh, kw = weight.shape
    ho, wo = g.shape[2], g.shape[3]
    dx = _alloc4((n, n_in, h, w), g.dtype, g.device, x_channels_last)
    live_out = n_out if out_index is None else out_index.numel()
    live_in = n_in if in_index is None else in_index.numel()
    dead = None if in_index is None else _dead_index(in_index, n_in, g.device)
    n_dead = 0 if dead is None else dead.numel()
    m = n * h * w
    if m == 0 or live_in + n_dead == 0:
        return dx
    dummy = g

    def launch(c: Config):
        grid = (triton.cdiv(m, c.block_m), triton.cdiv(live_in, c.block_n) + triton.cdiv(n_dead, c.block_n))
        masked_conv2d_dx_kernel[grid](
            g, weight, dx, dummy if out_index is None else out_index, dummy if in_index is None else in_index,
            dummy if dead is None else dead,
            n, h, w, ho, wo, live_out, live_in, n_dead,
            *g.stride(), *weight.stride(), *dx.stride(), sh, sw, ph, pw, dh, dw,
            KH=kh, KW=kw, ALL_OUT=out_index is None, ALL_IN=in_index is None, ACC_DTYPE=_acc(g.dtype),
            UPCAST=_upcast(g.dtype), PRECISION=_precision(g.dtype), **c.launch_args())
    _launch("grad_input", _tune_key(g, weight, stride, padding, dilation, out_index is None, in_index is None,
                                    m, live_in, live_out), launch, m, live_in)
    return dx


def conv_grad_weight(g, x, weight_shape, weight_layout, out_index, in_index, stride, padding, dilation):
    """dL/dweight for the live (out, in) block (zeros elsewhere); g already multiplied by scale."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, _, h, w = x.shape
    n_out, n_in, kh, kw = weight_shape
    ho, wo = g.shape[2], g.shape[3]
    dwt = torch.empty_strided(weight_shape, weight_layout, dtype=x.dtype, device=x.device) \
        if weight_layout is not None else _empty(weight_shape, x.dtype, x.device)
    live_out = n_out if out_index is None else out_index.numel()
    live_in = n_in if in_index is None else in_index.numel()
    some_dead = live_out < n_out or live_in < n_in
    positions = n * ho * wo
    if live_out == 0 or live_in == 0 or positions == 0:
        return dwt.zero_()
    splits = _grad_weight_splits(triton.cdiv(live_out, 64) * triton.cdiv(live_in, 64) * kh * kw, positions,
                                 x.device)
    if splits == 1:
        target, split_stride = (dwt.zero_() if some_dead else dwt), 0
    else:       # one partial sum per split, in the accumulation dtype, added up below
        target = _empty((splits, *weight_shape), torch.float64 if x.dtype == torch.float64 else torch.float32,
                        x.device)
        if some_dead:
            target.zero_()
        split_stride = target.stride(0)
    split_len = triton.cdiv(positions, splits)
    dummy = g

    def launch(c: Config):
        grid = (triton.cdiv(live_out, c.block_m), triton.cdiv(live_in, c.block_n), kh * kw * splits)
        masked_conv2d_dw_kernel[grid](
            g, x, target, dummy if out_index is None else out_index, dummy if in_index is None else in_index,
            n, h, w, ho, wo, live_out, live_in, splits, split_len,
            *g.stride(), *x.stride(), *target.stride()[-4:], split_stride, sh, sw, ph, pw, dh, dw,
            KW=kw, ALL_OUT=out_index is None, ALL_IN=in_index is None, ACC_DTYPE=_acc(x.dtype),
            UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype), **c.launch_args())
    _launch("grad_weight", _tune_key(x, dwt, stride, padding, dilation, out_index is None, in_index is None,
                                     live_out, live_in, positions, splits), launch, live_out, live_in)
    if splits > 1:
        dwt.copy_(target.sum(0))
    return dwt


# ------------------------------------------------------------------ torch.library registration
# Two custom ops (opaque to torch.compile, with fake implementations for tracing): the forward, and
# the grad-input / grad-weight pair. Autograd is registered on the forward; the bias and scale
# gradients are plain torch reductions in the backward formula.

def _out_shape_and_layout(x, weight, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (x.shape[2] + 2 * ph - dh * (weight.shape[2] - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (weight.shape[3] - 1) - 1) // sw + 1
    return (x.shape[0], weight.shape[0], ho, wo), _channels_last(x)


def _new4(like, shape, channels_last):
    t = like.new_empty(shape)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@torch.library.custom_op("attenuation_triton::masked_conv2d", mutates_args=())
def masked_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     scale: Optional[torch.Tensor], out_index: Optional[torch.Tensor],
                     in_index: Optional[torch.Tensor], stride: list[int], padding: list[int],
                     dilation: list[int]) -> torch.Tensor:
    return conv_forward(x, weight, bias, scale, out_index, in_index, tuple(stride), tuple(padding),
                        tuple(dilation))


@masked_conv2d_op.register_fake
def _(x, weight, bias, scale, out_index, in_index, stride, padding, dilation):
    shape, channels_last = _out_shape_and_layout(x, weight, stride, padding, dilation)
    return _new4(x, shape, channels_last)


@torch.library.custom_op("attenuation_triton::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward_op(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              out_index: Optional[torch.Tensor], in_index: Optional[torch.Tensor],
                              stride: list[int], padding: list[int], dilation: list[int],
                              need_x: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad input, grad weight) for g already multiplied by the scale; an empty tensor for one not
    needed."""
    conv = (tuple(stride), tuple(padding), tuple(dilation))
    dx = conv_grad_input(g, weight, x.shape, _channels_last(x), out_index, in_index, *conv) \
        if need_x else x.new_empty(0)
    if need_w:
        layout = weight.stride() if _channels_last(weight) else None
        dw = conv_grad_weight(g, x, weight.shape, layout, out_index, in_index, *conv)
    else:
        dw = weight.new_empty(0)
    return dx, dw


@masked_conv2d_backward_op.register_fake
def _(g, x, weight, out_index, in_index, stride, padding, dilation, need_x, need_w):
    dx = _new4(x, x.shape, _channels_last(x)) if need_x else x.new_empty(0)
    dw = _new4(weight, weight.shape, _channels_last(weight)) if need_w else weight.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, out_index, in_index, stride, padding, dilation = inputs
    ctx.conv = (stride, padding, dilation)
    ctx.save_for_backward(x, weight, bias, scale, out_index, in_index)


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
        live = torch.zeros(weight.shape[0], dtype=torch.bool, device=g.device)
        live = live.index_fill(0, out_index, True)
    if any(i is not None and i.numel() == 0 for i in (out_index, in_index)):
        need_x = need_w = False     # no convolution at all: no gradient (None), as in the reference
    if need_x or need_w:
        gs = g if scale is None else g * scale.to(g.dtype).view(1, -1, 1, 1)
        dx, dw = masked_conv2d_backward_op(gs, x, weight, out_index, in_index, stride, padding,
                                           dilation, need_x, need_w)
        dx, dw = (dx if need_x else None), (dw if need_w else None)
    if need_b:
        db = g.sum((0, 2, 3))
        if live is not None:
            db = torch.where(live, db, torch.zeros_like(db))
        db = db.to(bias.dtype)
    if need_s:
        raw = masked_conv2d_op(x, weight, None, None, out_index, in_index, stride, padding, dilation)
        ds = (g * raw).sum((0, 2, 3))
        if live is not None:
            ds = torch.where(live, ds, torch.zeros_like(ds))
        ds = ds.to(scale.dtype)
    return dx, dw, db, ds, None, None, None, None, None


masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def masked_conv2d(x, weight, bias, out_index, in_index, scale, stride, padding, dilation):
    """The kernels' entry point (checked arguments, groups == 1): autograd-aware, a torch.library
    custom op (``torch.ops.attenuation_triton.masked_conv2d``)."""
    return masked_conv2d_op(x, weight, bias, scale, out_index, in_index, list(_pair(stride)),
                            list(_pair(padding)), list(_pair(dilation)))

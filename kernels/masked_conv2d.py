"""Launchers of the masked-convolution kernels (:mod:`.masked_conv2d_kernels`): forward, grad-input
and grad-weight, each taking tensors and plain values, choosing its tiles and allocating its output.

``out_index`` / ``in_index``: int64 lists of the live output / input channels, distinct (``None``:
every channel live); stride, padding and dilation: pairs of ints; ``groups == 1``; x, weight,
bias and scale in one of the kernels' dtypes (runtime.TL_DTYPES), on the device the kernels run
on. Outputs follow the input's layout (channels-last in, channels-last out).

Split-K grad weight: K (every output position) is long and the early layers have few channel
tiles (64 x 64 channels: nine programs), so K is cut into enough parts for two programs per
multiprocessor; each part stores its partial sum into its own float32 (float64) slice and the
launcher adds the slices (deterministic, no atomics). Without split-K, the result is zero-filled
first when some channel is dead.

Precision: with ``tf32`` float32 tiles are multiplied in TF32 (the caller passes what the
convolution it replaces may use); in IEEE float32 otherwise, and always under the interpreter.

Block sizes: on a GPU each kernel's tile sizes are tuned at run time per problem-size bucket
(:mod:`.tuning`) among configurations chosen for Hopper (H100/H200) that also run elsewhere; under
the interpreter, and when ``TUNING["autotune"]`` is off (the tests shrink the blocks so that tiny
shapes cross block boundaries), the fixed sizes of ``TUNING`` are used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .masked_conv2d_kernels import masked_conv2d_dw_kernel, masked_conv2d_dx_kernel, masked_conv2d_fwd_kernel
from .runtime import INTERPRET
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


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every fresh output (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def channels_last(t: torch.Tensor) -> bool:
    """Is ``t`` channels-last (and not also contiguous)? The outputs then are channels-last too."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def output_size(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int]:
    """(H_out, W_out) of the convolution."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return ((x_shape[2] + 2 * ph - dh * (weight_shape[2] - 1) - 1) // sh + 1,
            (x_shape[3] + 2 * pw - dw * (weight_shape[3] - 1) - 1) // sw + 1)


def _alloc4(shape, dtype, device, channels_last: bool) -> torch.Tensor:
    n, c, h, w = shape
    if channels_last:
        return _empty((n, h, w, c), dtype, device).permute(0, 3, 1, 2)
    return _empty((n, c, h, w), dtype, device)


def _dead_index(index, n, device):
    """The complement of ``index`` in range(n), on the device without a host read (its length is
    known from the shapes: n - index.numel(), the indices being distinct)."""
    live = torch.zeros(n, dtype=torch.uint8, device=device).index_fill_(0, index, 1)
    return torch.argsort(live, stable=True)[:n - index.numel()]


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _upcast(dtype) -> bool:
    """bfloat16 tiles are multiplied as float32 under the interpreter only (compiled: bfloat16 MMA)."""
    return dtype == torch.bfloat16 and INTERPRET


def _precision(dtype, tf32: bool) -> str:
    """tl.dot's input precision for float32 tiles (the interpreter has no TF32)."""
    return "tf32" if dtype == torch.float32 and tf32 and not INTERPRET else "ieee"


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
    return (x.dtype, channels_last(x), tuple(weight.shape[2:]), stride, dilation, padding == (0, 0),
            all_out, all_in, *(bucket(n) for n in sizes))


def conv_forward(x, weight, bias, scale, out_index, in_index, stride, padding, dilation, tf32: bool):
    """y = masked conv (live channels only) * scale + bias, zeros in the dead output channels."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, _, h, w = x.shape
    n_out, n_in, kh, kw = weight.shape
    ho, wo = output_size(x.shape, weight.shape, stride, padding, dilation)
    y = _alloc4((n, n_out, ho, wo), x.dtype, x.device, channels_last(x))
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
            UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype, tf32), **c.launch_args())
    _launch("forward", _tune_key(x, weight, stride, padding, dilation, out_index is None, in_index is None,
                                 m, live_out, live_in), launch, m, live_out)
    return y


def conv_grad_input(g, weight, x_shape, x_channels_last, out_index, in_index, stride, padding, dilation,
                    tf32: bool):
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
            UPCAST=_upcast(g.dtype), PRECISION=_precision(g.dtype, tf32), **c.launch_args())
    _launch("grad_input", _tune_key(g, weight, stride, padding, dilation, out_index is None, in_index is None,
                                    m, live_in, live_out), launch, m, live_in)
    return dx


def conv_grad_weight(g, x, weight_shape, weight_layout, out_index, in_index, stride, padding, dilation,
                     tf32: bool):
    """dL/dweight for the live (out, in) block (zeros elsewhere); g already multiplied by scale.
    ``weight_layout``: the strides the result takes (None: contiguous)."""
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
            UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype, tf32), **c.launch_args())
    _launch("grad_weight", _tune_key(x, dwt, stride, padding, dilation, out_index is None, in_index is None,
                                     live_out, live_in, positions, splits), launch, live_out, live_in)
    if splits > 1:
        dwt.copy_(target.sum(0))
    return dwt

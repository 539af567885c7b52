"""The masked convolution as three Triton implicit-GEMM kernels: forward, grad-input, grad-weight
(launched by :mod:`.masked_conv2d`).

Semantics: a convolution with ``groups == 1`` that computes only the live output channels
(``out_idx``) from only the live input channels (``in_idx``), the index lists read inside the
kernels (no gathered copies of weights or activations); ``ALL_OUT`` / ``ALL_IN``: every channel is
live and no list is read at all. Every tensor is addressed through its strides (NCHW,
channels-last or any other strided layout); offsets are computed in int64.

Forward (``masked_conv2d_fwd_kernel``): an implicit GEMM with M = N * H_out * W_out output
positions, N_gemm = live output channels, K = live input channels * KH * KW, looped as
``for (kh, kw): for block of live input channels`` so the padding / bounds masks are computed once
per filter tap. The epilogue applies ``acc * scale[co] + bias[co]`` and stores in the output's
dtype. The programs of the second grid axis beyond the live channels write zeros into the dead
output channels (``dead_idx``), so every output element is written by the one launch. Traffic:
it reads the live input channels once per tile of live output channels and per tap (across taps
mostly from cache) and the live (out, in) weight block once per tile of positions, and writes
N * C_out * H_out * W_out elements.

Grad-input (``masked_conv2d_dx_kernel``): the transposed implicit GEMM, M = N * H * W input
positions, N_gemm = live input channels, K = live output channels * KH * KW; a tap contributes
where ``ih + pad - kh * dil`` is a non-negative multiple of the stride within the output. Dead
input channels get zeros from extra programs, as in the forward.

Grad-weight (``masked_conv2d_dw_kernel``): per filter tap, a GEMM [live out] x [live in] with
K = N * H_out * W_out, split (split-K: the third grid axis is tap x split) into ``n_splits`` parts
of ``split_len`` positions, each stored into its own slice (``s_split`` apart) for the caller to add.
Only the live (out, in) block is written.

Accumulation in ``ACC_DTYPE`` (float32, float64 for float64 inputs); ``PRECISION`` is tl.dot's
input precision for float32 tiles ("ieee" or "tf32"); ``UPCAST`` multiplies bfloat16 tiles as
float32 (Triton's interpreter multiplies bfloat16 tiles wrongly).
"""
import triton
import triton.language as tl


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

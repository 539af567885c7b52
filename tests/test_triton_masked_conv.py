"""The Triton masked convolution (kernels/masked_conv2d_kernels.py, launched by kernels/masked_conv2d.py,
adapted by attenuation/ops/triton/masked_conv.py) against the reference backend.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). Block sizes are shrunk so that the tiny shapes cross
block boundaries (4 channels per block under the interpreter; 16, the tl.dot minimum, compiled), and
every fresh output of the kernels is poisoned with NaN so that an element no program writes is
caught. Every op is called through the facade with ``backend="triton"``.
"""
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from attenuation import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    """(backend package, the launchers' module, None) or (None, None, why the tests are skipped)."""
    try:
        import triton  # noqa: F401
    except Exception as error:
        return None, None, f"triton cannot be imported ({error}): no triton backend to test"
    if "triton" not in ops.available_backends():
        return None, None, "the triton backend is not registered"
    from attenuation.ops import triton as backend
    from attenuation_triton import masked_conv2d as launchers
    if not backend.INTERPRET and not torch.cuda.is_available():
        return None, None, "no GPU and TRITON_INTERPRET is not set: the kernels cannot run"
    return backend, launchers, None


B, MC, _SKIP = _load()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
DEVICE = torch.device("cpu" if B is None or B.INTERPRET else "cuda")


@pytest.fixture(autouse=True)
def _small_blocks_poisoned_outputs(monkeypatch):
    """Fixed small blocks (no tuning), IEEE float32 products (no TF32 on a GPU), poisoned outputs."""
    if B is None:
        return
    small = 4 if B.INTERPRET else 16
    monkeypatch.setattr(MC, "TUNING", dict(block_m=16, block_n=small, block_k=small, num_warps=4,
                                           autotune=False, dw_split=None))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    monkeypatch.setattr(MC, "_empty", poisoned)


def _index(n, kind, g):
    """None (all live), or a random live index list (increasing, as the facade requires): every
    channel, half, one, none."""
    if kind == "all":
        return None
    count = {"full": n, "half": n // 2, "one": 1, "none": 0}[kind]
    return torch.randperm(n, generator=g)[:count].sort().values.to(DEVICE)


def _problem(n_out, n_in, kernel, out_kind, in_kind, dtype=torch.float32, layout="nchw", seed=0,
             hw=(7, 6), batch=2):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)
    x = randn(batch, n_in, *hw)
    w = randn(n_out, n_in, *kernel)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":                      # a non-contiguous slice of a larger tensor
        x = randn(batch, n_in + 2, hw[0] + 1, 2 * hw[1])[:, 1:n_in + 1, 1:, ::2]
    b = randn(n_out)
    s = (torch.rand(n_out, generator=g) + 0.5).to(DEVICE)
    return x, w, b, s, _index(n_out, out_kind, g), _index(n_in, in_kind, g)


def _live_mask(index, n):
    mask = torch.ones(n, dtype=torch.bool, device=DEVICE)
    if index is not None:
        mask.zero_()[index] = True
    return mask


def _tolerance(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}[dtype]


def _check_forward(x, w, b, s, oi, ii, conv, dtype=torch.float32):
    got = ops.masked_conv2d(x, w, b, oi, ii, s, *conv, backend="triton")
    ref = ops.masked_conv2d(x.double(), w.double(), None if b is None else b.double(), oi, ii,
                            None if s is None else s.double(), *conv, backend="reference")
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert not got.isnan().any(), "an output element was not written"
    torch.testing.assert_close(got.double(), ref, **_tolerance(dtype))
    dead = ~_live_mask(oi, w.shape[0])
    assert torch.equal(got[:, dead], torch.zeros_like(got[:, dead])), "dead output channels not zero"
    return got


# ------------------------------------------------------------------------------------- forward

KINDS = ["all", "full", "half", "one", "none"]


@pytest.mark.parametrize("out_kind", KINDS)
@pytest.mark.parametrize("in_kind", KINDS)
def test_forward_live_fractions(out_kind, in_kind):
    x, w, b, s, oi, ii = _problem(9, 7, (3, 3), out_kind, in_kind)
    _check_forward(x, w, b, s, oi, ii, (1, 1, 1))


CONVS = [  # (kernel, stride, padding, dilation)
    ((3, 3), 1, 0, 1),
    ((3, 3), 1, 1, 1),
    ((3, 3), 2, 1, 1),
    ((3, 3), 1, 2, 2),
    ((3, 3), 2, 2, 2),
    ((1, 1), 2, 0, 1),
    ((2, 3), (2, 1), (1, 0), (1, 2)),
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("conv", CONVS, ids=str)
def test_forward_stride_padding_dilation_layouts(conv, layout):
    kernel, *params = conv
    x, w, b, s, oi, ii = _problem(7, 5, kernel, "half", "half", layout=layout, seed=1)
    got = _check_forward(x, w, b, s, oi, ii, params)
    if layout == "channels_last":    # the reference's (and F.conv2d's) output layout
        assert got.is_contiguous(memory_format=torch.channels_last)
    elif layout == "nchw":
        assert got.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kinds", [("all", "all"), ("half", "half"), ("one", "full"), ("none", "one")])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forward_dtypes(dtype, kinds, layout):
    x, w, b, s, oi, ii = _problem(9, 6, (3, 3), *kinds, dtype=dtype, layout=layout, seed=2)
    _check_forward(x, w, b, s.to(dtype), oi, ii, (2, 1, 1), dtype)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
def test_forward_without_bias_or_scale(with_bias, with_scale):
    x, w, b, s, oi, ii = _problem(5, 3, (3, 3), "half", "all", seed=3)
    _check_forward(x, w, b if with_bias else None, s if with_scale else None, oi, ii, (1, 1, 1))


def test_forward_crosses_the_position_blocks():
    x, w, b, s, oi, ii = _problem(6, 5, (3, 3), "half", "half", hw=(9, 11), batch=3, seed=4)
    _check_forward(x, w, b, s, oi, ii, (1, 1, 1))   # 297 positions: 19 blocks of 16, the last partial


def test_empty_batch():
    x, w, b, s, oi, ii = _problem(5, 3, (3, 3), "half", "half", batch=0)
    got = ops.masked_conv2d(x, w, b, oi, ii, s, 1, 1, 1, backend="triton")
    assert got.shape == (0, 5, 7, 6)


def test_unsupported_cases_fall_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops.fallback, "_warned_fallbacks", set())
    g = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((2, 4, 6, 6), (6, 2, 3, 3), (6,)))
    with pytest.warns(UserWarning, match="triton backend's masked_conv2d does not cover groups != 1"):
        got = ops.masked_conv2d(x, w, b, None, None, None, 1, 1, 1, groups=2, backend="triton")
    torch.testing.assert_close(got, ops.masked_conv2d(x, w, b, None, None, None, 1, 1, 1, groups=2,
                                                      backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.masked_conv2d(x, w, b, None, None, None, 1, "same", 1, groups=2, backend="triton")
    xw = torch.randn(2, 4, 6, 6, generator=g).to(DEVICE)
    ww = torch.randn(3, 4, 3, 3, generator=g).to(DEVICE)
    with warnings.catch_warnings():     # string padding: the reference path, still no second warning
        warnings.simplefilter("error")
        got = ops.masked_conv2d(xw, ww, None, None, None, None, 1, "same", 1, backend="triton")
    torch.testing.assert_close(got, ops.masked_conv2d(xw, ww, None, None, None, None, 1, "same", 1,
                                                      backend="reference"))


def test_supported_calls_do_not_warn():
    x, w, b, s, oi, ii = _problem(5, 3, (3, 3), "half", "half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.masked_conv2d(x, w, b, oi, ii, s, 1, 1, 1, backend="triton")


# ------------------------------------------------------------------------------------ backward

def _grads(backend, x, w, b, s, oi, ii, conv, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    y = ops.masked_conv2d(leaves[0], leaves[1], leaves[2], oi, ii, leaves[3], *conv, backend=backend)
    y.backward(upstream)
    return y.detach(), [t.grad for t in leaves]


def _check_backward(x, w, b, s, oi, ii, conv, dtype):
    g = torch.Generator().manual_seed(7)
    ref_y = ops.masked_conv2d(x, w, b, oi, ii, s, *conv, backend="reference")
    upstream = torch.randn(ref_y.shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    ref_y, ref = _grads("reference", x, w, b, s, oi, ii, conv, upstream)
    got_y, got = _grads("triton", x, w, b, s, oi, ii, conv, upstream)
    tol = _tolerance(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_y, ref_y, **tol)
    for name, a, r in zip(("input", "weight", "bias", "scale"), got, ref):
        if r is None:   # no live input or output channel: no convolution, no gradient (not zeros)
            assert a is None, f"grad {name}: the reference has none"
            continue
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert not a.isnan().any(), f"grad {name}: an element was not written"
        torch.testing.assert_close(a, r, **tol, msg=lambda m: f"grad {name}: {m}")
    out_live, in_live = _live_mask(oi, w.shape[0]), _live_mask(ii, w.shape[1])
    gx, gw, gb, gs = got
    if gx is not None:
        assert not gx[:, ~in_live].any(), "grad input of a dead input channel"
    if gw is not None:
        assert not gw[~out_live].any() and not gw[:, ~in_live].any(), "grad weight of a dead row or column"
    assert not gb[~out_live].any() and not gs[~out_live].any(), "grad bias / scale of a dead channel"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kinds", [("all", "all"), ("half", "half"), ("full", "one"), ("one", "half"),
                                   ("none", "half"), ("half", "none")])
def test_backward_live_fractions(dtype, kinds):
    x, w, b, s, oi, ii = _problem(7, 5, (3, 3), *kinds, dtype=dtype, seed=8)
    _check_backward(x, w, b, s.to(dtype), oi, ii, (1, 1, 1), dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("conv", CONVS[1:], ids=str)
def test_backward_stride_padding_dilation_layouts(conv, layout):
    kernel, *params = conv
    x, w, b, s, oi, ii = _problem(6, 5, kernel, "half", "half", layout=layout, seed=9)
    gx, gw, _, _ = _check_backward(x, w, b, s, oi, ii, params, torch.float32)
    if layout == "channels_last":
        assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_half_precision(dtype):
    x, w, b, s, oi, ii = _problem(7, 5, (3, 3), "half", "half", dtype=dtype, seed=10)
    s = s.to(dtype)
    g = torch.Generator().manual_seed(11)
    upstream = torch.randn(2, 7, 7, 6, generator=g).to(DEVICE)
    _, ref = _grads("reference", x.float(), w.float(), b.float(), s.float(), oi, ii, (1, 1, 1), upstream)
    _, got = _grads("triton", x, w, b, s, oi, ii, (1, 1, 1), upstream.to(dtype))
    for name, a, r in zip(("input", "weight", "bias", "scale"), got, ref):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), r, rtol=5e-2, atol=1e-1 if name == "scale" else 5e-2,
                                   msg=lambda m: f"grad {name}: {m}")


def test_backward_only_some_inputs_require_grad():
    x, w, b, s, oi, ii = _problem(5, 4, (3, 3), "half", "half", seed=12)
    wl = w.clone().requires_grad_()
    y = ops.masked_conv2d(x, wl, b, oi, ii, s, 1, 1, 1, backend="triton")
    y.sum().backward()
    wr = w.clone().requires_grad_()
    ops.masked_conv2d(x, wr, b, oi, ii, s, 1, 1, 1, backend="reference").sum().backward()
    torch.testing.assert_close(wl.grad, wr.grad, rtol=1e-4, atol=1e-4)


def test_pruned_module_trains_on_the_triton_backend():
    """AttenuatedConv2d-style use: the kernel inside a model, gradients through two layers."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 6, 6, generator=g).to(DEVICE)
    w1, w2 = torch.randn(6, 3, 3, 3, generator=g), torch.randn(5, 6, 3, 3, generator=g)
    live1 = torch.tensor([0, 2, 5], device=DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        p1, p2 = (w.to(DEVICE).requires_grad_() for w in (w1, w2))
        h = torch.relu(ops.masked_conv2d(x, p1, None, live1, None, None, 1, 1, 1, backend=backend))
        y = ops.masked_conv2d(h, p2, None, None, live1, None, 1, 1, 1, backend=backend)
        y.square().mean().backward()
        grads[backend] = p1.grad, p2.grad
    for a, r in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    """torch.autograd.gradcheck (fast mode: random projections of the Jacobian, few interpreter
    runs) on a tiny problem: every input, dead channels on both sides."""
    x, w, b, s, oi, ii = _problem(4, 3, (3, 3), "half", "half", dtype=torch.float64, hw=(4, 4), batch=1,
                                  seed=22)

    def fn(x, w, b, s):
        return ops.masked_conv2d(x, w, b, oi, ii, s, 1, 1, 1, backend="triton")
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, w, b, s.double())), fast_mode=True)


@pytest.mark.parametrize("dtype,kinds,splits", [(torch.float64, ("all", "all"), 3),
                                                (torch.float64, ("half", "half"), 5),
                                                (torch.float64, ("one", "full"), 3),
                                                (torch.float16, ("half", "all"), 3)])
def test_grad_weight_split_k_adds_the_parts(monkeypatch, dtype, kinds, splits):
    """Split-K (forced: 3 or 5 parts of the 2 x 7 x 6 = 84 positions, the last one shorter) gives
    the reference's grad weight; the partial sums are poisoned like every fresh buffer."""
    x, w, b, s, oi, ii = _problem(7, 5, (3, 3), *kinds, dtype=dtype, seed=16)
    monkeypatch.setitem(MC.TUNING, "dw_split", splits)
    if dtype == torch.float64:
        _check_backward(x, w, b, s.to(dtype), oi, ii, (1, 1, 1), dtype)
        return
    upstream = torch.randn(2, 7, 7, 6, generator=torch.Generator().manual_seed(17)).to(DEVICE)
    _, ref = _grads("reference", x.float(), w.float(), b.float(), s.float(), oi, ii, (1, 1, 1), upstream)
    _, got = _grads("triton", x, w, b, s.to(dtype), oi, ii, (1, 1, 1), upstream.to(dtype))
    assert got[1].dtype == dtype
    torch.testing.assert_close(got[1].float(), ref[1], rtol=2e-2, atol=2e-2)


def _tuned_with(monkeypatch, kinds, config):
    """Route the ``kinds`` kernels through the run-time tuner with ``config`` as the single
    candidate (timing faked); the others get TUNING's small blocks the same way."""
    monkeypatch.setitem(MC.TUNING, "autotune", True)
    for kind in MC._TUNERS:
        candidate = config if kind in kinds else MC.Config(4, 4, 4) if kind == "grad_weight" else MC.Config(16, 4, 4)
        monkeypatch.setitem(MC._TUNERS, kind, MC.Tuner([candidate], time_ms=lambda fn: fn() or 1.0))


@pytest.mark.parametrize("config", MC.CONV_CONFIGS if MC else [], ids=str)
def test_every_tuned_forward_and_grad_input_configuration_is_exact(monkeypatch, config):
    _tuned_with(monkeypatch, ("forward", "grad_input"), config)
    x, w, b, s, oi, ii = _problem(9, 7, (3, 3), "half", "half", dtype=torch.float64, seed=18)
    _check_backward(x, w, b, s.double(), oi, ii, (1, 1, 1), torch.float64)


@pytest.mark.parametrize("config", MC.GRAD_WEIGHT_CONFIGS if MC else [], ids=str)
def test_every_tuned_grad_weight_configuration_is_exact(monkeypatch, config):
    _tuned_with(monkeypatch, ("grad_weight",), config)
    monkeypatch.setitem(MC.TUNING, "dw_split", 2)
    x, w, b, s, oi, ii = _problem(9, 7, (3, 3), "half", "all", dtype=torch.float64, seed=19)
    _check_backward(x, w, b, s.double(), oi, ii, (1, 1, 1), torch.float64)


def test_autocast_runs_the_kernels_in_the_autocast_dtype():
    """Under autocast (a bfloat16 training step) the kernels run, with no fallback, on the
    operands F.conv2d would get; gradients reach the float32 leaves in float32."""
    x, w, b, s, oi, ii = _problem(7, 5, (3, 3), "half", "half", seed=20)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                y = ops.masked_conv2d(*leaves[:3], oi, ii, leaves[3], 1, 1, 1, backend=backend)
        y.float().square().sum().backward()
        results[backend] = y, [t.grad for t in leaves]
    (y, grads), (ref_y, ref_grads) = results["triton"], results["reference"]
    assert y.dtype == ref_y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref_y.float(), rtol=3e-2, atol=5e-2)
    for name, a, r in zip(("input", "weight", "bias", "scale"), grads, ref_grads):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, r, rtol=5e-2, atol=2e-1, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.skipif(B is None or B.INTERPRET, reason="TF32 exists on a GPU only")
def test_float32_follows_cudnn_tf32_setting(monkeypatch):
    """With cuDNN allowed TF32 (PyTorch's default) float32 runs in TF32, like F.conv2d: close to a
    float64 reference at TF32 accuracy, and different from the IEEE result."""
    x, w, b, s, oi, ii = _problem(64, 64, (3, 3), "half", "half", hw=(16, 16), batch=4, seed=21)
    ieee = ops.masked_conv2d(x, w, b, oi, ii, s, 1, 1, 1, backend="triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    tf32 = ops.masked_conv2d(x, w, b, oi, ii, s, 1, 1, 1, backend="triton")
    ref = ops.masked_conv2d(x.double(), w.double(), b.double(), oi, ii, s.double(), 1, 1, 1,
                            backend="reference")
    torch.testing.assert_close(tf32.double(), ref, rtol=1e-2, atol=5e-2)
    assert not torch.equal(tf32, ieee)


# --------------------------------------------------------------------------------- compilation

def _compile_for_gpu(code: str, tmp_path) -> None:
    """Run a compile script without the interpreter (a fresh process: TRITON_INTERPRET is read at
    import); skip when this triton has no CUDA backend or ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=600, cwd=ROOT)
    if result.returncode != 0 and ("No module named 'triton.backends" in result.stderr
                                   or "ptxas" in result.stderr and "not found" in result.stderr):
        pytest.skip(f"this triton cannot compile for CUDA here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target(tmp_path):
    """The interpreter is more lenient than the compiler: compile the three kernels for sm_90 in
    every dtype, float32 in IEEE and TF32 precision (no GPU needed, triton ships ptxas) so that
    typing errors show up here."""
    code = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from attenuation_triton import masked_conv2d_kernels as mc
        target = GPUTarget("cuda", 90, 32)
        def build(kernel, pointers, scalars, constants):
            signature = {**pointers, **{k: "i32" for k in scalars.split()},
                         **{name: "constexpr" for name in constants}}
            compiled = triton.compile(ASTSource(kernel, signature, constants), target=target)
            assert "cubin" in compiled.asm
        conv = "stride_h stride_w pad_h pad_w dil_h dil_w"
        blocks = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)
        for dt, p in ((tl.float16, "*fp16"), (tl.bfloat16, "*bf16"), (tl.float32, "*fp32"),
                      (tl.float64, "*fp64")):
            acc = tl.float64 if dt == tl.float64 else tl.float32
            precisions = ("ieee", "tf32") if dt == tl.float32 else ("ieee",)
            for every, precision in zip((False, True) if dt == tl.float32 else (False,), precisions):
                build(mc.masked_conv2d_fwd_kernel,
                      {"x_ptr": p, "w_ptr": p, "y_ptr": p, "scale_ptr": "*fp32", "bias_ptr": p,
                       "out_idx_ptr": "*i64", "dead_idx_ptr": "*i64", "in_idx_ptr": "*i64"},
                      "N H W HO WO n_live_out n_dead_out n_live_in sxn sxc sxh sxw swo swi swh sww "
                      "syn syc syh syw " + conv,
                      dict(KH=3, KW=3, ALL_OUT=every, ALL_IN=every, HAS_SCALE=True, HAS_BIAS=True,
                           ACC_DTYPE=acc, UPCAST=False, PRECISION=precision, **blocks))
                build(mc.masked_conv2d_dx_kernel,
                      {"g_ptr": p, "w_ptr": p, "dx_ptr": p, "out_idx_ptr": "*i64", "in_idx_ptr": "*i64",
                       "dead_idx_ptr": "*i64"},
                      "N H W HO WO n_live_out n_live_in n_dead_in sgn sgc sgh sgw swo swi swh sww "
                      "sdn sdc sdh sdw " + conv,
                      dict(KH=3, KW=3, ALL_OUT=every, ALL_IN=every, ACC_DTYPE=acc, UPCAST=False,
                           PRECISION=precision, **blocks))
                build(mc.masked_conv2d_dw_kernel,
                      {"g_ptr": p, "x_ptr": p, "dw_ptr": p, "out_idx_ptr": "*i64", "in_idx_ptr": "*i64"},
                      "N H W HO WO n_live_out n_live_in n_splits split_len sgn sgc sgh sgw sxn sxc sxh sxw "
                      "swo swi swh sww s_split " + conv,
                      dict(KW=3, ALL_OUT=every, ALL_IN=every, ACC_DTYPE=acc, UPCAST=False,
                           PRECISION=precision, **blocks))
        print("ok")
    """)
    _compile_for_gpu(code, tmp_path)


# ----------------------------------------------------------------------- torch.library registration

@pytest.mark.slow
@pytest.mark.parametrize("kinds,layout", [(("half", "half"), "nchw"), (("all", "all"), "channels_last")])
def test_custom_ops_pass_opcheck(kinds, layout):
    x, w, b, s, oi, ii = _problem(5, 3, (3, 3), *kinds, layout=layout, hw=(5, 5), seed=14)
    x, w, b, s = (t.requires_grad_() for t in (x, w, b, s))
    conv = ([2, 1], [1, 0], [1, 1])
    torch.library.opcheck(torch.ops.attenuation_triton.masked_conv2d.default, (x, w, b, s, oi, ii, *conv))
    g = torch.randn(2, 5, 3, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.attenuation_triton.masked_conv2d_backward.default,
                          (g, x.detach(), w.detach(), oi, ii, *conv, True, True))


def test_torch_compile_traces_forward_and_backward():
    x, w, b, s, oi, ii = _problem(5, 3, (3, 3), "half", "half", hw=(5, 5), seed=15)

    def step(x, w, b, s):
        return ops.masked_conv2d(x, w, b, oi, ii, s, 1, 1, 1, backend="triton").square().sum()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    grads = {}
    for name, fn in (("compiled", compiled), ("eager", step)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, s)]
        fn(*leaves).backward()
        grads[name] = [t.grad for t in leaves]
    for a, r in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(a, r)


@pytest.mark.slow
def test_tuned_configurations_compile_and_fit_hopper_shared_memory(tmp_path):
    """Every candidate configuration of the run-time tuner compiles for sm_90 in bfloat16 (the
    training dtype) and float32 (TF32) and fits an H100's shared memory (227 KiB per block), so the
    tuner has its whole menu on Hopper."""
    code = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from attenuation_triton import masked_conv2d as tiles, masked_conv2d_kernels as mc
        target = GPUTarget("cuda", 90, 32)
        conv = {k: "i32" for k in "stride_h stride_w pad_h pad_w dil_h dil_w".split()}
        for p in ("*bf16", "*fp32"):
            precision = "tf32" if p == "*fp32" else "ieee"
            fixed = dict(ALL_OUT=False, ALL_IN=False, ACC_DTYPE=tl.float32, UPCAST=False,
                         PRECISION=precision)
            jobs = [(mc.masked_conv2d_fwd_kernel, c,
                     {"x_ptr": p, "w_ptr": p, "y_ptr": p, "scale_ptr": p, "bias_ptr": p,
                      "out_idx_ptr": "*i64", "dead_idx_ptr": "*i64", "in_idx_ptr": "*i64",
                      **{k: "i32" for k in "N H W HO WO n_live_out n_dead_out n_live_in sxn sxc sxh sxw "
                                          "swo swi swh sww syn syc syh syw".split()}, **conv},
                     dict(KH=3, KW=3, HAS_SCALE=True, HAS_BIAS=True, **fixed)) for c in tiles.CONV_CONFIGS]
            jobs += [(mc.masked_conv2d_dw_kernel, c,
                      {"g_ptr": p, "x_ptr": p, "dw_ptr": "*fp32", "out_idx_ptr": "*i64", "in_idx_ptr": "*i64",
                       **{k: "i32" for k in "N H W HO WO n_live_out n_live_in n_splits split_len sgn sgc sgh "
                                           "sgw sxn sxc sxh sxw swo swi swh sww s_split".split()}, **conv},
                      dict(KW=3, **fixed)) for c in tiles.GRAD_WEIGHT_CONFIGS]
            for kernel, c, signature, constants in jobs:
                constants = {**constants, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k}
                signature = {**signature, **{name: "constexpr" for name in constants}}
                compiled = triton.compile(ASTSource(kernel, signature, constants), target=target,
                                          options=dict(num_warps=c.num_warps, num_stages=c.num_stages))
                assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, p, c, compiled.metadata.shared)
        print("ok")
    """)
    _compile_for_gpu(code, tmp_path)

"""The triton backend (attenuation/ops/triton/, running the kernels of kernels/, the package
``attenuation_triton``) against the reference backend.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); with a GPU and no TRITON_INTERPRET they run compiled
on CUDA tensors. Block sizes are shrunk so that small shapes cross block boundaries, and every fresh
output is poisoned (NaN / 0x5A bytes) so that an element a kernel forgets to write is caught.
"""
import math
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch

from attenuation import ops
from attenuation.ops import backends, reference


def _triton_backend():
    """(backend package, its host module, None) or (None, None, why the tests are skipped)."""
    try:
        import triton  # noqa: F401
    except Exception as error:
        return None, None, f"triton cannot be imported ({error}): no triton backend to test"
    if "triton" not in ops.available_backends():
        return None, None, "the triton backend is not registered"
    from attenuation.ops import triton as backend
    from attenuation.ops.triton import host
    if not backend.INTERPRET and not torch.cuda.is_available():
        return None, None, "no GPU and TRITON_INTERPRET is not set: the kernels cannot run"
    return backend, host, None


B, H, _SKIP = _triton_backend()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
DEVICE = torch.device("cpu" if B is None or B.INTERPRET else "cuda")
POISON_BYTE = 0x5A


def poison(shape, dtype, device):
    """A fresh output full of NaN (floats) or POISON_BYTE (integers)."""
    if dtype.is_floating_point:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.full(shape, POISON_BYTE, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _small_blocks_poisoned_outputs(monkeypatch):
    if B is None:
        return
    small = dict(norms_tile=64, norms_max_block_k=16, attenuate_block_f=4, attenuate_block_k=16,
                 select_block_i=4, select_block_j=8)
    assert small.keys() == H.TUNING.keys()
    for name, value in small.items():
        monkeypatch.setitem(H.TUNING, name, value)
    monkeypatch.setattr(H, "_empty", poison)


def _assert_mask(got, expected):
    assert got.dtype == torch.bool and got.shape == expected.shape
    assert set(got.view(torch.uint8).unique().tolist()) <= {0, 1}, "unwritten or non-boolean bytes"
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------ registry

def test_registered_but_not_preferred():
    assert "triton" in ops.available_backends()
    registered = backends._BACKENDS["triton"]
    for name in ("filter_norms", "select_weak", "select_weak_global", "attenuate_", "zero_removed_", "masked_conv2d"):
        assert getattr(registered, name) is getattr(B, name), name
    for device_type, order in backends._PREFERENCE.items():
        assert order[0] != "triton", f"triton must not be the default for {device_type} before it is measured"
    assert ("triton" in backends._PREFERENCE["cpu"]) == B.INTERPRET
    assert "triton" in backends._PREFERENCE["cuda"]


def test_rejects_tensors_of_the_wrong_device():
    wrong = torch.randn(3, 2, device="meta")
    with pytest.raises(RuntimeError, match="triton backend"):
        B.filter_norms([wrong], "l1")


def test_import_without_triton_leaves_no_triton_backend():
    code = textwrap.dedent("""
        import sys
        sys.modules['triton'] = None
        import attenuation.ops as ops
        import attenuation_triton          # the package itself needs no triton
        assert 'triton' not in ops.available_backends(), ops.available_backends()
        try:
            import attenuation_triton.filter_norms
        except ImportError:
            print('ok')
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target(tmp_path):
    """The interpreter is more lenient than the compiler: compile every kernel for sm_90 (no GPU
    needed, triton ships ptxas) so that typing errors show up before a GPU does."""
    code = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from attenuation_triton import attenuate, filter_norms, select_weak
        from attenuation.ops.status import ACTIVE, REMOVED, WEAK
        target = GPUTarget("cuda", 90, 32)
        def build(kernel, pointers, scalars, constants):
            signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
            compiled = triton.compile(ASTSource(kernel, signature, constants), target=target)
            assert "cubin" in compiled.asm
        tables = {"layers_ptr": "*i64", "blocks_ptr": "*i64"}
        build(filter_norms.filter_norms_kernel, {**tables, "out_ptr": "*fp32"}, {},
              dict(DTYPE=tl.bfloat16, ORD=2, NCOL=filter_norms.NCOL, BLOCK_F=32, BLOCK_K=128))
        build(select_weak.select_weak_kernel, {**tables, "scores_ptr": "*fp32", "removed_ptr": "*u8",
              "ks_ptr": "*i64", "out_ptr": "*u8"}, {}, dict(NCOL=select_weak.NCOL, BLOCK_I=64, BLOCK_J=64))
        state = {"status_ptr": "*u8", "mult_ptr": "*fp32", "weak_ptr": "*u8", "returned_ptr": "*u8",
                 "newly_ptr": "*u8"}
        for zero_only, dtypes in ((False, (tl.float16, tl.float32, tl.bfloat16, tl.float64, tl.float32,
                                             tl.float32)), (True, (tl.float32,) * 6)):
            names = ("W_DTYPE", "B_DTYPE", "G_DTYPE", "BT_DTYPE", "RM_DTYPE", "RV_DTYPE")
            build(attenuate.attenuate_kernel, {**tables, **state}, {"factor": "fp32", "eps": "fp32"},
                  dict(zip(names, dtypes), ACTIVE=ACTIVE, WEAK=WEAK, REMOVED=REMOVED, ZERO_ONLY=zero_only, RESTORE=True,
                       NCOL=attenuate.NCOL, BLOCK_F=32, BLOCK_K=128))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0 and ("No module named 'triton.backends" in result.stderr
                                   or "ptxas" in result.stderr and "not found" in result.stderr):
        pytest.skip(f"this triton cannot compile for CUDA here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------- norms

def _weights(dtype, g):
    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)
    return [
        randn(7, 3, 3, 3),                                          # rows of 27: 2 K-blocks of 16
        randn(1, 5),                                                # a layer of 1 filter, 2-D
        randn(9, 4, 3, 3).contiguous(memory_format=torch.channels_last),   # dense rows, permuted
        randn(6, 5, 3, 3).transpose(2, 3),                          # non-contiguous, dense rows
        randn(13, 5, 3, 3)[:, :3],                                  # non-dense rows: copied
        randn(10, 2, 1, 1)[::2],                                    # filter stride 4, row length 2
        randn(5, 40),                                               # 3 K-blocks
    ]


@pytest.mark.parametrize("ord", ["l1", "l2", "linf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_filter_norms_match_reference(ord, dtype):
    weights = _weights(dtype, torch.Generator().manual_seed(1))
    assert not weights[3].is_contiguous() and not weights[4].is_contiguous()
    got = ops.filter_norms(weights, ord, backend="triton")
    expected = reference.filter_norms(weights, ord)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (46,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_filter_norms_mixed_dtypes_and_non_finite_values():
    g = torch.Generator().manual_seed(2)
    weights = [w for dtype in (torch.float16, torch.float32, torch.bfloat16, torch.float64)
               for w in _weights(dtype, g)[:3]]
    weights[0][2, 1, 0, 0] = math.nan
    weights[0][4, 0, 1, 1] = math.inf
    weights[3][6, 0, 2, 2] = -math.inf
    for ord in ("l1", "l2", "linf"):
        got = ops.filter_norms(weights, ord, backend="triton")
        torch.testing.assert_close(got, reference.filter_norms(weights, ord), rtol=1e-5, atol=1e-5,
                                   equal_nan=True)
        assert got[2].isnan() and got[4] == math.inf and got[17 + 6] == math.inf


def test_filter_norms_long_rows_and_many_filters(monkeypatch):
    monkeypatch.setitem(H.TUNING, "norms_tile", 256)
    monkeypatch.setitem(H.TUNING, "norms_max_block_k", 32)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(67, 8, 3, 3, generator=g).to(DEVICE), torch.randn(33, 300, generator=g).to(DEVICE)]
    for ord in ("l1", "l2", "linf"):
        torch.testing.assert_close(ops.filter_norms(weights, ord, backend="triton"),
                                   reference.filter_norms(weights, ord), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- select

COUNTS = [1, 7, 13, 4, 0, 9, 2]


@pytest.mark.parametrize("seed", range(6))
def test_select_weak_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(COUNTS)
    scores = torch.randint(0, 4, (total,), generator=g).float().to(DEVICE)   # many ties
    removed = (torch.rand(total, generator=g) < 0.25).to(DEVICE)
    ks = torch.tensor([int(torch.randint(0, n + 1, (), generator=g)) for n in COUNTS], device=DEVICE)
    got = ops.select_weak(scores, removed, COUNTS, ks, backend="triton")
    _assert_mask(got, reference.select_weak(scores, removed, COUNTS, ks))


@pytest.mark.parametrize("k", ["zero", "all", "beyond"])
def test_select_weak_k_bounds(k):
    g = torch.Generator().manual_seed(7)
    total = sum(COUNTS)
    scores = torch.rand(total, generator=g).to(DEVICE)
    removed = (torch.rand(total, generator=g) < 0.3).to(DEVICE)
    ks = torch.tensor([{"zero": 0, "all": n, "beyond": n + 3}[k] for n in COUNTS], device=DEVICE)
    if k == "beyond":   # the facade refuses ks beyond a layer's size; the kernel selects the whole layer
        got = B.select_weak(scores, removed, COUNTS, ks)
    else:
        got = ops.select_weak(scores, removed, COUNTS, ks, backend="triton")
    _assert_mask(got, torch.full((total,), k != "zero", device=DEVICE))


def test_select_weak_ties_signed_zeros_infinities_and_nans():
    counts = [12, 5]
    scores = torch.tensor([0.0, -0.0, math.nan, 1.0, -math.inf, math.inf, 0.0, math.nan, -0.0, 1.0, 1.0, -1.0,
                           2.0, 2.0, 2.0, 2.0, 2.0], device=DEVICE)
    removed = torch.zeros(17, dtype=torch.bool, device=DEVICE)
    removed[[3, 7, 15]] = True
    for k0 in range(counts[0] + 1):
        ks = torch.tensor([k0, k0 % 6], device=DEVICE)
        got = ops.select_weak(scores, removed, counts, ks, backend="triton")
        _assert_mask(got, reference.select_weak(scores, removed, counts, ks))


def test_select_weak_larger_layers():
    g = torch.Generator().manual_seed(8)
    counts = [64, 37, 1]
    scores = torch.randint(0, 10, (102,), generator=g).float().to(DEVICE)
    removed = (torch.rand(102, generator=g) < 0.1).to(DEVICE)
    ks = torch.tensor([32, 20, 1], device=DEVICE)
    got = ops.select_weak(scores, removed, counts, ks, backend="triton")
    _assert_mask(got, reference.select_weak(scores, removed, counts, ks))


# ------------------------------------------------------------------------------------ attenuate

def _model(seed, dtype=torch.float32, bn=True, stats=True):
    """Per layer (weight, bias, gamma, beta, running mean, running var), some of them missing, and
    the flat state with every kind of filter (active / weak / removed, multiplier 0)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, positive=False):
        x = torch.rand(*shape, generator=g) + 0.2 if positive else torch.randn(*shape, generator=g)
        return x.to(device=DEVICE, dtype=dtype)
    layers = [
        (t(7, 3, 3, 3), t(7), t(7, positive=True), t(7), t(7), t(7, positive=True)),
        (t(1, 5), None, t(1, positive=True), t(1), t(1), t(1, positive=True)),     # 1 filter, no bias
        (t(9, 4, 3, 3).contiguous(memory_format=torch.channels_last), t(9), None, None, None, None),
        (t(6, 5, 3, 3).transpose(2, 3), t(12)[::2], t(6, positive=True), t(6), t(6), t(6, positive=True)),
        (t(10, 5, 3, 3)[:, :3], None, t(10, positive=True), t(10), None, None),  # non-dense rows
        (t(10, 3, 1, 1)[::2], t(5), t(5, positive=True), t(5), t(5), t(5, positive=True)),  # filter stride
    ]
    if not bn:
        layers = [(w, b, None, None, None, None) for w, b, *_ in layers]
    if not stats:
        layers = [(*layer[:4], None, None) for layer in layers]
    total = sum(layer[0].shape[0] for layer in layers)
    status = torch.randint(0, 3, (total,), generator=g, dtype=torch.uint8)
    multiplier = torch.where(status == reference.WEAK, torch.rand(total, generator=g) * 0.6 + 0.02, 1.0)
    multiplier[status == reference.REMOVED] = 0.0
    multiplier[(status == reference.WEAK) & (torch.rand(total, generator=g) < 0.15)] = 0.0   # multiplier 0
    weak = torch.rand(total, generator=g) < 0.5
    return layers, weak.to(DEVICE), status.to(DEVICE), multiplier.to(DEVICE)


def _clone(layers):
    return [tuple(None if x is None else x.clone() for x in layer) for layer in layers]


def _call_attenuate(layers, weak, status, multiplier, factor, eps, restore, backend):
    w, b, g, bt, m, v = (list(column) for column in zip(*layers))
    if math.isfinite(eps):
        return ops.attenuate_(w, b, g, bt, weak, status, multiplier, factor, eps, restore, m, v, backend=backend)
    # the facade refuses eps = inf; the backends still follow the rule (every weak filter is removed)
    implementation = B if backend == "triton" else reference
    return implementation.attenuate_(w, b, g, bt, weak, status, multiplier, factor, eps, restore, m, v)


def _assert_same_tensors(got, expected):
    for layer_got, layer_expected in zip(got, expected):
        for x, y in zip(layer_got, layer_expected):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y), (x, y)


@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("factor,eps", [(0.4, 0.05), (0.7, 0.01), (0.0, 0.01), (1.0, 0.5), (0.5, 0.0),
                                        (0.0, math.inf)])
def test_attenuate_matches_reference(seed, restore, factor, eps):
    layers, weak, status, multiplier = _model(seed)
    mine = _clone(layers), weak.clone(), status.clone(), multiplier.clone()
    returned, newly = _call_attenuate(*mine, factor, eps, restore, "triton")
    exp_returned, exp_newly = _call_attenuate(layers, weak, status, multiplier, factor, eps, restore, "reference")
    _assert_mask(returned, exp_returned)
    _assert_mask(newly, exp_newly)
    assert torch.equal(mine[2], status) and torch.equal(mine[3], multiplier)
    _assert_same_tensors(mine[0], layers)


def test_attenuate_covers_every_case():
    """The rule's cases one by one, on one layer: the reference and the kernel agree on each."""
    w = torch.randn(8, 2, 3, 3, device=DEVICE)
    bias, gamma, beta = (torch.randn(8, device=DEVICE) for _ in range(3))
    mean, var = torch.randn(8, device=DEVICE), torch.rand(8, device=DEVICE) + 0.5
    # 0 active, 1 newly weak, 2 weak again, 3 returned, 4 weak again -> removed, 5 already removed,
    # 6 weak with multiplier 0, 7 returned with multiplier 0
    status = torch.tensor([0, 0, 1, 1, 1, 2, 1, 1], dtype=torch.uint8, device=DEVICE)
    multiplier = torch.tensor([1, 1, .5, .25, .02, 0, 0, 0], dtype=torch.float32, device=DEVICE)
    weak = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool, device=DEVICE)
    layers = [(w, bias, gamma, beta, mean, var)]
    for restore in (False, True):
        mine = _clone(layers), weak.clone(), status.clone(), multiplier.clone()
        ref = _clone(layers), weak.clone(), status.clone(), multiplier.clone()
        returned, newly = _call_attenuate(*mine, 0.4, 0.01, restore, "triton")
        _assert_mask(returned, torch.tensor([0, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool, device=DEVICE))
        _assert_mask(newly, torch.tensor([0, 0, 0, 0, 1, 0, 1, 0], dtype=torch.bool, device=DEVICE))
        assert mine[2].tolist() == [0, 1, 1, 0, 2, 2, 2, 0]
        _call_attenuate(*ref, 0.4, 0.01, restore, "reference")
        assert torch.equal(mine[2], ref[2]) and torch.equal(mine[3], ref[3])
        _assert_same_tensors(mine[0], ref[0])
        scale = mine[0][0][0][3] / w[3]
        torch.testing.assert_close(scale, torch.full_like(scale, 4.0 if restore else 1.0))


@pytest.mark.parametrize("bn,stats", [(False, False), (True, False)])
def test_attenuate_without_bias_bn_or_statistics(bn, stats):
    layers, weak, status, multiplier = _model(4, bn=bn, stats=stats)
    mine = _clone(layers), weak.clone(), status.clone(), multiplier.clone()
    got = _call_attenuate(*mine, 0.5, 0.1, True, "triton")
    expected = _call_attenuate(layers, weak, status, multiplier, 0.5, 0.1, True, "reference")
    for x, y in zip(got, expected):
        _assert_mask(x, y)
    assert torch.equal(mine[2], status) and torch.equal(mine[3], multiplier)
    _assert_same_tensors(mine[0], layers)
    # the facade's own default: no running statistics at all
    w, b, g, bt = ([layer[i] for layer in mine[0]] for i in range(4))
    ops.attenuate_(w, b, g, bt, weak, mine[2], mine[3], 0.5, 0.1, backend="triton")
    w, b, g, bt = ([layer[i] for layer in layers] for i in range(4))
    ops.attenuate_(w, b, g, bt, weak, status, multiplier, 0.5, 0.1, backend="reference")
    _assert_same_tensors(mine[0], layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_attenuate_dtypes_bitwise(dtype):
    layers, weak, status, multiplier = _model(5, dtype=dtype)
    # mix in float32 BatchNorms on two layers: a second dtype combination, a second launch
    layers[0] = (*layers[0][:2], *(x.float() for x in layers[0][2:]))
    layers[3] = (*layers[3][:2], *(x.float() for x in layers[3][2:]))
    mine = _clone(layers), status.clone(), multiplier.clone()
    for restore in (False, True):                 # two steps: the second one sees returns
        got = _call_attenuate(mine[0], weak, mine[1], mine[2], 0.3, 0.05, restore, "triton")
        expected = _call_attenuate(layers, weak, status, multiplier, 0.3, 0.05, restore, "reference")
        for x, y in zip(got, expected):
            _assert_mask(x, y)
        assert torch.equal(mine[1], status) and torch.equal(mine[2], multiplier)
        _assert_same_tensors(mine[0], layers)
        weak = ~weak


def test_attenuate_bfloat16_rounds_to_nearest_even():
    """Products that fall exactly halfway between two bfloat16 values, signed, infinite and NaN."""
    mantissas = 1 + torch.arange(128) / 128                          # every bfloat16 in [1, 2)
    rows = torch.stack([mantissas, -mantissas * 4, mantissas / 1024, torch.full((128,), math.inf)])
    rows[3, 1], rows[3, 2] = -math.inf, math.nan
    layers = [(rows.to(device=DEVICE, dtype=torch.bfloat16), None, None, None, None, None)]
    mine = _clone(layers)
    state = lambda: (torch.ones(4, dtype=torch.bool, device=DEVICE), torch.zeros(4, dtype=torch.uint8, device=DEVICE),
                     torch.ones(4, device=DEVICE))                 # noqa: E731
    _call_attenuate(mine, *state(), 0.75, 0.0, False, "triton")   # 42 exact ties
    _call_attenuate(layers, *state(), 0.75, 0.0, False, "reference")
    got, expected = mine[0][0].float(), layers[0][0].float()
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().sum() == 1
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_attenuate_bumps_autograd_versions():
    conv = torch.nn.Conv2d(3, 4, 3).to(DEVICE)
    status = torch.zeros(4, dtype=torch.uint8, device=DEVICE)
    multiplier = torch.ones(4, device=DEVICE)
    weak = torch.tensor([1, 0, 1, 0], dtype=torch.bool, device=DEVICE)
    before = conv.weight._version, conv.bias._version
    ops.attenuate_([conv.weight], [conv.bias], [None], [None], weak, status, multiplier, 0.5, 0.01,
                   backend="triton")
    assert conv.weight._version > before[0] and conv.bias._version > before[1]


# ----------------------------------------------------------------------------------------- zero

@pytest.mark.parametrize("seed", range(3))
def test_zero_removed_matches_reference(seed):
    layers, _, status, _ = _model(seed + 10)
    layers[1] = (layers[1][0], None, None, None, None, None)
    mine = _clone(layers)
    w, b, g, bt = ([layer[i] for layer in mine] for i in range(4))
    ops.zero_removed_(w, b, g, bt, status, backend="triton")
    w, b, g, bt = ([layer[i] for layer in layers] for i in range(4))
    ops.zero_removed_(w, b, g, bt, status, backend="reference")
    _assert_same_tensors(mine, layers)
    removed = (status == reference.REMOVED).nonzero().flatten().tolist()
    assert removed and mine[0][0][[i for i in removed if i < 7]].abs().sum() == 0


def test_launch_plans_are_reused_per_layout_and_rebuilt_when_it_changes(monkeypatch):
    """The host side of the model-wide ops (dtype groups, device tables) is cached per tensor
    layout: the same tensors reuse their plan, a tensor of another layout gets a new one, and a
    plan that holds copies (weights the kernel cannot read in place) is never reused."""
    builds = []
    for name in ("_norms_plan", "_scale_plan"):
        real = getattr(H, name)
        monkeypatch.setattr(H, name, lambda *args, _real=real, _name=name: builds.append(_name) or _real(*args))
    monkeypatch.setattr(H, "PLAN_CACHE", OrderedDict())
    g = torch.Generator().manual_seed(23)
    weights = [torch.randn(7, 3, 3, 3, generator=g).to(DEVICE), torch.randn(5, 7, 3, 3, generator=g).to(DEVICE)]

    def check_norms():
        torch.testing.assert_close(ops.filter_norms(weights, "l2", backend="triton"),
                                   ops.filter_norms(weights, "l2", backend="reference"))
    for _ in range(3):
        check_norms()
    assert builds == ["_norms_plan"]
    weights[1] = weights[1].contiguous(memory_format=torch.channels_last)   # same values, other strides
    check_norms()
    check_norms()
    assert builds == ["_norms_plan"] * 2
    weights[0] = weights[0][:, :, :2]                                       # rows not dense: a copy
    check_norms()
    check_norms()
    assert builds == ["_norms_plan"] * 4

    builds.clear()
    gammas = [torch.rand(7, generator=g).to(DEVICE) + 0.5, torch.rand(5, generator=g).to(DEVICE) + 0.5]
    status = torch.zeros(12, dtype=torch.uint8, device=DEVICE)
    multiplier = torch.ones(12, device=DEVICE)
    mine = [t.clone() for t in (*weights, *gammas, status, multiplier)]
    weights[0] = weights[0].contiguous()
    mine[0] = mine[0].contiguous()
    for step in range(3):
        weak = (torch.rand(12, generator=g) < 0.5).to(DEVICE)
        for backend, (w0, w1, g0, g1, st, mu) in (("triton", mine), ("reference", (*weights, *gammas, status,
                                                                                   multiplier))):
            ops.attenuate_([w0, w1], [None, None], [g0, g1], [None, None], weak, st, mu, 0.5, 0.2, backend=backend)
    for got, expected in zip(mine, (*weights, *gammas, status, multiplier)):
        assert torch.equal(got, expected)
    assert builds == ["_scale_plan"]


def _small_model(seed):
    """Two layers (7 and 5 filters) of fresh random tensors: weights, biases, gammas, betas."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, positive=False):
        x = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        return x.to(DEVICE)
    return [t(7, 3, 3, 3), t(5, 7, 3, 3)], [t(7), None], [t(7, positive=True), t(5, positive=True)], [None, t(5)]


def test_model_wide_ops_pass_opcheck():
    weights, biases, gammas, betas = _small_model(24)
    g = torch.Generator().manual_seed(25)
    status = torch.randint(0, 3, (12,), generator=g, dtype=torch.uint8).to(DEVICE)
    multiplier = torch.where(status == reference.WEAK, 0.5, 1.0).to(DEVICE)
    scores = torch.rand(12, generator=g).to(DEVICE)
    removed = status == reference.REMOVED
    weak = (torch.rand(12, generator=g) < 0.5).to(DEVICE)
    vectors = [biases[0], gammas[0], gammas[1], betas[1]]
    slots = [0, 1, 6, 7]                                  # layer * 5 + kind (bias, gamma, beta, ...)
    lib = torch.ops.attenuation_triton
    torch.library.opcheck(lib.filter_norms.default, (weights, "l2"))
    torch.library.opcheck(lib.select_weak.default,
                          (scores, removed, [7, 5], torch.tensor([3, 2], device=DEVICE)))
    torch.library.opcheck(lib.select_weak_global.default, (scores, removed, [7, 5], 5))
    torch.library.opcheck(lib.attenuate_.default, (weights, vectors, slots, weak, status, multiplier, 0.5, 0.3,
                                                   False))
    torch.library.opcheck(lib.zero_removed_.default, (weights, vectors, slots, status))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_attenuation_step_compiles_with_fullgraph(scope):
    """torch.compile(fullgraph=True) traces a whole attenuation step on the triton backend (the
    custom ops) and gives what eager gives."""
    def step(weights, biases, gammas, betas, status, multiplier):
        removed = status == reference.REMOVED
        scores = ops.filter_norms(weights, "l1", backend="triton")
        if scope == "global":
            weak = ops.select_weak_global(scores, removed, [7, 5], 6, backend="triton")
        else:
            weak = ops.select_weak(scores, removed, [7, 5], torch.tensor([3, 2], device=DEVICE),
                                   backend="triton")
        returned, newly = ops.attenuate_(weights, biases, gammas, betas, weak, status, multiplier, 0.5, 0.3,
                                         backend="triton")
        ops.zero_removed_(weights, biases, gammas, betas, status, backend="triton")
        return returned, newly

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = {}
    for name, fn in (("compiled", compiled), ("eager", step)):
        weights, biases, gammas, betas = _small_model(26)
        status = torch.zeros(12, dtype=torch.uint8, device=DEVICE)
        multiplier = torch.ones(12, device=DEVICE)
        masks = [fn(weights, biases, gammas, betas, status, multiplier) for _ in range(3)]
        results[name] = masks, [weights, biases, gammas, betas, [status], [multiplier]]
    (masks, state), (ref_masks, ref_state) = results["compiled"], results["eager"]
    for got, expected in zip(masks, ref_masks):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for got, expected in zip(state, ref_state):
        for a, b in zip(got, expected):
            assert (a is None and b is None) or torch.equal(a, b)
    assert (ref_state[4][0] == reference.REMOVED).any()   # the step did remove filters


# ------------------------------------------------------------------------- masked conv, facade

def _net(width=6):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width + 1, 3, padding=1), nn.BatchNorm2d(2 * width + 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width + 1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("reversible", [False, True])
def test_pruner_on_the_triton_backend_matches_the_reference(reversible):
    from attenuation import Pruner, PruningConfig
    config = PruningConfig(criterion="l2", ratio=0.5, factor=0.5, eps=0.1, interval=2, ramp="linear",
                           reversible=reversible)
    runs = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        model = _net().to(DEVICE)
        pruner = Pruner(model, config, backend=backend)
        pruner.start(12)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for _ in range(14):
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            x, y = x.to(DEVICE), y.to(DEVICE)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
        pruner.finish()
        runs[backend] = model, pruner
    (model, pruner), (ref_model, ref_pruner) = runs["triton"], runs["reference"]
    assert torch.equal(pruner.status, ref_pruner.status)
    assert torch.equal(pruner.returns, ref_pruner.returns)
    assert torch.equal(pruner.removed_at, ref_pruner.removed_at)
    assert (pruner.status == reference.REMOVED).sum() == ref_pruner.n_removed > 0
    for p, q in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

"""The native backend (the C++ extension attenuation._C, csrc/) against the reference backend.

Every op on fresh random inputs of odd sizes, non-contiguous and channels-last tensors, every dtype
it takes; outputs are poisoned (deterministic mode fills fresh allocations with NaN / max values)
so an element the extension forgets to write is caught. CUDA kernels are tested the same way when
a GPU is present and the extension was compiled with CUDA.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from attenuation import ops
from attenuation.methods import method_config
from attenuation.ops import reference
from attenuation.ops.slots import flat_vectors
from attenuation.pruner import Pruner

native = pytest.importorskip("attenuation.ops.native", reason="the native extension is not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and native.has_kernel("cuda") else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_ops = torch.ops.attenuation


@pytest.fixture(autouse=True)
def _poisoned_allocations():
    """Fresh tensors come out full of NaN (floats) or the largest value (integers, bool: True)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def _weights(device, dtype):
    """Odd shapes and layouts: contiguous, channels-last, a strided slice (rows not dense), a 2-D
    weight, a single filter, a layer with no filter."""
    return [
        torch.randn(7, 3, 3, 3, device=device, dtype=dtype),
        torch.randn(13, 7, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(9, 26, 3, 3, device=device, dtype=dtype)[:, ::2],
        torch.randn(5, 33, device=device, dtype=dtype),
        torch.randn(1, 5, 1, 1, device=device, dtype=dtype),
        torch.randn(0, 5, 3, 3, device=device, dtype=dtype),
    ]


# ---------------------------------------------------------------------------------------- norms

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ["l1", "l2", "linf"])
def test_filter_norms_match_reference(device, dtype, ord):
    weights = _weights(device, dtype)
    got = native.filter_norms(weights, ord)
    expected = reference.filter_norms(weights, ord)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_filter_norms_propagate_nan(device):
    w = torch.randn(4, 300, device=device)
    w[2, 123] = float("nan")
    for ord in ("l1", "l2", "linf"):
        got = native.filter_norms([w], ord)
        assert got[2].isnan() and not got[[0, 1, 3]].isnan().any()


# --------------------------------------------------------------------------------------- select

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_select_weak_matches_reference(device, seed):
    g = torch.Generator().manual_seed(seed)
    counts = [1, 7, 64, 300, 2]
    total = sum(counts)
    scores = torch.randint(0, 6, (total,), generator=g).float()  # many ties
    scores[torch.rand(total, generator=g) < 0.05] = float("nan")
    removed = torch.rand(total, generator=g) < 0.2
    ks = torch.tensor([int(torch.randint(-1, n + 2, (1,), generator=g)) for n in counts])
    scores, removed, ks = scores.to(device), removed.to(device), ks.to(device)
    got = native.select_weak(scores, removed, counts, ks)
    assert torch.equal(got, reference.select_weak(scores, removed, counts, ks))


# ------------------------------------------------------------------------- attenuate, zero removed

def _model_state(device, weight_dtype, vector_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weights = [t.to(device) for t in _weights("cpu", weight_dtype)]
    vectors = []
    for i, w in enumerate(weights):
        n = w.shape[0]
        vec = lambda: torch.randn(n, generator=g, dtype=vector_dtype).to(device)  # noqa: E731
        bias = vec() if i % 2 else None
        gamma, beta = (vec(), vec()) if i != 3 else (None, None)
        mean, var = (vec(), vec().abs()) if gamma is not None else (None, None)
        vectors.append([bias, gamma, beta, mean, var])
    total = sum(w.shape[0] for w in weights)
    status = torch.randint(0, 3, (total,), generator=g, dtype=torch.uint8)
    k = torch.randint(0, 6, (total,), generator=g)
    multiplier = torch.where(status == reference.WEAK, 0.6 ** k.float(), 1.0)
    multiplier = torch.where(status == reference.REMOVED, 0.0, multiplier)
    weak = torch.rand(total, generator=g) < 0.5
    weights[0][1, 0, 0, 0] = float("nan")  # NaN * 0 stays NaN: the reference multiplies
    return weights, vectors, weak.to(device), status.to(device), multiplier.to(device)


def _lists(vectors):
    return [list(column) for column in zip(*vectors)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16), (torch.float64, torch.float32)])
@pytest.mark.parametrize("restore", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_attenuate_matches_reference_bitwise(device, dtypes, restore, seed):
    state = _model_state(device, *dtypes, seed)
    copied = copy.deepcopy(state)
    weights, vectors, weak, status, multiplier = state
    biases, gammas, betas, means, variances = _lists(vectors)
    got = native.attenuate_(weights, biases, gammas, betas, weak, status, multiplier, 0.6, 0.05, restore,
                            means, variances)
    r_weights, r_vectors, r_weak, r_status, r_multiplier = copied
    rb, rg, rbt, rm, rv = _lists(r_vectors)
    expected = reference.attenuate_(r_weights, rb, rg, rbt, r_weak, r_status, r_multiplier, 0.6, 0.05, restore,
                                    rm, rv)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
    torch.testing.assert_close(status, r_status, **exact)
    torch.testing.assert_close(multiplier, r_multiplier, **exact)
    for a, e in zip(weights, r_weights):
        torch.testing.assert_close(a, e, **exact)
    for layer, r_layer in zip(vectors, r_vectors):
        for a, e in zip(layer, r_layer):
            assert (a is None) == (e is None)
            if a is not None:
                torch.testing.assert_close(a, e, **exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_zero_removed_matches_reference_bitwise(device, dtypes):
    state = _model_state(device, *dtypes, seed=7)
    copied = copy.deepcopy(state)
    weights, vectors, _, status, _ = state
    biases, gammas, betas, _, _ = _lists(vectors)
    native.zero_removed_(weights, biases, gammas, betas, status)
    r_weights, r_vectors, _, r_status, _ = copied
    rb, rg, rbt, _, _ = _lists(r_vectors)
    reference.zero_removed_(r_weights, rb, rg, rbt, r_status)
    for a, e in zip(weights + biases + gammas + betas, r_weights + rb + rg + rbt):
        if a is not None:
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


def test_pruner_on_native_equals_pruner_on_reference():
    """The whole engine, a few attenuation steps with training between them, on both backends."""
    from attenuation.models import vgg

    torch.manual_seed(0)
    models = [vgg(11, width=0.125), None]
    models[1] = copy.deepcopy(models[0])
    pruners = [Pruner(m, method_config("attenuation", ratio=0.5, interval=1, factor=0.5), backend=b)
               for m, b in zip(models, ("native", "reference"))]
    g = torch.Generator().manual_seed(1)
    for p in pruners:
        p.start(12)
    for _ in range(12):
        noise = [torch.randn(p.shape, generator=g) * 0.01 for p in models[0].parameters()]
        for model, pruner in zip(models, pruners):
            with torch.no_grad():
                for p, n in zip(model.parameters(), noise):
                    p.add_(n)
            pruner.step()
    assert torch.equal(pruners[0].status, pruners[1].status)
    assert (pruners[0].status == ops.REMOVED).any()
    for a, e in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# -------------------------------------------------------------------------------- masked conv2d

def _index(n, live, g):
    if live == "all-implicit":
        return None
    count = {"all": n, "none": 0, "one": 1, "half": max(1, n // 2)}[live]
    return torch.randperm(n, generator=g)[:count].sort().values


def _layout(t, layout):
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.cat([t, t], dim=3)[..., ::2]
    return t


@pytest.fixture(params=["compact", "dense"])
def strategy(request, monkeypatch):
    """Both strategies of the native masked conv: the compact problem, or the dense convolution on
    zero-masked weights (which the CPU picks when most MACs are live)."""
    monkeypatch.setattr(native, "DENSE_FROM_MAC_FRACTION", {"cpu": 1.01, "cuda": 1.01} if request.param == "compact"
                        else {"cpu": 0.0, "cuda": 0.0})
    return request.param


CONV_GEOMETRY = [dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1]),
                 dict(stride=[2, 1], padding=[2, 0], dilation=[1, 2])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("live", [("half", "half"), ("all", "one"), ("none", "half"), ("half", "none"),
                                  ("all-implicit", "half"), ("all", "all")])
@pytest.mark.parametrize("geometry", CONV_GEOMETRY)
def test_masked_conv2d_forward_matches_reference(device, dtype, layout, live, geometry, strategy):
    g = torch.Generator().manual_seed(3)
    x = _layout(torch.randn(3, 7, 9, 11, generator=g), layout).to(device, dtype)
    w = torch.randn(10, 7, 3, 3, generator=g).to(device, dtype)
    b = torch.randn(10, generator=g).to(device, dtype)
    scale = (torch.rand(10, generator=g) + 0.5).to(device)
    out_index, in_index = (_index(10, live[0], g), _index(7, live[1], g))
    out_index = None if out_index is None else out_index.to(device)
    in_index = in_index.to(device)
    got = native.masked_conv2d(x, w, b, out_index, in_index, scale, **geometry)
    expected = reference.masked_conv2d(x.double(), w.double(), b.double(), out_index, in_index, scale.double(),
                                       **geometry)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("live", [("half", "half"), ("one", "all"), ("none", "half"), ("half", "none"),
                                  ("all-implicit", "all-implicit")])
def test_masked_conv2d_gradients_match_float64_reference(device, layout, live, strategy):
    g = torch.Generator().manual_seed(5)
    x = _layout(torch.randn(2, 6, 7, 8, generator=g), layout).to(device)
    w = torch.randn(9, 6, 3, 3, generator=g).to(device)
    b = torch.randn(9, generator=g).to(device)
    scale = (torch.rand(9, generator=g) + 0.5).to(device)
    out_index, in_index = (_index(9, live[0], g), _index(6, live[1], g))
    out_index, in_index = (None if i is None else i.to(device) for i in (out_index, in_index))
    geometry = CONV_GEOMETRY[1]
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scale)]
    y = native.masked_conv2d(leaves[0], leaves[1], leaves[2], out_index, in_index, leaves[3], **geometry)
    grad = torch.randn(y.shape, generator=g).to(device)
    got = torch.autograd.grad(y, leaves, grad, allow_unused=True, materialize_grads=True)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b, scale)]
    y_ref = reference.masked_conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2], out_index, in_index,
                                    ref_leaves[3], **geometry)
    expected = torch.autograd.grad(y_ref, ref_leaves, grad.double(), allow_unused=True, materialize_grads=True)
    for a, e, leaf in zip(got, expected, leaves):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_conv2d_gradcheck(device, strategy):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 6, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    scale = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    out_index = torch.tensor([0, 2, 3], device=device)
    in_index = torch.tensor([1, 4], device=device)
    fn = lambda *a: native.masked_conv2d(*a[:3], out_index, in_index, a[3], [1, 2], [1, 0], [2, 1])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, scale))


def test_drop_in_conv_compiles_with_fullgraph():
    """AttenuatedConv2d on the native backend under torch.compile(fullgraph=True): the fake kernels
    and the autograd formula trace, forward and backward, and agree with eager mode."""
    from attenuation.modules import AttenuatedConv2d

    conv = AttenuatedConv2d(6, 8, 3, padding=1, backend="native")
    conv.set_live(torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool),
                  torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool))
    x = torch.randn(2, 6, 7, 7)

    def step(x):
        return conv(x).square().sum()

    results = []
    for fn in (torch.compile(step, backend="aot_eager", fullgraph=True), step):
        conv.zero_grad()
        leaf = x.clone().requires_grad_()
        loss = fn(leaf)
        loss.backward()
        results.append((loss, leaf.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager)


# --------------------------------------------------------------------------------------- opcheck

def _opcheck_samples(device):
    g = torch.Generator().manual_seed(8)
    weights, vectors, weak, status, multiplier = _model_state(device, torch.float32, torch.float32, 0)
    weights = [w.contiguous() for w in weights if w.shape[0]]  # fake tensors: any layout is fine
    vectors, total = vectors[:len(weights)], sum(w.shape[0] for w in weights)
    weak, status, multiplier = weak[:total], status[:total], multiplier[:total]
    weights[0] = weights[0].nan_to_num()  # opcheck compares outputs without equal_nan
    flat, slots = flat_vectors(*_lists(vectors))
    counts = [w.shape[0] for w in weights]
    x = torch.randn(2, 6, 7, 7, generator=g).to(device)
    w = torch.randn(5, 6, 3, 3, generator=g).to(device)
    scale = torch.rand(5, generator=g).to(device)
    out_index, in_index = torch.tensor([0, 3, 4], device=device), torch.tensor([1, 2, 5], device=device)
    geometry = ([1, 1], [1, 1], [1, 1])
    return [
        (_ops.filter_norms.default, (weights, "l2")),
        (_ops.select_weak.default, (torch.randn(total).to(device), weak, counts,
                                    torch.tensor([1] * len(counts), device=device))),
        (_ops.attenuate_.default, (weights, flat, slots, weak, status, multiplier, 0.5, 0.1, False)),
        (_ops.zero_removed_.default, (weights, flat[:3], slots[:3], status)),
        (_ops.masked_conv2d.default, (x.requires_grad_(), w.requires_grad_(), None, out_index, in_index,
                                      scale, *geometry)),
        (_ops.masked_conv2d.default, (x.to(memory_format=torch.channels_last), w, scale, None, in_index, None,
                                      *geometry)),
        (_ops.masked_conv2d_backward.default, (torch.randn(2, 5, 7, 7, generator=g).to(device),
                                               x.detach()[:, in_index], w.detach(), out_index,
                                               in_index, scale, *geometry, [True, True, True, True])),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------ errors, fallbacks

def test_bad_arguments_raise_clear_errors():
    w = torch.randn(4, 3, 3, 3)
    x = torch.randn(2, 3, 5, 5)
    status, mult, weak = torch.zeros(4, dtype=torch.uint8), torch.ones(4), torch.zeros(4, dtype=torch.bool)
    cases = [
        (lambda: _ops.filter_norms([w], "l3"), "unknown norm 'l3'"),
        (lambda: _ops.filter_norms([w, torch.ones(3, 2, dtype=torch.int64)], "l1"), "weight 1 must be a floating"),
        (lambda: _ops.select_weak(torch.randn(5), torch.zeros(4, dtype=torch.bool), [4], torch.tensor([1])),
         "scores must be flat with 4"),
        (lambda: _ops.select_weak(torch.randn(4), torch.zeros(4, dtype=torch.bool), [4], torch.tensor([1.0])),
         "ks must be Long"),
        (lambda: _ops.attenuate_([w], [], [], weak, status.long(), mult, 0.5, 0.1, False), "status must be Byte"),
        (lambda: _ops.attenuate_([w], [torch.ones(4)], [], weak, status, mult, 0.5, 0.1, False),
         "1 vectors for 0 slots"),
        (lambda: _ops.attenuate_([w], [torch.ones(3)], [1], weak, status, mult, 0.5, 0.1, False),
         r"layer 0 gamma has shape \[3\]"),
        (lambda: _ops.attenuate_([w], [torch.ones(4)], [5], weak, status, mult, 0.5, 0.1, False),
         "vector 0 has slot 5, outside the 1 layers"),
        (lambda: _ops.attenuate_([w], [torch.ones(4), torch.ones(4)], [2, 2], weak, status, mult, 0.5, 0.1, False),
         "two vectors for layer 0's beta"),
        (lambda: _ops.attenuate_([w], [], [], weak, status, mult, 1.5, 0.1, False), "factor must be in"),
        (lambda: _ops.zero_removed_([w], [torch.ones(4)], [3], status), "slot 3, outside"),
        (lambda: _ops.zero_removed_([w], [], [], status[:3]), "status must be flat with 4"),
        (lambda: _ops.masked_conv2d(x, w, None, torch.tensor([0, 4]), None, None, [1, 1], [0, 0], [1, 1]),
         "channel 4 out of"),
        (lambda: _ops.masked_conv2d(x, w, None, torch.tensor([2, 1]), None, None, [1, 1], [0, 0], [1, 1]),
         "strictly increasing"),
        (lambda: _ops.masked_conv2d(x.double(), w, None, None, None, None, [1, 1], [0, 0], [1, 1]),
         "same floating dtype"),
        (lambda: _ops.masked_conv2d(x, w, torch.ones(3), None, None, None, [1, 1], [0, 0], [1, 1]),
         r"bias must have shape \(4,\)"),
        (lambda: _ops.masked_conv2d(x[0], w, None, None, None, None, [1, 1], [0, 0], [1, 1]), "4-D"),
        (lambda: _ops.masked_conv2d(x, w, None, None, None, None, [1, 1], [0, 0], [3, 3]), "larger than"),
        (lambda: _ops.masked_conv2d(x, w, None, None, None, None, [0, 1], [0, 0], [1, 1]), "stride"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_unsupported_cases_fall_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops.fallback, "_warned_fallbacks", set())
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    with pytest.warns(UserWarning, match="groups=2"):
        got = native.masked_conv2d(x, w, None, None, None, None, 1, 1, 1, groups=2)
    torch.testing.assert_close(got, F.conv2d(x, w, None, 1, 1, 1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        native.masked_conv2d(x, w, None, None, None, None, 1, 1, 1, groups=2)


def test_autocast_casts_like_conv2d():
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3), torch.randn(6)
    out_index = torch.tensor([1, 2, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = native.masked_conv2d(x, w, b, out_index, None, None, 1, 1, 1)
        expected = F.conv2d(x, w, b, 1, 1)
    assert got.dtype == torch.bfloat16
    # bfloat16 rounding: the bias may be added after the convolution's output is rounded
    torch.testing.assert_close(got[:, out_index], expected[:, out_index], rtol=2e-2, atol=1e-2)
    assert not got[:, [0, 3, 4]].any()


def test_autocast_leaves_float64_as_conv2d_does():
    x, w = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64)
    out_index = torch.tensor([4])  # 1 of 6 filters: under the dense break-even, the op itself runs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = native.masked_conv2d(x, w, None, out_index, None, None, 1, 1, 1)
        expected = F.conv2d(x, w, None, 1, 1)
    assert got.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(got[:, out_index], expected[:, out_index])


def test_package_works_without_the_extension_and_says_so_once():
    """With attenuation._C missing, the package imports, warns once and runs the reference."""
    import pathlib
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "attenuation._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from attenuation import ops
            import attenuation.modules, attenuation.pruner
        messages = [str(w.message) for w in caught if "native extension" in str(w.message)]
        assert len(messages) == 1, messages
        assert "native" not in ops.available_backends()
        assert ops.backends.default_backend(torch.device("cpu")) == "reference"
        print(ops.filter_norms([torch.ones(2, 3)], "l1").tolist())
    """)
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[3.0, 3.0]"

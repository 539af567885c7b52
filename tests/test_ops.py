"""The ops facade and its reference backend, checked against plain-Python statements of the rule."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attenuation import ops


def _order_key(score, removed, index):
    """The selection order: removed first, then ascending score (NaN after every number), then index."""
    return not removed, math.isnan(score), 0.0 if math.isnan(score) else score, index


def _naive_select(scores, removed, counts, ks):
    out, start = [], 0
    for n, k in zip(counts, ks):
        rows = sorted(range(start, start + n), key=lambda i: _order_key(scores[i], removed[i], i))
        chosen = set(rows[:k])
        out += [i in chosen for i in range(start, start + n)]
        start += n
    return out


def _naive_normalised(scores, removed, counts):
    """Each score over its layer's mean live score (float32 arithmetic, as the op's), -inf if removed."""
    out, start = [], 0
    with np.errstate(all="ignore"):
        for n in counts:
            live = [scores[i] for i in range(start, start + n) if not removed[i]]
            mean = np.float32(sum(live)) / np.float32(max(len(live), 1))   # exact sums: integer scores
            mean = np.float32(1e-12) if mean < np.float32(1e-12) else mean  # NaN stays NaN
            out += [-math.inf if removed[i] else float(np.float32(scores[i]) / mean)
                    for i in range(start, start + n)]
            start += n
    return out


def _naive_select_global(scores, removed, counts, n_weak):
    """The global rule as the pruner stated it: the n_weak lowest normalised scores of the model,
    counted per layer, each count at most n - 1, then the per-layer selection."""
    normalised = _naive_normalised(scores, removed, counts)
    order = sorted(range(len(scores)), key=lambda i: _order_key(normalised[i], False, i))  # removed: -inf
    chosen = set(order[:n_weak])
    ks, start = [], 0
    for n in counts:
        ks.append(min(sum(i in chosen for i in range(start, start + n)), n - 1))
        start += n
    return _naive_select(normalised, removed, counts, ks)


def _rank_select_global(scores, removed, counts, n_weak):
    """The same rule by ranks, as the Triton kernel computes it: selected iff the filter's rank in
    the model is < n_weak and its rank in its layer is < n - 1."""
    normalised = _naive_normalised(scores, removed, counts)
    key = [_order_key(normalised[i], removed[i], i) for i in range(len(scores))]
    out, start = [], 0
    for n in counts:
        for i in range(start, start + n):
            model_rank = sum(k < key[i] for k in key)
            layer_rank = sum(k < key[i] for k in key[start:start + n])
            out.append(model_rank < n_weak and layer_rank < n - 1)
        start += n
    return out


def _global_problem(seed):
    """Small integers (many ties across and within layers) on a power-of-two scale per layer (exact
    float32 sums; only the right means make the layers comparable), some NaN, removed filters, a
    layer with every filter removed, layers of one and of no filter."""
    g = torch.Generator().manual_seed(seed)
    counts = [1, 7, 13, 4, 0, 9, 5, 2]
    total = sum(counts)
    scales = torch.tensor([2.0 ** int(torch.randint(0, 6, (), generator=g)) for _ in counts])
    scores = torch.randint(0, 5, (total,), generator=g).float()
    scores *= scales.repeat_interleave(torch.tensor(counts))
    scores[torch.rand(total, generator=g) < 0.05] = math.nan
    removed = torch.rand(total, generator=g) < 0.25
    removed[sum(counts[:6]):sum(counts[:7])] = True
    return scores, removed, counts


@pytest.mark.parametrize("ord,fn", [("l1", lambda r: r.abs().sum()), ("l2", lambda r: r.norm()),
                                    ("linf", lambda r: r.abs().max())])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_filter_norms_match_per_row(ord, fn, dtype):
    weights = [torch.randn(7, 3, 3, 3).to(dtype), torch.randn(5, 7, 1, 1).to(dtype),
               torch.randn(9, 2, 3, 3).to(dtype).transpose(2, 3)]  # non-contiguous
    expected = torch.tensor([float(fn(w[i].float())) for w in weights for i in range(w.shape[0])])
    got = ops.filter_norms(weights, ord)
    assert got.dtype == torch.float32 and got.shape == (21,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_filter_norms_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown norm"):
        ops.filter_norms([torch.randn(2, 2)], "l3")
    with pytest.raises(ValueError, match="floating"):
        ops.filter_norms([torch.ones(3, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="backend 'nope'"):
        ops.filter_norms([torch.randn(3, 2)], backend="nope")


@pytest.mark.parametrize("seed", range(5))
def test_select_weak_matches_sorted_rule(seed):
    g = torch.Generator().manual_seed(seed)
    counts = [1, 7, 13, 4]
    scores = torch.randint(0, 4, (sum(counts),), generator=g).float()  # many ties
    removed = torch.rand(sum(counts), generator=g) < 0.2
    ks = [int(torch.randint(0, n + 1, (), generator=g)) for n in counts]
    ks = [max(k, int(removed[sum(counts[:i]):sum(counts[:i + 1])].sum())) for i, k in enumerate(ks)]
    got = ops.select_weak(scores, removed, counts, ks)
    assert got.tolist() == _naive_select(scores.tolist(), removed.tolist(), counts, ks)


def test_select_weak_validates():
    with pytest.raises(ValueError, match="ks"):
        ops.select_weak(torch.rand(5), torch.zeros(5, dtype=torch.bool), [2, 3], [1])
    with pytest.raises(ValueError, match="sum\\(counts\\)"):
        ops.select_weak(torch.rand(4), torch.zeros(4, dtype=torch.bool), [2, 3], [1, 1])
    with pytest.raises(ValueError, match="bool"):
        ops.select_weak(torch.rand(5), torch.zeros(5), [2, 3], [1, 1])


@pytest.mark.parametrize("seed", range(8))
def test_select_weak_global_matches_the_pruners_rule(seed):
    scores, removed, counts = _global_problem(seed)
    total = sum(counts)
    for n_weak in (0, 1, total // 3, total // 2, total - 1, total, total + 4):
        literal = _naive_select_global(scores.tolist(), removed.tolist(), counts, n_weak)
        got = ops.select_weak_global(scores, removed, counts, n_weak)
        assert got.dtype == torch.bool and got.tolist() == literal, n_weak
        assert _rank_select_global(scores.tolist(), removed.tolist(), counts, n_weak) == literal, n_weak


def test_select_weak_global_normalises_by_layer_and_keeps_a_filter_per_layer():
    counts = [3, 3, 2]
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 5.0, 5.0])
    removed = torch.zeros(8, dtype=torch.bool)
    # Normalised: 0.5, 1, 1.5 | 0.5, 1, 1.5 | 1, 1. Ties across layers break by flat index.
    assert ops.select_weak_global(scores, removed, counts, 3).tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert ops.select_weak_global(scores, removed, counts, 8).tolist() == [1, 1, 0, 1, 1, 0, 1, 0]
    removed[1] = True                  # layer 0's mean is now 2: its removed filter comes first
    assert ops.select_weak_global(scores, removed, counts, 2).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_select_weak_global_nan_spares_its_layer():
    counts = [3, 4]
    scores = torch.tensor([1.0, math.nan, 0.0, 4.0, 5.0, 6.0, 7.0])
    removed = torch.tensor([False, False, False, False, False, False, True])
    # Layer 0's mean is NaN: its live filters normalise to NaN and come after every number.
    assert ops.select_weak_global(scores, removed, counts, 3).tolist() == [0, 0, 0, 1, 1, 0, 1]
    scores[6] = math.nan               # a removed filter's score does not count
    assert ops.select_weak_global(scores, removed, counts, 3).tolist() == [0, 0, 0, 1, 1, 0, 1]
    # Layer 1 is chosen whole and keeps its last filter; layer 0 gives its first (ties by index).
    assert ops.select_weak_global(scores, removed, counts, 5).tolist() == [1, 0, 0, 1, 1, 0, 1]


def test_select_weak_global_validates():
    scores, removed = torch.rand(5), torch.zeros(5, dtype=torch.bool)
    for bad in (-1, 1.5, True, torch.tensor(2)):
        with pytest.raises(ValueError, match="n_weak must be an int >= 0"):
            ops.select_weak_global(scores, removed, [2, 3], bad)
    with pytest.raises(ValueError, match="sum\\(counts\\)"):
        ops.select_weak_global(scores, removed, [2, 2], 1)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        ops.select_weak_global(scores, removed, [6, -1], 1)
    with pytest.raises(ValueError, match="bool"):
        ops.select_weak_global(scores, removed.float(), [2, 3], 1)
    with pytest.raises(ValueError, match="flat"):
        ops.select_weak_global(scores.view(5, 1), removed.view(5, 1), [2, 3], 1)
    assert ops.select_weak_global(scores, removed, [2, 3], np.int64(2)).sum() == 2


def test_backends_without_select_weak_global_run_the_reference(monkeypatch):
    from types import SimpleNamespace

    from attenuation.ops import backends, reference
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))  # the registration is undone
    five = ("filter_norms", "select_weak", "attenuate_", "zero_removed_", "masked_conv2d")
    backends.register_backend("bare", SimpleNamespace(**{op: getattr(reference, op) for op in five}), device_types=())
    scores, removed, counts = _global_problem(0)
    expected = ops.select_weak_global(scores, removed, counts, 11, backend="reference")
    for name in ("bare", *backends.available_backends()):
        assert torch.equal(ops.select_weak_global(scores, removed, counts, 11, backend=name), expected), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: checks that the op never "
                    "makes the host wait for it")
def test_select_weak_global_does_not_synchronise_on_cuda():
    from attenuation.ops import backends
    scores, removed, counts = _global_problem(0)
    scores, removed = scores.cuda(), removed.cuda()
    expected = ops.select_weak_global(scores.cpu(), removed.cpu(), counts, 11, backend="reference")
    for name in ("reference", "native", "triton"):
        if name not in backends._PREFERENCE["cuda"]:
            continue
        ops.select_weak_global(scores, removed, counts, 11, backend=name)   # warm-up: compilation, tables
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ops.select_weak_global(scores, removed, counts, 11, backend=name)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        assert torch.equal(got.cpu(), expected), name


def _layers():
    weights = [torch.randn(4, 3, 3, 3), torch.randn(3, 4, 3, 3)]
    biases = [torch.randn(4), None]
    gammas = [torch.rand(4) + 0.5, torch.rand(3) + 0.5]
    betas = [torch.randn(4), torch.randn(3)]
    return weights, biases, gammas, betas


def test_attenuate_follows_the_rule():
    weights, biases, gammas, betas = _layers()
    before = [[t.clone() if t is not None else None for t in group] for group in (weights, biases, gammas, betas)]
    status = torch.tensor([0, 1, 1, 2, 0, 1, 0], dtype=torch.uint8)
    mult = torch.tensor([1, .5, .02, 0, 1, .5, 1], dtype=torch.float32)
    weak = torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    returned, newly = ops.attenuate_(weights, biases, gammas, betas, weak, status, mult, 0.4, 0.01)
    # filter 0: newly weak; 1: returned; 2: weak again, 0.02*0.4 < 0.01 -> removed; 3: stays removed;
    # 4: active; 5: weak again, 0.2; 6: active
    assert status.tolist() == [1, 0, 2, 2, 0, 1, 0]
    assert torch.allclose(mult, torch.tensor([.4, 1, 0, 0, 1, .2, 1]))
    assert returned.tolist() == [False, True, False, False, False, False, False]
    assert newly.tolist() == [False, False, True, False, False, False, False]
    scale = [0.4, 1, 0, 0, 1, 0.4, 1]
    for group_now, group_before in zip((weights, biases, gammas, betas), before):
        flat_now = [row for t in group_now if t is not None for row in t]
        flat_before = [row for t in group_before if t is not None for row in t]
        present = [s for t, ss in zip(group_now, ([scale[:4], scale[4:]])) if t is not None for s in ss]
        for now, was, s in zip(flat_now, flat_before, present):
            torch.testing.assert_close(now, was * s)


def test_attenuate_restores_returning_filters():
    weights, biases, gammas, betas = _layers()
    before = weights[0].clone()
    status = torch.tensor([1, 1, 1, 2, 0, 0, 0], dtype=torch.uint8)
    mult = torch.tensor([.25, .5, 0, 0, 1, 1, 1], dtype=torch.float32)
    weak = torch.tensor([0, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    returned, _ = ops.attenuate_(weights, biases, gammas, betas, weak, status, mult, 0.5, 0.01, restore=True)
    assert returned.tolist() == [True, False, True, False, False, False, False]
    torch.testing.assert_close(weights[0][0], before[0] * 4)   # undone: divided by its multiplier
    torch.testing.assert_close(weights[0][1], before[1] * 0.5)  # still weak: attenuated again
    torch.testing.assert_close(weights[0][2], before[2])       # multiplier 0 (SFP): nothing to undo
    assert mult.tolist()[:3] == [1, 0.25, 1]


def test_attenuate_keeps_batchnorm_statistics_consistent():
    """Eval mode after an attenuation step equals eval mode of the same scaling done by hand."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    net = torch.nn.Sequential(conv, bn)
    net.train()
    for _ in range(5):
        net(torch.randn(8, 3, 6, 6))
    net.eval()
    x = torch.randn(2, 3, 6, 6)
    before = net(x)
    status = torch.tensor([0, 1, 0, 0], dtype=torch.uint8)
    mult = torch.tensor([1, 0.5, 1, 1])
    weak = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    ops.attenuate_([conv.weight], [conv.bias], [bn.weight], [bn.bias], weak, status, mult, 0.5, 0.01,
                   restore=True, running_means=[bn.running_mean], running_vars=[bn.running_var])
    after = net(x)
    torch.testing.assert_close(after[:, 0], before[:, 0] * 0.5, rtol=1e-3, atol=1e-3)  # attenuated
    torch.testing.assert_close(after[:, 1], before[:, 1] * 2, rtol=1e-3, atol=1e-3)    # restored
    torch.testing.assert_close(after[:, 2:], before[:, 2:])


def test_attenuate_validates():
    weights, biases, gammas, betas = _layers()
    status = torch.zeros(7, dtype=torch.uint8)
    mult = torch.ones(7)
    weak = torch.zeros(7, dtype=torch.bool)
    with pytest.raises(ValueError, match="factor"):
        ops.attenuate_(weights, biases, gammas, betas, weak, status, mult, 1.5, 0.1)
    with pytest.raises(ValueError, match="eps"):
        ops.attenuate_(weights, biases, gammas, betas, weak, status, mult, 0.5, -1)
    with pytest.raises(ValueError, match="status"):
        ops.attenuate_(weights, biases, gammas, betas, weak, status.long(), mult, 0.5, 0.1)
    with pytest.raises(ValueError, match="gamma"):
        ops.attenuate_(weights, biases, [torch.ones(5), None], betas, weak, status, mult, 0.5, 0.1)


def test_zero_removed_zeroes_only_removed_filters():
    weights, biases, gammas, betas = _layers()
    status = torch.tensor([2, 0, 1, 0, 0, 0, 2], dtype=torch.uint8)
    ops.zero_removed_(weights, biases, gammas, betas, status)
    assert weights[0][0].abs().sum() == 0 and biases[0][0] == 0 and gammas[0][0] == 0 and betas[0][0] == 0
    assert weights[1][2].abs().sum() == 0 and gammas[1][2] == 0 and betas[1][2] == 0
    assert weights[0][2].abs().sum() > 0 and gammas[1][0] != 0


def _dense_masked(x, w, b, live_out, live_in, scale, **kw):
    w = w * live_out.view(-1, 1, 1, 1)
    if live_in is not None:
        w = w * live_in.view(1, -1, 1, 1)
    y = F.conv2d(x, w, None, **kw)
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if b is not None:
        y = y + b.view(1, -1, 1, 1)
    return y * live_out.view(1, -1, 1, 1)


@pytest.fixture(params=["gathered", "masked-dense"])
def masked_conv_path(request, monkeypatch):
    """Force each of the reference's two strategies (chosen by the live MAC fraction)."""
    from attenuation.ops import reference
    monkeypatch.setattr(reference, "GATHER_BELOW_MAC_FRACTION", 1.01 if request.param == "gathered" else 0.0)
    return request.param


@pytest.mark.parametrize("live", ["all", "half", "one", "none"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv", [dict(stride=1, padding=1, dilation=1), dict(stride=2, padding=2, dilation=2)])
def test_masked_conv2d_matches_zero_masked_dense(live, channels_last, conv, masked_conv_path):
    torch.manual_seed(1)
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(7, dtype=torch.float64) + 0.5
    live_out = {"all": torch.ones(7), "half": torch.tensor([1, 0, 1, 0, 1, 1, 0.]),
                "one": torch.eye(7)[3], "none": torch.zeros(7)}[live].bool()
    live_in = torch.tensor([1, 1, 0, 1, 0]).bool()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    got = ops.masked_conv2d(x, w, b, live_out.nonzero().flatten(), live_in.nonzero().flatten(), scale, **conv)
    expected = _dense_masked(x, w, b, live_out.double(), live_in.double(), scale, **conv)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (x, w, b), grad, allow_unused=True, materialize_grads=True)
    g_exp = torch.autograd.grad(expected, (x, w, b), grad)
    for a, e in zip(g_got, g_exp):
        torch.testing.assert_close(a, e)


def test_masked_conv2d_gradcheck(masked_conv_path):
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out_index, in_index = torch.tensor([0, 2, 3]), torch.tensor([1, 3])
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.masked_conv2d(x, w, b, out_index, in_index, None, padding=1), (x, w, b))


def test_masked_conv2d_validates():
    with pytest.raises(ValueError, match="channels"):
        ops.masked_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="int64"):
        ops.masked_conv2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), out_index=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="4-D"):
        ops.masked_conv2d(torch.randn(3, 4, 4), torch.randn(2, 3, 3, 3))


def test_default_backend_override(monkeypatch):
    from attenuation.ops import backends
    cpu_default = "native" if "native" in backends.available_backends() else "reference"
    assert backends.default_backend(torch.device("cpu")) == cpu_default
    ops.set_default_backend("reference")
    try:
        assert backends.default_backend(torch.device("cpu")) == "reference"
    finally:
        ops.set_default_backend(None)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_default_backend("warp-drive")
    monkeypatch.setenv("ATTENUATION_BACKEND", "missing")
    with pytest.raises(ValueError, match="not available"):
        ops.filter_norms([torch.randn(2, 2)])


def test_flat_vectors_and_back():
    """The custom-op form of the per-layer vectors (present tensors + slots) and its inverse."""
    from attenuation.ops.slots import flat_vectors, per_layer_vectors
    a, b, c, d = (torch.randn(3) for _ in range(4))
    per_kind = ([a, None], [None, b], [c, d])               # biases, gammas, betas of two layers
    vectors, slots = flat_vectors(*per_kind)
    assert slots == [0, 6, 2, 7] and all(v is not None for v in vectors)
    rows = per_layer_vectors(2, vectors, slots)
    assert [[t is None for t in row] for row in rows] == [[False, True, False, True, True],
                                                           [True, False, False, True, True]]
    assert torch.equal(rows[0][0], a) and torch.equal(rows[1][1], b) and torch.equal(rows[1][2], d)


# ------------------------------------------------------------------- one validation, every backend

BACKENDS = ops.available_backends()


def _unchanged(tensors, before):
    return all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor,eps,restore,error,match", [
    (0.5, math.nan, False, ValueError, "eps must be finite"), (0.5, math.inf, False, ValueError, "eps must be finite"),
    (math.nan, 0.1, False, ValueError, "factor must be finite"), (-math.inf, 0.1, False, ValueError, "factor"),
    ("0.5", 0.1, False, TypeError, "factor must be a number"), (0.5, None, False, TypeError, "eps must be a number"),
    (True, 0.1, False, TypeError, "factor"), (0.5, 0.1, 1, TypeError, "restore must be True or False")])
def test_attenuate_refuses_bad_scalars_before_any_backend(backend, factor, eps, restore, error, match):
    weights, biases, gammas, betas = _layers()
    status = torch.tensor([0, 1, 1, 0, 0, 1, 0], dtype=torch.uint8)
    mult = torch.tensor([1, .5, .02, 1, 1, .5, 1])
    weak = torch.ones(7, dtype=torch.bool)
    state = [*weights, *gammas, *betas, biases[0], status, mult]
    before = [t.clone() for t in state]
    with pytest.raises(error, match=match):
        ops.attenuate_(weights, biases, gammas, betas, weak, status, mult, factor, eps, restore, backend=backend)
    assert _unchanged(state, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attenuate_and_zero_removed_refuse_bad_tensors(backend):
    weights, biases, gammas, betas = _layers()
    status, mult, weak = torch.zeros(7, dtype=torch.uint8), torch.ones(7), torch.zeros(7, dtype=torch.bool)
    with pytest.raises(ValueError, match="layer 0 bias must be floating"):
        ops.attenuate_(weights, [torch.ones(4, dtype=torch.int64), None], gammas, betas, weak, status, mult, 0.5, 0.1,
                       backend=backend)
    with pytest.raises(ValueError, match="weight 1 must be a floating tensor"):
        ops.zero_removed_([weights[0], weights[1].long()], biases, gammas, betas, status, backend=backend)
    with pytest.raises(ValueError, match=r"layer 1 running mean must be floating of shape \(3,\)"):
        ops.attenuate_(weights, biases, gammas, betas, weak, status, mult, 0.5, 0.1,
                       running_means=[None, torch.ones(4)], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counts,ks,error,match", [
    ([2, 3], torch.tensor([1.0, 1.0]), ValueError, "ks must be an integer tensor"),
    ([2, 3], torch.tensor([True, False]), ValueError, "ks must be an integer tensor"),
    ([2, 3], [1, 1.5], TypeError, "ks must be an int"), ([2, 3], [1, True], TypeError, "ks must be an int"),
    ([2, 3], [-1, 1], ValueError, r"ks\[0\] = -1 is outside \[0, 2\]"),
    ([2, 3], torch.tensor([2, 4]), ValueError, r"ks\[1\] = 4 is outside \[0, 3\]"),
    ([2, 3], torch.tensor([[1, 1]]), ValueError, "2 ks for 2 layers"),
    ([2, 3.0], [1, 1], TypeError, "counts must be an int"), ([True, 4], [1, 1], TypeError, "counts")])
def test_select_weak_refuses_bad_ks_and_counts(backend, counts, ks, error, match):
    with pytest.raises(error, match=match):
        ops.select_weak(torch.rand(5), torch.zeros(5, dtype=torch.bool), counts, ks, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_refuses_integer_scores(backend):
    with pytest.raises(ValueError, match="scores must be floating"):
        ops.select_weak(torch.arange(5), torch.zeros(5, dtype=torch.bool), [2, 3], [1, 1], backend=backend)
    with pytest.raises(ValueError, match="scores must be floating"):
        ops.select_weak_global(torch.arange(5), torch.zeros(5, dtype=torch.bool), [2, 3], 1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(3))
def test_select_weak_bounds_and_integer_kinds_agree_on_every_backend(backend, seed):
    """k = 0 and k = n are valid; ks as a list, numpy ints, an int32 or int64 tensor: one result."""
    g = torch.Generator().manual_seed(seed)
    counts = [1, 7, 0, 13, 4]
    scores = torch.randint(0, 4, (sum(counts),), generator=g).float()
    removed = torch.rand(sum(counts), generator=g) < 0.2
    for ks in ([0, 7, 0, 13, 0], [1, 0, 0, 6, 4]):
        expected = _naive_select(scores.tolist(), removed.tolist(), counts, ks)
        for form in (ks, np.array(ks), torch.tensor(ks, dtype=torch.int32), torch.tensor(ks)):
            assert ops.select_weak(scores, removed, counts, form, backend=backend).tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["out_index", "in_index"])
@pytest.mark.parametrize("index,match", [
    ([-1, 2], "strictly increasing channel indices in"), ([0, 5], "in \\[0, 5\\)"), ([1, 1, 3], "strictly increasing"),
    ([3, 1], "strictly increasing"), ([[0, 1]], "1-D int64"), (torch.tensor([0, 1], dtype=torch.int32), "1-D int64")])
def test_masked_conv2d_refuses_bad_index_lists(backend, name, index, match):
    x, w = torch.randn(2, 5, 6, 6), torch.randn(5, 5, 3, 3)
    index = index if isinstance(index, torch.Tensor) else torch.tensor(index)
    with pytest.raises(ValueError, match=f"{name} must be .*{match}"):
        ops.masked_conv2d(x, w, None, **{name: index}, padding=1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_conv2d_refuses_bad_vectors_dtypes_and_groups(backend):
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3), torch.randn(6)
    cases = [
        (dict(bias=torch.randn(5)), ValueError, r"bias must be floating of shape \(6,\)"),
        (dict(scale=torch.randn(7)), ValueError, r"scale must be floating of shape \(6,\)"),
        (dict(bias=torch.ones(6, dtype=torch.int64)), ValueError, "bias must be floating"),
        (dict(bias=b.double()), ValueError, "bias must have the input's dtype"),
        (dict(x=x.double()), ValueError, "input and weight must have the same dtype"),
        (dict(x=x.long()), ValueError, "input and weight must be floating"),
        (dict(groups=2, w=torch.randn(6, 2, 3, 3), out_index=torch.tensor([0, 1])), ValueError, "index lists need groups == 1, got groups=2"),
        (dict(groups=4, w=torch.randn(6, 1, 3, 3)), ValueError, "groups must be >= 1 and divide the 6"),
        (dict(groups=2.0, w=torch.randn(6, 2, 3, 3)), TypeError, "groups must be an int"),
    ]
    for change, error, match in cases:
        args = {**dict(x=x, w=w, bias=None, scale=None, out_index=None, in_index=None, groups=1), **change}
        with pytest.raises(error, match=match):
            ops.masked_conv2d(args["x"], args["w"], args["bias"], args["out_index"], args["in_index"], args["scale"],
                              padding=1, groups=args["groups"], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_conv2d_valid_edge_cases_agree_on_every_backend(backend):
    """Empty and full index lists, grouped convolution without lists, mixed dtypes under autocast."""
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(2, 4, 6, 6, generator=g), torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, generator=g)
    empty, full = torch.zeros(0, dtype=torch.int64), torch.arange(6)
    expected = _dense_masked(x, w, b, torch.ones(6), None, None, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a backend may say once that it runs the reference for a case
        torch.testing.assert_close(ops.masked_conv2d(x, w, b, full, torch.arange(4), None, padding=1,
                                                     backend=backend), expected)
        assert not ops.masked_conv2d(x, w, b, empty, None, None, padding=1, backend=backend).any()
        torch.testing.assert_close(ops.masked_conv2d(x, w, b, None, empty, None, padding=1, backend=backend),
                                   b.view(1, 6, 1, 1).expand(2, 6, 6, 6))
        wg = torch.randn(6, 2, 3, 3, generator=g)
        torch.testing.assert_close(ops.masked_conv2d(x, wg, b, None, None, None, padding=1, groups=2, backend=backend),
                                   F.conv2d(x, wg, b, padding=1, groups=2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ops.masked_conv2d(x.bfloat16(), w, b, torch.tensor([1, 4]), None, None, padding=1, backend=backend)
        assert y.dtype == torch.bfloat16

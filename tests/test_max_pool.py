"""The channels-last max pool (attenuation/max_pool.py, csrc/cpu/max_pool.cpp) against F.max_pool2d
on fresh random inputs with ties and NaNs: values and gradients bit for bit, the module's fallbacks,
the errors, opcheck and the conversion of a model."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation.channels_last import as_channels_last
from attenuation.layers import find_groups
from attenuation.max_pool import NATIVE, ChannelsLastMaxPool2d, convert_max_pools
from attenuation.models import create_model

needs_native = pytest.mark.skipif(not NATIVE, reason="the native extension was built without the max pool ops")
_ops = torch.ops.attenuation
CL = torch.channels_last

# (N, C, H, W): channel counts below, at and above the 16-lane block, tensors of one window
SHAPES = [(2, 1, 2, 2), (3, 3, 4, 6), (2, 10, 8, 8), (1, 16, 4, 4), (2, 21, 6, 4), (1, 83, 4, 4),
          (5, 17, 2, 2), (1, 40, 2, 2), (4, 33, 2, 6)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _activation(shape, dtype, nans=False):
    """Random values rounded to one decimal (many ties inside windows), some NaN, channels-last."""
    x = torch.randn(shape, dtype=torch.float64).round(decimals=1)
    if nans:
        x[torch.rand(shape) < 0.1] = float("nan")
    return x.to(dtype).contiguous(memory_format=CL)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_op_and_backward_equal_f_max_pool2d(shape, dtype):
    for nans in (False, True):
        x = _activation(shape, dtype, nans).requires_grad_()
        out, codes = _ops.max_pool2x2(x)
        ref = F.max_pool2d(x, 2)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        assert out.is_contiguous(memory_format=CL) and codes.dtype == torch.uint8
        grad = torch.randn(ref.shape, dtype=torch.float64).to(dtype)
        expected, = torch.autograd.grad(ref, x, grad)
        got, = torch.autograd.grad(out, x, grad)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert got.is_contiguous(memory_format=CL)


@needs_native
def test_module_matches_nn_maxpool2d_and_falls_back():
    ref, ours = nn.MaxPool2d(2), convert_max_pools(nn.Sequential(nn.MaxPool2d(2)))[0]
    assert type(ours) is ChannelsLastMaxPool2d
    x = _activation((4, 11, 8, 6), torch.float32, nans=True)
    assert ours._native_applies(x)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0, equal_nan=True)
    odd = _activation((2, 11, 5, 6), torch.float32)   # odd height: PyTorch's floor
    contiguous = x.contiguous()
    sixteen = _activation((2, 16, 4, 4), torch.float32)  # PyTorch's kernel is fast there
    for y in (odd, contiguous, sixteen):
        assert not ours._native_applies(y)
        torch.testing.assert_close(ours(y), ref(y), rtol=0, atol=0, equal_nan=True)
    for other in (nn.MaxPool2d(3), nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                  nn.MaxPool2d(2, return_indices=True), nn.MaxPool2d(2, dilation=2)):
        converted = convert_max_pools(nn.Sequential(other))[0]
        assert type(converted) is ChannelsLastMaxPool2d and not converted._native_applies(x)
        expected, got = other(x), converted(x)
        for a, b in zip(expected if isinstance(expected, tuple) else (expected,),
                        got if isinstance(got, tuple) else (got,)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


@needs_native
def test_bad_arguments_raise_clear_errors():
    x = _activation((2, 4, 4, 4), torch.float32)
    out, codes = _ops.max_pool2x2(x)
    cases = [
        (lambda: _ops.max_pool2x2(x.contiguous()), "must be channels-last contiguous"),
        (lambda: _ops.max_pool2x2(x[:, :, 0]), "must be 4-D"),
        (lambda: _ops.max_pool2x2(x.to(torch.int32)), "float32, float64, float16 or bfloat16"),
        (lambda: _ops.max_pool2x2(x[:, :, :3].contiguous(memory_format=CL)), "H and W must be even"),
        (lambda: _ops.max_pool2x2_backward(out, codes, [2, 4, 4, 6]), "grad_out and codes must have size"),
        (lambda: _ops.max_pool2x2_backward(out, codes.float(), [2, 4, 4, 4]), "codes must be uint8"),
        (lambda: _ops.max_pool2x2_backward(out, codes, [2, 4, 4, 5]), "H and W even"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_native
def test_opcheck():
    x = _activation((3, 5, 4, 6), torch.float32)
    out, codes = _ops.max_pool2x2(x)
    torch.library.opcheck(_ops.max_pool2x2.default, (x.requires_grad_(),))
    torch.library.opcheck(_ops.max_pool2x2_backward.default, (torch.randn_like(out), codes, list(x.shape)))


def test_as_channels_last_converts_and_the_model_still_traces():
    model = create_model("vgg16", 0.25)
    groups = [g.n_channels for g in find_groups(model).groups]
    as_channels_last(model)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(type(m) is ChannelsLastMaxPool2d and m.kernel_size == 2 for m in pools)
    assert [g.n_channels for g in find_groups(model).groups] == groups  # pools stay leaves
    assert model.features[0].weight.is_contiguous(memory_format=CL)


@needs_native
def test_channels_last_network_compiles_with_fullgraph():
    """A conv -> BatchNorm -> ReLU -> max pool block in its as_channels_last form, with a pruned
    channel count, under torch.compile(fullgraph=True): the native BatchNorm and max pool trace
    through their fake kernels and autograd formulas, forward and backward, and agree with eager
    mode (the running statistics included)."""
    import copy

    block = nn.Sequential(nn.Conv2d(3, 11, 3, padding=1), nn.BatchNorm2d(11), nn.ReLU(), nn.MaxPool2d(2))
    models = [as_channels_last(block), as_channels_last(copy.deepcopy(block))]
    x = _activation((4, 3, 8, 8), torch.float32)
    assert models[0][1]._native_applies(models[0][0](x), training=True)

    results = []
    for model, compile_it in zip(models, (True, False)):
        step = (lambda m: lambda x: m(x).square().sum())(model)
        fn = torch.compile(step, backend="aot_eager", fullgraph=True) if compile_it else step
        leaf = x.clone().requires_grad_()
        loss = fn(leaf)
        loss.backward()
        results.append((loss, leaf.grad, model[0].weight.grad, model[1].weight.grad, model[1].running_mean,
                        model[1].running_var, model[1].num_batches_tracked))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager)

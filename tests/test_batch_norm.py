"""The channels-last BatchNorm (attenuation/batch_norm.py, csrc/cpu/batch_norm.cpp) against
F.batch_norm and nn.BatchNorm2d on fresh random inputs: the ops, their gradients, the module's
running statistics over several steps, evaluation mode, the fallbacks and the errors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation.batch_norm import NATIVE, ChannelsLastBatchNorm2d, convert_batch_norms
from attenuation.layers import find_groups
from attenuation.models import create_model

needs_native = pytest.mark.skipif(not NATIVE, reason="the native extension was built without the BatchNorm ops")
_ops = torch.ops.attenuation
CL = torch.channels_last

# (N, C, H, W): odd and vector-multiple channel counts, flat sizes that end inside a period, one pixel
SHAPES = [(4, 1, 3, 3), (3, 3, 5, 7), (2, 10, 6, 6), (5, 16, 4, 4), (2, 32, 3, 3), (2, 21, 3, 5), (4, 83, 2, 2), (7, 13, 1, 1)]


def _activation(shape, dtype=torch.float64, offset=3.0):
    """Random activations with a mean far from zero (what the shifted sums are for), channels-last."""
    x = torch.randn(shape, dtype=torch.float64) * torch.rand(shape[1], 1, 1, dtype=torch.float64).add(0.5) + offset
    return x.to(dtype).contiguous(memory_format=CL)


@needs_native
@pytest.mark.parametrize("shape", SHAPES)
def test_train_op_and_backward_equal_f_batch_norm_in_float64(shape):
    C = shape[1]
    x = _activation(shape).requires_grad_()
    weight = torch.randn(C, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    out, mean, var = _ops.batch_norm_train(x, weight, bias, 1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), grad)

    ref = F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
    expected = torch.autograd.grad(ref, (x, weight, bias), grad)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    assert out.is_contiguous(memory_format=CL) and got[0].is_contiguous(memory_format=CL)


@needs_native
def test_backward_passes_gradcheck():
    x = _activation((3, 5, 2, 3)).requires_grad_()
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: _ops.batch_norm_train(*a, 1e-3)[0], (x, weight, bias))
    torch.autograd.gradcheck(lambda a: _ops.batch_norm_train(a, None, None, 1e-3)[0], (x,))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_float64_reference(dtype):
    shape = (8, 21, 6, 6)
    x = _activation(shape, dtype)
    weight, bias = torch.rand(21) + 0.5, torch.randn(21)
    out, mean, var = _ops.batch_norm_train(x, weight, bias, 1e-5)
    assert out.dtype == dtype and mean.dtype == var.dtype == torch.float32
    x64 = x.double()
    ref = F.batch_norm(x64, None, None, weight.double(), bias.double(), True, 0.1, 1e-5)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


@needs_native
def test_bfloat16_output_rounds_to_nearest_even_like_torch():
    # 1 * (1 + 2^-8) and 1 * (1 + 3 * 2^-8) lie halfway between two bfloat16 values: to the even one
    y = torch.tensor([1.0, 1.0, -3.5, 2.0, float("inf"), float("-inf"), float("nan")]).to(torch.bfloat16)
    scale = torch.tensor([1.00390625, 1.01171875, 1.1, 1e-30, 1.0, 1.0, 1.0])
    out = _ops.channel_affine(y.reshape(1, 7, 1, 1).contiguous(memory_format=CL), scale, torch.zeros(7)).flatten()
    expected = (y.float() * scale).to(torch.bfloat16)
    assert out[0] == 1.0 and out[1] == 1.015625
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    x = torch.randn(16, 7, 5, 5).to(torch.bfloat16).contiguous(memory_format=CL)
    shift = torch.randn(7)
    out = _ops.channel_affine(x, scale[:4].repeat(2)[:7].clamp(0.5, 2), shift)
    expected = torch.addcmul(shift.reshape(1, 7, 1, 1), x.float(), scale[:4].repeat(2)[:7].clamp(0.5, 2).reshape(1, 7, 1, 1))
    torch.testing.assert_close(out.float(), expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


def _module_pair(C, **kwargs):
    ref = nn.BatchNorm2d(C, **kwargs).double()
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    return ref, convert_batch_norms(nn.Sequential(copy.deepcopy(ref)))[0]


@needs_native
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
def test_module_trains_and_evaluates_like_nn_batchnorm2d(kwargs):
    C = 11
    ref, ours = _module_pair(C, **kwargs)
    assert type(ours) is ChannelsLastBatchNorm2d
    for step in range(3):
        x = _activation((4, C, 5, 5), offset=step)
        assert ours._native_applies(x, training=True)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_o = ref(xr), ours(xo)
        torch.testing.assert_close(out_o, out_r, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(out_r)
        out_r.backward(grad)
        out_o.backward(grad)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-9, atol=1e-9)
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-9, msg=name)
    assert ref.state_dict().keys() == ours.state_dict().keys()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-12, atol=1e-12, msg=name)
    ref.eval(), ours.eval()
    x = _activation((2, C, 3, 3))
    with torch.no_grad():
        assert ours._native_applies(x, training=not kwargs.get("track_running_stats", True))
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


@needs_native
def test_module_under_bfloat16_autocast_matches_nn_batchnorm2d():
    ref, ours = _module_pair(21)
    ref, ours = ref.float(), ours.float()
    x = _activation((8, 21, 6, 6), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, out_o = ref(x), ours(x)
    assert out_o.dtype == out_r.dtype == torch.bfloat16
    torch.testing.assert_close(out_o.float(), out_r.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=1e-3)


def test_other_inputs_take_nn_batchnorm2d_forward():
    ref, ours = _module_pair(6)
    contiguous = torch.randn(3, 6, 4, 4, dtype=torch.float64)  # not channels-last
    one_value = _activation((1, 6, 1, 1))                       # one value per channel
    assert ours._native_applies(_activation((3, 6, 4, 4)), training=True)
    assert not ours._native_applies(contiguous, training=True)
    sixteen = convert_batch_norms(nn.Sequential(nn.BatchNorm2d(16)))[0]  # PyTorch's kernel is fast there
    assert not sixteen._native_applies(_activation((3, 16, 4, 4)), training=True)
    assert not ours._native_applies(one_value, training=True)
    torch.testing.assert_close(ours(contiguous), ref(contiguous))
    for module in (ref, ours):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            module(one_value)
    ours.eval()
    needs_grad = _activation((2, 6, 3, 3)).requires_grad_()
    assert not ours._native_applies(needs_grad, training=False)  # evaluation with gradients
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(torch.randn(3, 6, dtype=torch.float64))


@needs_native
def test_bad_arguments_raise_clear_errors():
    x = _activation((2, 4, 3, 3), torch.float32)
    w = torch.ones(4)
    cases = [
        (lambda: _ops.batch_norm_train(x.contiguous(), w, w, 1e-5), "must be channels-last contiguous"),
        (lambda: _ops.batch_norm_train(x[:, :, 0], w, w, 1e-5), "must be 4-D"),
        (lambda: _ops.batch_norm_train(x.to(torch.int32), w, w, 1e-5), "float32, float64, float16 or bfloat16"),
        (lambda: _ops.batch_norm_train(x, torch.ones(5), w, 1e-5), r"weight must have shape \(4,\)"),
        (lambda: _ops.batch_norm_train(x, w, w, 0.0), "eps must be finite and > 0"),
        (lambda: _ops.batch_norm_train(x[:1, :, :1, :1], w, w, 1e-5), "more than 1 value per channel"),
        (lambda: _ops.channel_affine(x, torch.ones(3), w), r"scale must have shape \(4,\)"),
        (lambda: _ops.batch_norm_backward(x[:1], x, w, w, w, 1e-5, [True, True, True]), "grad_out must match x"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_native
def test_opcheck():
    x = _activation((3, 5, 4, 2), torch.float32)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    out, mean, var = _ops.batch_norm_train(x, w, b, 1e-5)
    samples = [
        (_ops.batch_norm_train.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5)),
        (_ops.batch_norm_train.default, (x.detach(), None, None, 1e-5)),
        (_ops.channel_affine.default, (x.detach(), w.detach(), b.detach())),
        (_ops.batch_norm_backward.default, (torch.randn_like(out), x.detach(), w.detach(), mean, var, 1e-5,
                                            [True, True, False])),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_convert_keeps_parameters_and_only_converts_plain_batchnorms():
    model = create_model("resnet20", 0.25)
    params = {name: id(p) for name, p in model.named_parameters()}
    buffers = {name: id(b) for name, b in model.named_buffers()}
    state = copy.deepcopy(model.state_dict())
    groups_before = [g.n_channels for g in find_groups(model).groups]
    convert_batch_norms(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m) is ChannelsLastBatchNorm2d for m in bns)
    assert {name: id(p) for name, p in model.named_parameters()} == params
    assert {name: id(b) for name, b in model.named_buffers()} == buffers
    assert model.state_dict().keys() == state.keys()
    assert [g.n_channels for g in find_groups(model).groups] == groups_before  # BNs stay leaves

    class Custom(nn.BatchNorm2d):
        pass
    holder = nn.Sequential(Custom(3), nn.BatchNorm1d(3))
    convert_batch_norms(holder)
    assert type(holder[0]) is Custom and type(holder[1]) is nn.BatchNorm1d

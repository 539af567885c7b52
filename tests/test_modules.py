"""AttenuatedConv2d is a drop-in nn.Conv2d; convert_model works on any model (its channel groups:
tests/test_groups.py)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from attenuation.modules import AttenuatedConv2d, convert_model


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2, padding=1, dilation=2, bias=False),
                                    dict(groups=2, padding="same"), dict(padding=1, padding_mode="reflect")])
def test_same_constructor_and_output_as_conv2d(kwargs):
    conv = nn.Conv2d(4, 6, 3, **kwargs)
    ours = AttenuatedConv2d(4, 6, 3, **kwargs)
    missing, unexpected = ours.load_state_dict(conv.state_dict())
    assert not missing and not unexpected
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), conv(x), rtol=0, atol=0)


def test_state_dict_round_trip_keeps_masks():
    conv = AttenuatedConv2d(4, 6, 3, padding=1)
    conv.set_live(torch.tensor([1, 0, 1, 1, 0, 1]).bool(), torch.tensor([1, 1, 0, 1]).bool())
    copy_ = AttenuatedConv2d(4, 6, 3, padding=1)
    copy_.load_state_dict(conv.state_dict())
    assert copy_.live_out.tolist() == conv.live_out.tolist() and copy_.live_in.tolist() == conv.live_in.tolist()
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(copy_(x), conv(x))
    plain = nn.Conv2d(4, 6, 3, padding=1)
    plain.load_state_dict({k: v for k, v in conv.state_dict().items() if not k.startswith("live")})


def test_masked_forward_equals_zeroed_dense():
    conv = AttenuatedConv2d(5, 7, 3, padding=1, dtype=torch.float64)
    live_out = torch.tensor([1, 0, 1, 1, 0, 0, 1]).bool()
    live_in = torch.tensor([1, 0, 1, 1, 1]).bool()
    with torch.no_grad():
        conv.weight[~live_out] = 0
        conv.bias[~live_out] = 0
    dense = copy.deepcopy(conv)
    conv.set_live(live_out, live_in)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    x[:, ~live_in] = 0  # a dead input channel carries zeros
    torch.testing.assert_close(conv(x), dense(x))
    assert "live=4/7" in repr(conv)


def test_set_live_validates_shapes():
    conv = AttenuatedConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="live_out"):
        conv.set_live(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="live_in"):
        conv.set_live(None, torch.ones(3, dtype=torch.bool))


def test_convert_model_keeps_parameters_and_output():
    model = _net().eval()
    reference = copy.deepcopy(model)
    weight = model[0].weight
    convert_model(model)
    assert isinstance(model[0], AttenuatedConv2d) and model[0].weight is weight
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_convert_model_without_conv_is_an_error():
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        convert_model(nn.Sequential(nn.Linear(3, 3)))


def test_resnet18_swap_and_forward():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    reference = copy.deepcopy(model)
    convert_model(model)
    assert sum(isinstance(m, AttenuatedConv2d) for m in model.modules()) == 20  # its groups: tests/test_groups.py
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(groups=2, padding=1), dict(groups=4, padding=1),
                                    dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="circular"),
                                    dict(groups=2, padding=2, dilation=2, padding_mode="replicate")])
def test_masks_hold_for_grouped_convs_and_padding_modes(kwargs):
    """The convs the masked op does not take still compute only live outputs from live inputs:
    a dead input channel is never read (NaN there changes nothing), a dead output is zero."""
    torch.manual_seed(0)
    conv = AttenuatedConv2d(4, 8, 3, dtype=torch.float64, **kwargs)
    plain = nn.Conv2d(4, 8, 3, dtype=torch.float64, **kwargs)
    plain.load_state_dict({k: v for k, v in conv.state_dict().items() if not k.startswith("live")})
    live_out, live_in = torch.rand(8) < 0.5, torch.rand(4) < 0.5
    live_out[:2], live_in[:2] = torch.tensor([True, False]), torch.tensor([True, False])
    conv.set_live(live_out, live_in)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    poisoned = x.clone().requires_grad_()
    with torch.no_grad():
        poisoned[:, ~live_in] = float("nan")
    got = conv(poisoned)
    leaf = x.clone().requires_grad_()
    expected = plain(leaf * live_in.view(1, -1, 1, 1)) * live_out.view(1, -1, 1, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(got[:, ~live_out], torch.zeros_like(got[:, ~live_out]))
    grad = torch.randn_like(got)
    got.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(poisoned.grad, leaf.grad, rtol=0, atol=0)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad)


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("dead", ["inputs", "outputs"])
@pytest.mark.parametrize("geometry", [dict(kernel_size=3), dict(kernel_size=4, dilation=2)])
def test_same_padding_with_every_channel_dead(backend, dead, geometry):
    """padding='same' (stride 1: the input's size) when no input or no output channel is live."""
    from attenuation import ops
    if backend not in ops.available_backends():
        pytest.skip(f"no {backend} backend in this environment")
    conv = AttenuatedConv2d(4, 6, padding="same", backend=backend, **geometry)
    none_live = torch.zeros(4 if dead == "inputs" else 6, dtype=torch.bool)
    conv.set_live(*((None, none_live) if dead == "inputs" else (none_live, None)))
    x = torch.randn(2, 4, 7, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend may say once that it runs the reference here
        got = conv(x)
    expected = (conv.bias.detach() if dead == "inputs" else torch.zeros(6)).view(1, 6, 1, 1).expand(2, 6, 7, 9)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

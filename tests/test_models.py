import json
import math

import pytest
import torch
from torch import nn

from attenuation.models import VGG, VGG_CONFIGS, build_model, vgg, vgg_config


@pytest.mark.parametrize("depth, n_convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_forward_shape_and_layout(depth, n_convs):
    torch.manual_seed(0)
    model = vgg(depth, width=0.125, num_classes=7)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_convs
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_block_order():
    model = VGG([4, "M", 6])
    kinds = [type(m) for m in model.features]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                     nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert model.classifier.in_features == 6
    assert model(torch.randn(2, 3, 2, 2)).shape == (2, 10)


def test_vgg16_config():
    assert VGG_CONFIGS[16] == [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                               512, 512, 512, "M", 512, 512, 512, "M"]
    assert vgg_config(16) == VGG_CONFIGS[16]
    assert vgg_config(16) is not VGG_CONFIGS[16]


def test_width_multiplier():
    assert vgg_config(11, 0.5) == [32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M"]
    assert vgg_config(11, 0.3)[:3] == [19, "M", 38]  # rounded, not truncated
    assert set(vgg_config(19, 1e-6)) == {1, "M"}  # never below one channel
    model = vgg(13, width=0.25)
    assert model.features[0].out_channels == 16
    assert model.classifier.in_features == 128


@pytest.mark.parametrize("depth", [10, 0, "16"])
def test_unknown_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        vgg_config(depth)


@pytest.mark.parametrize("width", [0, -0.5, float("nan")])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        vgg_config(16, width)


@pytest.mark.parametrize("config", [[], [0], [8, "X"], [3.0], [True], ["M"], "64"])
def test_bad_config(config):
    with pytest.raises(ValueError, match="config"):
        VGG(config)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        VGG([4], num_classes=0)


def test_init():
    torch.manual_seed(0)
    model = VGG([256], in_channels=3)
    conv, bn = model.features[0], model.features[1]
    expected_std = math.sqrt(2.0 / (256 * 9))  # kaiming normal, fan_out, relu
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.equal(bn.weight, torch.ones(256)) and torch.equal(bn.bias, torch.zeros(256))


def test_spec_round_trip():
    torch.manual_seed(0)
    model = VGG([5, "M", 7, 3, "M"], num_classes=4, in_channels=1)
    spec = json.loads(json.dumps(model.spec()))
    assert spec == {"arch": "vgg", "config": [5, "M", 7, 3, "M"], "num_classes": 4,
                    "in_channels": 1}
    rebuilt = build_model(spec)
    assert isinstance(rebuilt, VGG) and rebuilt.spec() == model.spec()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 4, 4)
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("spec, match", [
    ({"arch": "resnet", "config": [4], "num_classes": 10, "in_channels": 3}, "arch"),
    ({"config": [4], "num_classes": 10, "in_channels": 3}, "arch"),
    ({"arch": "vgg", "num_classes": 10, "in_channels": 3}, "missing"),
    ({"arch": "vgg", "config": [4], "num_classes": 10, "in_channels": 3, "x": 1}, "unexpected"),
    ({"arch": "vgg", "config": [-4], "num_classes": 10, "in_channels": 3}, "config"),
    (["vgg"], "dict"),
])
def test_build_model_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec)

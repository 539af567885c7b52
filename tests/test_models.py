import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from attenuation.layers import find_groups
from attenuation.models import (VGG, VGG_CONFIGS, ResNet, available_models, build_model, create_model,
                                create_model_from_spec, model_spec, model_title, vgg, vgg_config,
                                vgg_depth)
from attenuation.models.resnet import BasicBlock, SubsampleAndPad
from attenuation.modules import convert_model
from attenuation.profiling import count_macs, count_parameters


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


# ---------------------------------------------------------------- CIFAR ResNets and the registry
def _resnet_cost(n: int, width: float, option: str, num_classes: int = 10) -> tuple[int, int]:
    """Parameters and MACs per 32x32 image of the CIFAR ResNet with n blocks per stage, stated
    layer by layer from He et al. 2016 (sec. 4.2): the reference for the built models."""
    c = [max(1, round(16 * width)), max(1, round(32 * width)), max(1, round(64 * width))]
    params, macs = 27 * c[0] + 2 * c[0], 32 * 32 * 27 * c[0]  # stem conv + BN
    c_in = c[0]
    for stage, c_out in enumerate(c):
        positions = (32 >> stage) ** 2
        for block in range(n):
            params += 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out
            macs += positions * (9 * c_in * c_out + 9 * c_out * c_out)
            if option == "B" and (c_in != c_out or (stage > 0 and block == 0)):
                params += c_in * c_out + 2 * c_out
                macs += positions * c_in * c_out
            c_in = c_out
    return params + c_in * num_classes + num_classes, macs + c_in * num_classes


def test_available_models():
    assert available_models() == ["resnet20", "resnet20b", "resnet56", "resnet56b",
                                  "vgg11", "vgg13", "vgg16", "vgg19"]


@pytest.mark.parametrize("name", ["resnet20", "resnet20b", "resnet56", "resnet56b", "vgg11", "vgg19"])
def test_every_model_classifies_a_cifar_batch(name):
    torch.manual_seed(0)
    model = create_model(name, width=0.25, num_classes=7)
    for mode in (model.train, model.eval):
        mode()
        out = model(torch.randn(3, 3, 32, 32))
        assert out.shape == (3, 7) and out.isfinite().all()


@pytest.mark.parametrize("name, n, option", [("resnet20", 3, "A"), ("resnet20b", 3, "B"),
                                             ("resnet56", 9, "A"), ("resnet56b", 9, "B")])
@pytest.mark.parametrize("width", [1.0, 0.3])
def test_resnet_parameters_and_macs(name, n, option, width):
    model = create_model(name, width=width)
    assert (count_parameters(model), count_macs(model)) == _resnet_cost(n, width, option)


def test_resnet56_published_figures():
    """He et al.'s ResNet-56 with the parameter-free shortcut: 0.85M parameters, 125.5M MACs."""
    model = create_model("resnet56")
    assert round(count_parameters(model) / 1e6, 2) == 0.85
    assert round(count_macs(model) / 1e6, 1) == 125.5
    resnet20 = create_model("resnet20")
    assert round(count_parameters(resnet20) / 1e6, 2) == 0.27
    assert round(count_macs(resnet20) / 1e6, 2) == 40.55


@pytest.mark.parametrize("depth, n", [(20, 3), (56, 9)])
def test_resnet_layout(depth, n):
    for option in ("A", "B"):
        model = ResNet(depth, option)
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        assert len(blocks) == 3 * n
        assert [b.conv1.stride for b in blocks] == [(2, 2) if i in (n, 2 * n) else (1, 1)
                                                  for i in range(3 * n)]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.bias is None for c in convs)
        shortcut_convs = [m for b in blocks for m in b.shortcut.modules() if isinstance(m, nn.Conv2d)]
        # depth 6n + 2 counts the 3x3 convs and the classifier; option B adds two 1x1 convs
        assert len(convs) - len(shortcut_convs) == depth - 1
        changing = [blocks[n], blocks[2 * n]]
        if option == "A":
            assert shortcut_convs == []
            assert all(not list(b.shortcut.parameters()) for b in blocks)
            assert all(isinstance(b.shortcut, SubsampleAndPad) for b in changing)
        else:
            assert [(c.kernel_size, c.stride) for c in shortcut_convs] == [((1, 1), (2, 2))] * 2
            assert all(isinstance(b.shortcut[1], nn.BatchNorm2d) for b in changing)
        assert sum(not isinstance(b.shortcut, nn.Identity) for b in blocks) == 2


def test_resnet_width():
    model = create_model("resnet20", width=0.3)
    assert [model.conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [5, 10, 19]  # rounded as vgg_config rounds
    assert model.layer3[0].shortcut.extra == 9 and model.fc.in_features == 19


def test_option_a_shortcut_subsamples_and_pads_after_the_input_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 8)
    y = SubsampleAndPad(2, 4)(x)
    assert y.shape == (2, 9, 4, 4)
    assert torch.equal(y[:, :5], x[:, :, ::2, ::2]) and torch.equal(y[:, 5:], torch.zeros(2, 4, 4, 4))


@pytest.mark.parametrize("option", ["A", "B"])
@pytest.mark.parametrize("c_in, c_out, stride", [(4, 4, 1), (4, 6, 2)])
def test_block_adds_the_shortcut_to_the_residual_branch(option, c_in, c_out, stride):
    """With the second BatchNorm's gamma and beta at zero, the residual branch is zero and the
    block outputs relu(shortcut(x)); with them restored, the branch adds to it."""
    torch.manual_seed(0)
    block = BasicBlock(c_in, c_out, stride, option).eval()
    for bn in [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]:
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, c_in, 8, 8)
    if (c_in, stride) == (c_out, 1):
        shortcut = x
    elif option == "A":
        shortcut = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, c_out - c_in, 4, 4)], 1)
    else:
        shortcut = block.shortcut[1](block.shortcut[0](x))
        assert block.shortcut[0].stride == (2, 2)
    branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), torch.relu(branch + shortcut), rtol=0, atol=0)
    with torch.no_grad():
        block.bn2.weight.zero_(), block.bn2.bias.zero_()
    torch.testing.assert_close(block(x), torch.relu(shortcut), rtol=0, atol=0)


def test_resnet_init():
    torch.manual_seed(0)
    model = ResNet(56)
    weight = model.layer3[5].conv2.weight
    assert weight.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.05)  # fan_out
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any() for bn in bns)


@pytest.mark.parametrize("args, match", [
    ((21,), "6n \\+ 2"), ((2,), "6n \\+ 2"), (("20",), "6n \\+ 2"), ((20, "C"), "shortcut"),
    ((20, "A", 0.0), "width"), ((20, "A", 1.0, 0), "num_classes"),
])
def test_resnet_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ResNet(*args)


def test_registry_vgg_is_the_vgg_of_before():
    """create_model("vgg16", w) is vgg(16, w), weight for weight from the same seed."""
    torch.manual_seed(3)
    registered = create_model("vgg16", 0.25)
    torch.manual_seed(3)
    plain = vgg(16, 0.25)
    assert registered.spec() == plain.spec()
    for (name, a), (_, b) in zip(registered.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_model_names_the_available_ones():
    for name in ("resnet18", "VGG16", "", None, 16):
        with pytest.raises(ValueError, match="unknown model .*available are resnet20, resnet20b, "
                                             "resnet56, resnet56b, vgg11, vgg13, vgg16, vgg19"):
            create_model(name)


@pytest.mark.parametrize("width", [0, -1, float("nan"), float("inf"), "1", True, None])
def test_create_model_bad_width(width):
    with pytest.raises(ValueError, match="width multiplier must be a finite number > 0"):
        create_model("resnet20", width)


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, "10"])
def test_create_model_bad_num_classes(name, num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        create_model(name, 1.0, num_classes)


@pytest.mark.parametrize("name", ["resnet56b", "vgg13"])
def test_spec_survives_deepcopy_and_rebuilds_the_model(name):
    torch.manual_seed(0)
    model = create_model(name, width=0.25, num_classes=4)
    spec = model_spec(copy.deepcopy(model))
    assert spec == {"name": name, "width": 0.25, "num_classes": 4}
    assert json.loads(json.dumps(spec)) == spec
    spec["width"] = 2.0  # a copy: the model's own spec is unchanged
    assert model_spec(model)["width"] == 0.25
    rebuilt = create_model_from_spec(json.loads(json.dumps(model_spec(model))))
    assert type(rebuilt) is type(model) and model_spec(rebuilt) == model_spec(model)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same architecture
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_spec_of_other_models():
    assert model_spec(vgg(11, 0.25)) is None and model_spec(ResNet(20)) is None
    assert model_spec(nn.Linear(2, 2)) is None
    with pytest.raises(TypeError, match="nn.Module"):
        model_spec({"name": "vgg16", "width": 1.0, "num_classes": 10})


@pytest.mark.parametrize("spec, match", [
    (["resnet20", 1.0, 10], "must be a dict, got list"),
    ({"name": "resnet20", "width": 1.0}, "lacks num_classes"),
    ({"name": "resnet20", "width": 1.0, "num_classes": 10, "depth": 20}, "has unexpected depth"),
    ({"width": 1.0, "num_classes": 10, 3: 4}, "lacks name and has unexpected 3"),
    ({"name": "resnet32", "width": 1.0, "num_classes": 10}, "unknown model 'resnet32'"),
    ({"name": "resnet20", "width": "1", "num_classes": 10}, "width multiplier"),
    ({"name": "resnet20", "width": 1.0, "num_classes": 0}, "num_classes"),
])
def test_create_model_from_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        create_model_from_spec(spec)


def test_model_titles():
    assert [model_title(n) for n in ("vgg16", "resnet56", "resnet20b")] == \
        ["VGG-16", "ResNet-56", "ResNet-20 (shortcut B)"]
    assert vgg_depth("vgg13") == 13 and vgg_depth("resnet20") is None and vgg_depth("vgg12") is None


def test_resnet_channel_groups():
    """What find_groups sees in the CIFAR ResNets: each block's conv1 is a group of its own; with
    shortcut B each stage's residual chain (the stage's input conv, stem or 1x1 shortcut, and every
    conv2) is one group; with shortcut A the F.pad leaves the chains out (unprunable)."""
    def chains(groups):
        return [[groups.members[i].name for i in g.members] for g in groups.groups if len(g.members) > 1]

    b = find_groups(convert_model(create_model("resnet20b", 0.25)))
    assert chains(b) == [["conv1", *(f"layer1.{i}.conv2" for i in range(3))],
                         ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"],
                         ["layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"]]
    assert len(b.groups) == 12 and b.unprunable == []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        a = find_groups(convert_model(create_model("resnet20", 0.25)))
    assert chains(a) == [] and [a.members[g.members[0]].name for g in a.groups] == \
        [f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(3)]
    assert set(a.unprunable) == {"conv1", *(f"layer{s}.{i}.conv2" for s in (1, 2, 3) for i in range(3))}

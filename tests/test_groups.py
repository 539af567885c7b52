"""Channel-group discovery (attenuation.layers.find_groups) on the structures the issue names."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation.layers import find_groups
from attenuation.models import vgg
from attenuation.modules import convert_model


def _groups(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the understood models must not warn
        return find_groups(convert_model(model), **kwargs)


def _names(result, group):
    return [result.members[j].name for j in result.groups[group].members]


class Residual(nn.Module):
    """stem -> (conv-bn-relu-conv-bn) + stem -> conv without BN -> pool -> linear"""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv1, self.bn1 = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(x), 1), 1))


def test_residual_add_joins_the_convs_it_adds():
    result = _groups(Residual())
    assert [_names(result, g) for g in range(len(result.groups))] == [["stem", "conv2"], ["conv1"], ["head"]]
    assert [g.n_channels for g in result.groups] == [6, 5, 4]
    assert [g.offset for g in result.groups] == [0, 6, 11]
    by_name = {m.name: m for m in result.members}
    assert by_name["conv2"].channels.tolist() == list(range(6)) and by_name["conv2"].group == 0
    assert by_name["stem"].bn is not None and by_name["head"].bn is None  # a conv with no BN
    readers = {r.name: r for r in result.readers}
    assert readers["conv1"].channels.tolist() == list(range(6))      # reads the residual stream
    assert readers["conv2"].channels.tolist() == list(range(6, 11))  # reads conv1
    assert readers["head"].channels.tolist() == list(range(6))       # reads the sum
    assert readers["fc"].channels.tolist() == list(range(11, 15)) and readers["fc"].features_per_channel == 1
    assert "stem" not in readers  # reads the image only
    assert result.unprunable == []


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.c, self.d = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x)
        return self.fc(torch.flatten(self.d(y).relu()[:, :, :2, :2], 1))


def test_concat_maps_index_ranges_and_flatten_maps_feature_blocks():
    result = _groups(Concat())
    assert _names(result, 0) == ["a", "b", "c"] and result.groups[0].n_channels == 5
    by_name = {m.name: m for m in result.members}
    assert by_name["a"].channels.tolist() == [0, 1] and by_name["b"].channels.tolist() == [2, 3, 4]
    assert by_name["c"].channels.tolist() == [0, 1, 2, 3, 4]
    fc = {r.name: r for r in result.readers}["fc"]
    assert fc.channels.tolist() == [5, 6, 7, 8] and fc.features_per_channel == 4  # 2x2 per channel


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn0 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu6(self.bn1(self.dw(F.relu6(self.bn0(self.expand(x))))))
        return self.fc(self.project(x).mean((2, 3)))


def test_depthwise_conv_follows_its_input():
    result = _groups(Depthwise())
    assert _names(result, 0) == ["expand", "dw"] and result.groups[0].n_channels == 8
    assert {r.name for r in result.readers} == {"dw", "project", "fc"}
    assert {m.name: m.bn is not None for m in result.members} == {"expand": True, "dw": True, "project": False}


class Permuted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1)
        self.register_buffer("perm", torch.tensor([1, 0, 3, 2]))
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(x)[:, self.perm])).mean((2, 3)))


def test_channel_permutation_is_left_unprunable_with_one_warning():
    model = convert_model(Permuted())
    with pytest.warns(UserWarning, match=r"indexes channels\): a$") as record:
        result = find_groups(model)
    assert len(record) == 1
    assert result.unprunable == ["a"] and [m.name for m in result.members] == ["b", "c"]
    b = {r.name: r for r in result.readers}
    assert "b" not in b  # reads only the unprunable, permuted channels


class PadShortcut(nn.Module):
    """Option A's zero-padding shortcut: F.pad on channels is not understood."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        y = self.bn_b(self.b(F.relu(self.c(x)))) + F.pad(x, (0, 0, 0, 0, 2, 2))
        return self.fc(y.mean((2, 3)))


def test_pad_makes_the_groups_it_touches_unprunable():
    with pytest.warns(UserWarning, match="pad"):
        result = find_groups(convert_model(PadShortcut()))
    assert sorted(result.unprunable) == ["a", "b"] and [m.name for m in result.members] == ["c"]


def test_batchnorm_not_after_a_conv_and_scalar_add_are_not_understood():
    class PostAddNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.d(self.bn(self.a(x) + self.b(x)) + (self.c(x) + 1.0)).mean((2, 3)).sum(1, keepdim=True)

    with pytest.warns(UserWarning) as record:
        result = find_groups(convert_model(PostAddNorm()))
    assert sorted(result.unprunable) == ["a", "b", "c", "d"]
    assert "BatchNorm not directly after a conv" in str(record[0].message)


def test_vgg_every_conv_is_its_own_group():
    model = vgg(11, 0.125)
    result = _groups(model)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [m.name for m in result.members] == convs
    assert all(g.members == [i] for i, g in enumerate(result.groups))
    assert all(torch.equal(m.channels, torch.arange(m.n_filters)) for m in result.members)
    assert [r.name for r in result.readers] == convs[1:] + ["classifier"]
    for reader, group in zip(result.readers, result.groups):
        assert reader.channels.tolist() == list(range(group.offset, group.offset + group.n_channels))


def test_ignored_conv_blocks_its_group_without_a_warning():
    result = _groups(Residual(), ignored=["conv2"])
    assert [m.name for m in result.members] == ["conv1", "head"]
    assert result.unprunable == ["stem"]  # joined with the ignored conv2
    readers = {r.name: r for r in result.readers}
    assert readers["conv2"].channels.tolist() == [0, 1, 2, 3, 4]  # an ignored conv still reads
    with pytest.raises(ValueError, match="not found"):
        find_groups(convert_model(Residual()), ignored=["nope"])


def test_untraceable_model_is_refused_with_the_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.a(-x)

    with pytest.raises(ValueError, match="cannot trace Branchy"):
        find_groups(convert_model(Branchy()))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_are_understood(name):
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=10)
    result = _groups(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert result.unprunable == [] and sorted(m.name for m in result.members) == sorted(convs)
    if name == "resnet18":  # the stem and the second convs of layer1's blocks are one residual stream
        assert _names(result, 0) == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    else:  # each depthwise conv is in its expansion conv's group
        depthwise = [m for m in result.members if m.conv.groups > 1]
        assert depthwise and all(len(result.groups[m.group].members) >= 2 for m in depthwise)

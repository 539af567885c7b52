"""Physical removal (attenuation.surgery): the removed network computes exactly what the masked one
computes (removed group channels zeroed in every member, the readers' live_in set, as the engine
keeps them), on every structure find_groups understands; the optimizer follows; save / load."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from attenuation.layers import find_groups
from attenuation.models import VGG, create_model, model_spec, vgg
from attenuation.modules import AttenuatedConv2d, convert_model
from attenuation.surgery import PRUNED_FORMAT, load_pruned, pruned_architecture, remove_filters, save_pruned

TOL = dict(rtol=1e-9, atol=1e-9)


class Net(nn.Module):
    """The structures removal must follow: an identity and a projection shortcut (a conv with a
    bias), a depthwise conv, a concatenation, a conv with a bias and no BatchNorm, and a flatten
    into a Linear that reads 4 features per channel."""

    def __init__(self):
        super().__init__()
        def conv_bn(c_in, c_out, stride=1):
            return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.stem, self.stem_bn = conv_bn(3, 8)
        self.a1, self.a1_bn = conv_bn(8, 6)
        self.a2, self.a2_bn = conv_bn(6, 8)
        self.b1, self.b1_bn = conv_bn(8, 12, stride=2)
        self.b2, self.b2_bn = conv_bn(12, 12)
        self.short, self.short_bn = nn.Conv2d(8, 12, 1, 2), nn.BatchNorm2d(12)
        self.expand, self.expand_bn = nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.dw_bn = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.left = nn.Conv2d(16, 5, 1)
        self.right, self.right_bn = conv_bn(12, 7)
        self.fc = nn.Linear(4 * (5 + 7 + 12), 10)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.a2_bn(self.a2(F.relu(self.a1_bn(self.a1(x))))) + x)
        x = F.relu(self.b2_bn(self.b2(F.relu(self.b1_bn(self.b1(x))))) + self.short_bn(self.short(x)))
        y = F.relu6(self.dw_bn(self.dw(F.relu6(self.expand_bn(self.expand(x))))))
        z = torch.cat([self.left(y), F.relu(self.right_bn(self.right(x))), x], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 2), 1))


def mask_like_the_engine(model, channel_keep, groups=None):
    """Zero the dropped group channels in every member (weight row, bias, gamma, beta) and set the
    live masks: members' live_out, readers' live_in. Returns the members' keep masks."""
    groups = groups or find_groups(model)
    live_out, live_in, keep = {}, {}, []
    with torch.no_grad():
        for member in groups.members:
            k = channel_keep[groups.groups[member.group].offset + member.channels]
            member.conv.weight[~k] = 0
            for p in (member.conv.bias, *((member.bn.weight, member.bn.bias) if member.bn else ())):
                if p is not None:
                    p[~k] = 0
            live_out[member.name] = k
            keep.append(k)
    for reader in groups.readers:
        if isinstance(reader.module, AttenuatedConv2d):
            live_in[reader.name] = (reader.channels < 0) | channel_keep[reader.channels.clamp(min=0)]
    for name, module in model.named_modules():
        if isinstance(module, AttenuatedConv2d):
            module.set_live(live_out.get(name), live_in.get(name))
    return keep


def random_keep(groups, generator):
    """A random group-channel mask: the first group keeps everything, the second one channel, the
    others a random non-empty subset."""
    channel_keep = torch.rand(groups.n_channels, generator=generator) > 0.4
    for i, group in enumerate(groups.groups):
        part = channel_keep[group.offset:group.offset + group.n_channels]
        if i < 2:
            part.fill_(i == 0)
        part[torch.randint(group.n_channels, (1,), generator=generator)] = True
    return channel_keep


def pruned_at_random(model, seed=0):
    """`model` converted, in float64, with random BatchNorm affines, random group channels removed
    as the engine removes them, and BatchNorm statistics from two training passes. Returns
    (model, keep masks, group-channel mask)."""
    torch.manual_seed(seed)
    model = convert_model(model).double()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    groups = find_groups(model)
    channel_keep = random_keep(groups, torch.Generator().manual_seed(seed))
    keep = mask_like_the_engine(model, channel_keep, groups)
    model.train()
    for _ in range(2):
        model(torch.randn(8, 3, 32, 32, dtype=torch.float64))
    return model, keep, channel_keep


def set_mode(model, train):
    """Train or eval mode, dropout off: a dropout mask is drawn per feature, so its draws change
    with the width."""
    model.train(train)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()


def assert_same_function(model, small):
    """Same output in train mode (BatchNorm batch statistics; the running ones are updated alike)
    and then in eval mode (the running statistics)."""
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    training = model.training
    for train in (True, False):
        set_mode(model, train), set_mode(small, train)
        torch.testing.assert_close(small(x), model(x), **TOL)
    model.train(training), small.train(training)


def assert_removed(model, small, keep):
    """`small` is `model` without the dropped channels: plain convs, member widths as kept."""
    groups = find_groups(model)
    assert any(not k.all() for k in keep)
    small_modules = dict(small.named_modules())
    for member, k in zip(groups.members, keep):
        assert small_modules[member.name].out_channels == int(k.sum()), member.name
    assert all(type(m) is nn.Conv2d for m in small.modules() if isinstance(m, nn.Conv2d))
    assert all(t.dtype == torch.float64 for t in small.state_dict().values() if t.is_floating_point())
    assert_same_function(model, small)


MODELS = {
    "vgg11": lambda: vgg(11, width=0.125),
    "net": Net,
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_removed_equals_masked(name):
    model, keep, _ = pruned_at_random(MODELS[name]())
    before = copy.deepcopy(model.state_dict())
    small = remove_filters(model, keep)
    assert type(small) is type(model) and small.training
    assert_removed(model, small, keep)
    assert model.training and all(torch.equal(t, before[k]) for k, t in model.state_dict().items()
                                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    # by default the zero channels are the dropped ones
    by_zeros = remove_filters(model)
    assert [p.shape for p in by_zeros.parameters()] == [p.shape for p in small.parameters()]
    assert_same_function(model, by_zeros)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_removed_equals_masked_in_eval_mode_too(seed):
    model, keep, _ = pruned_at_random(Net(), seed)
    model.eval()
    small = remove_filters(model, keep)
    assert not small.training
    assert_removed(model, small, keep)


def test_input_is_not_modified_and_result_is_independent():
    model, keep, _ = pruned_at_random(Net())
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    small = remove_filters(model, keep)
    assert [type(m) for m in model.modules()] == types
    with torch.no_grad():
        for t in small.state_dict().values():
            t.add_(1)
    small(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_keep_as_a_dict_of_conv_names():
    model, keep, _ = pruned_at_random(Net(), seed=4)
    members = find_groups(model).members
    by_name = {m.name: k for m, k in zip(members, keep) if not k.all()}
    assert 0 < len(by_name) < len(members)  # the absent convs keep everything
    small = remove_filters(model, by_name)
    assert [p.shape for p in small.parameters()] == \
        [p.shape for p in remove_filters(model, keep).parameters()]
    assert_same_function(model, small)


def test_partly_zeroed_group_channel_is_kept():
    model = convert_model(Net())
    with torch.no_grad():  # stem and a2 share channel 0 (identity shortcut)
        model.a2_bn.bias.fill_(0.1)
        model.stem.weight[0] = 0
        model.stem_bn.weight[0] = model.stem_bn.bias[0] = 0
    assert remove_filters(model).stem.out_channels == 8
    with torch.no_grad():
        model.a2.weight[0] = 0
        model.a2_bn.weight[0] = 0
    assert remove_filters(model).stem.out_channels == 8  # a2's beta still non-zero
    with torch.no_grad():
        model.a2_bn.bias[0] = 0
    small = remove_filters(model)
    assert small.stem.out_channels == small.a2.out_channels == small.a1.in_channels == 7


def test_zero_filter_behind_a_batchnorm_without_affine_is_kept():
    """Its eval-mode output, -running_mean / sqrt(running_var + eps), is not zero."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[1] = model[0].bias[1] = 0
    assert remove_filters(model)[0].out_channels == 4
    model[1] = nn.BatchNorm2d(4)
    with torch.no_grad():
        model[1].weight[1] = 0
    assert remove_filters(model)[0].out_channels == remove_filters(model)[4].in_features == 3


def test_ignored_convs_leave_their_groups_whole():
    """The masks of a pruner that ignores convs: one per member of find_groups(model, ignored)."""
    model, _, _ = pruned_at_random(Net(), seed=8)
    groups = find_groups(model, ignored=["a2"])
    keep = [torch.ones(m.n_filters, dtype=torch.bool) for m in groups.members]
    keep[[m.name for m in groups.members].index("a1")][:2] = False
    small = remove_filters(model, keep, ignored=["a2"])
    assert (small.a1.out_channels, small.a2.in_channels) == (4, 4)
    assert small.stem.out_channels == small.a2.out_channels == 8  # joined with the ignored a2


def test_round_to_rounds_each_group_up_with_its_lowest_dropped_channels():
    model, keep, channel_keep = pruned_at_random(Net(), seed=5)
    groups = find_groups(model)
    small = remove_filters(model, keep, round_to=4)
    rounded = channel_keep.clone()
    for group in groups.groups:
        part = rounded[group.offset:group.offset + group.n_channels]
        kept = int(part.sum())
        count = min(group.n_channels, -(-kept // 4) * 4)
        part[(~part).nonzero().flatten()[:count - kept]] = True
        assert count % 4 == 0 or count == group.n_channels
    modules = dict(small.named_modules())
    for member in groups.members:
        want = int(rounded[groups.groups[member.group].offset + member.channels].sum())
        assert modules[member.name].out_channels == want, member.name
    assert_same_function(model, small)  # the extra channels are zero


def sgd_step(model, opt, x, y, channel_keep=None):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if channel_keep is not None:  # the engine zeroes removed channels after every step
        mask_like_the_engine(model, channel_keep)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
], ids=["sgd", "adam", "adamw-amsgrad"])
def test_optimizer_follows_the_removal(make_opt):
    """Training the removed network continues training the masked one: the optimizer holds the
    new parameters, with their state sliced alike."""
    model, keep, channel_keep = pruned_at_random(Net(), seed=6)
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = make_opt([{"params": list(model.parameters())}, {"params": [extra]}])
    batches = [(torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(10, (8,)))
               for _ in range(4)]
    for x, y in batches[:3]:
        extra.grad = torch.ones_like(extra)
        sgd_step(model, opt, x, y, channel_keep)

    ref = copy.deepcopy(model)
    ref_opt = make_opt([{"params": list(ref.parameters())}, {"params": [extra.detach().clone()]}])
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    extra_state = {k: v.clone() for k, v in opt.state[extra].items()}

    small = remove_filters(model, keep, optimizer=opt)
    assert opt.param_groups[0]["params"] == list(small.parameters())
    assert opt.param_groups[1]["params"] == [extra]
    assert all(torch.equal(opt.state[extra][k], v) for k, v in extra_state.items())
    assert not any(p in opt.state for p in model.parameters())
    assert all(p.grad.shape == p.shape for p in small.parameters())

    x, y = batches[3]
    sgd_step(ref, ref_opt, x, y, channel_keep)
    sgd_step(small, opt, x, y)
    assert_same_function(ref, small)


def test_keep_errors():
    model = convert_model(Net())
    members = find_groups(model).members
    keep = [torch.ones(m.n_filters, dtype=torch.bool) for m in members]
    with pytest.raises(ValueError, match=f"{len(members) - 1} masks but the model has {len(members)}"):
        remove_filters(model, keep[:-1])
    with pytest.raises(TypeError, match="bool"):
        remove_filters(model, [k.float() for k in keep])
    with pytest.raises(ValueError, match=r"stem has shape \(7,\), expected \(8,\)"):
        remove_filters(model, [keep[0][:-1]] + keep[1:])
    with pytest.raises(TypeError, match="list of bool tensors"):
        remove_filters(model, keep[0])
    with pytest.raises(ValueError, match="'nope', which is not a conv"):
        remove_filters(model, {"nope": keep[0]})
    with pytest.raises(ValueError, match="'stem', which is not prunable"):
        remove_filters(model, {"stem": keep[0]}, ignored=["a2"])  # joined with the ignored a2
    with pytest.raises(ValueError, match="round_to"):
        remove_filters(model, round_to=0)
    with pytest.raises(TypeError, match="optimizer"):
        remove_filters(model, optimizer=[])
    stem_drops_0 = torch.ones(8, dtype=torch.bool)
    stem_drops_0[0] = False
    with pytest.raises(ValueError, match=r"a2\[0\] kept but stem\[0\] dropped"):
        remove_filters(model, {"stem": stem_drops_0})
    with pytest.raises(ValueError, match="group of expand, dw would be left with no channel"):
        remove_filters(model, {"expand": torch.zeros(16, dtype=torch.bool),
                               "dw": torch.zeros(16, dtype=torch.bool)})


def test_all_zero_group_is_an_error():
    model = vgg(11, width=0.125)
    with torch.no_grad():
        model.features[4].weight.zero_()
        model.features[5].weight.zero_()
        model.features[5].bias.zero_()
    with pytest.raises(ValueError, match=r"group of features\.4 would be left with no channel"):
        remove_filters(model)


REGISTRY = {"resnet20": 0.5, "resnet20b": 0.5, "resnet56": 0.25, "resnet56b": 0.25}


@pytest.mark.filterwarnings("ignore:attenuation:UserWarning")  # shortcut A's pad: unprunable convs
@pytest.mark.parametrize("name", list(REGISTRY))
def test_cifar_resnets_removed_equal_masked_and_round_trip(name, tmp_path):
    model, keep, _ = pruned_at_random(create_model(name, REGISTRY[name]))
    small = remove_filters(model, keep)
    assert_removed(model, small, keep)
    save_pruned(small, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt")
    assert type(loaded) is type(small) and model_spec(loaded) == model_spec(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    small.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    model, keep, _ = pruned_at_random(create_model("vgg11", 0.125), seed=7)
    small = remove_filters(model, keep)
    path = tmp_path / "pruned.pt"
    save_pruned(small, path)
    assert os.listdir(tmp_path) == ["pruned.pt"]  # no temp file left behind
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == PRUNED_FORMAT == "attenuation.pruned_model/2"
    assert checkpoint["spec"] == {"name": "vgg11", "width": 0.125, "num_classes": 10}
    assert checkpoint["channels"] == {name: m.out_channels for name, m in small.named_modules()
                                      if isinstance(m, nn.Conv2d)}
    assert checkpoint == {"format": PRUNED_FORMAT, **pruned_architecture(small),
                          "state_dict": checkpoint["state_dict"]}
    del model
    loaded = load_pruned(path)
    assert loaded.training and all(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    small.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    save_pruned(loaded, path)  # overwriting is fine; the loaded model keeps its spec
    assert load_pruned(str(path)).features[0].out_channels == small.features[0].out_channels


def test_reads_the_vgg_format_1(tmp_path):
    config = [5, "M", 7, "M", 6, "M", 3, "M", 4, "M"]
    old = VGG(config).eval()
    path = tmp_path / "old.pt"
    torch.save({"format": "attenuation.pruned_model/1", "spec": old.spec(),
                "state_dict": old.state_dict()}, path)
    loaded = load_pruned(path).eval()
    assert isinstance(loaded, VGG) and loaded.config == config
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), old(x), rtol=0, atol=0)


def test_save_writes_a_plain_file_atomically(tmp_path, monkeypatch):
    small = remove_filters(create_model("vgg11", 0.125))
    saved = os.umask(0o022)
    try:
        save_pruned(small, tmp_path / "pruned.pt")
    finally:
        os.umask(saved)
    assert os.stat(tmp_path / "pruned.pt").st_mode & 0o777 == 0o644  # as open() makes it
    before = (tmp_path / "pruned.pt").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(small, tmp_path / "pruned.pt")
    assert (tmp_path / "pruned.pt").read_bytes() == before and os.listdir(tmp_path) == ["pruned.pt"]


def test_save_needs_a_removed_registry_model(tmp_path):
    with pytest.raises(TypeError, match="Linear was not made by attenuation.models.create_model"):
        save_pruned(nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(TypeError, match="VGG was not made by"):
        save_pruned(vgg(11, width=0.125), tmp_path / "x.pt")
    with pytest.raises(TypeError, match="still has AttenuatedConv2d layers .*remove_filters"):
        save_pruned(convert_model(create_model("vgg11", 0.125)), tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pruned(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_pruned(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="is not an 'attenuation.pruned_model/2' checkpoint"):
        load_pruned(other)
    path = tmp_path / "pruned.pt"
    save_pruned(remove_filters(create_model("resnet20b", 0.25)), path)
    checkpoint = torch.load(path, weights_only=True)
    for change, error in [
            (lambda c: c["channels"].update({"layer1.0.conv1": 3}), "does not match its architecture"),
            (lambda c: c["channels"].pop("layer1.0.conv1"), "no channel count for layer1.0.conv1"),
            (lambda c: c["channels"].update({"conv1": 0}), "output channels > 0"),
            (lambda c: c["spec"].update({"name": "resnet7"}), "does not describe a model.*unknown model")]:
        broken = copy.deepcopy(checkpoint)
        change(broken)
        torch.save(broken, path)
        with pytest.raises(ValueError, match=error):
            load_pruned(path)

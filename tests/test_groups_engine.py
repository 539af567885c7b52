"""The engine over channel groups (docs/METHOD.md, "Channel groups"): a group channel is one filter
of every conv joined through it, attenuated, removed and recorded as one unit."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation import ops
from attenuation.layers import find_groups
from attenuation.methods import method_config
from attenuation import Pruner, PruningConfig

A, W, R = ops.ACTIVE, ops.WEAK, ops.REMOVED


class Residual(nn.Module):
    """Two convs with BatchNorms joined by an add (one group of 6 channels), then a conv reading
    the sum and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.b, self.bn_b = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.joined = nn.Identity()  # the sum, for a forward hook
        self.c = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        y = self.joined(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c(F.relu(y))), 1).flatten(1))


class Depthwise(nn.Module):
    """MobileNetV2's expand -> depthwise -> project, each with a BatchNorm: the depthwise conv is
    in its input's group."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn0 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.after_dw = nn.Identity()
        self.project, self.bn2 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.after_dw(F.relu6(self.bn1(self.dw(F.relu6(self.bn0(self.expand(x)))))))
        return self.fc(self.bn2(self.project(x)).mean((2, 3)))


class Uneven(nn.Module):
    """a's 3 channels plus [e, e, f]: group channel 0 is {a0, a1, e0} (three filters), channel 1
    is {a2, f0} (two); g reads channels [0, 0, 1]."""

    def __init__(self):
        super().__init__()
        self.a, self.e, self.f = nn.Conv2d(3, 3, 1, bias=False), nn.Conv2d(3, 1, 1, bias=False), nn.Conv2d(3, 1, 1, bias=False)
        self.g = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        e = self.e(x)
        y = self.a(x) + torch.cat([e, e, self.f(x)], dim=1)
        return self.fc(self.g(F.relu(y)).mean((2, 3)))


def _randomise(model, seed=0):
    """Fresh random parameters and BatchNorm statistics (never the ones and zeros of a new BN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
    return model


def _train(model, pruner, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    return opt


def _captured(model, module):
    out = []
    module.register_forward_hook(lambda m, i, o: out.append(o.detach()))
    return out


def test_the_pruner_works_on_the_groups_find_groups_gives():
    model = Residual()
    pruner = Pruner(model, PruningConfig())
    groups = find_groups(model)
    assert [m.name for m in pruner.layers] == [m.name for m in groups.members] == ["a", "b", "c"]
    assert pruner.counts == [6, 5] and pruner.offsets == [0, 6, 11]
    assert pruner.status.shape == (11,)
    assert [f["name"] for f in pruner.fates()] == ["a", "c"]  # a group is named by its first member
    assert pruner.layout.filter_channel.tolist() == list(range(6)) * 2 + list(range(6, 11))


def test_an_attenuation_scales_every_member_of_a_group_channel():
    model = _randomise(Residual())
    before = copy.deepcopy(model)
    pruner = Pruner(model, PruningConfig(ratio=0.5, ramp="constant", factor=0.5, eps=0.01, interval=1))
    pruner.start(10)
    pruner.step()  # one attenuation step, no training: weak filters are scaled exactly by 0.5
    l1 = lambda conv: conv.weight.detach().abs().flatten(1).sum(1)  # noqa: E731
    scores = l1(before.a) + l1(before.b)  # "sum" over the group channel's two filters
    weak = torch.zeros(6, dtype=torch.bool)
    weak[torch.sort(scores, stable=True).indices[:3]] = True
    assert pruner.status[:6].tolist() == [W if w else A for w in weak.tolist()]
    assert int((pruner.status[6:] == W).sum()) == 2  # c's group of 5: floor(0.5 * 5)
    scale = torch.where(weak, 0.5, 1.0)
    for name in ("a", "b", "bn_a", "bn_b"):
        for key, old in getattr(before, name).state_dict().items():
            new = getattr(model, name).state_dict()[key]
            if key == "num_batches_tracked" or key.startswith("live_"):
                continue
            factor = scale.square() if key == "running_var" else scale
            torch.testing.assert_close(new, old * factor.view(-1, *[1] * (old.dim() - 1)), rtol=0, atol=0,
                                       msg=f"{name}.{key}")
    assert torch.equal(pruner.multiplier[:6], scale)


@pytest.mark.parametrize("method", ["hard", "attenuation", "sfp"])
def test_a_removed_channel_is_zero_after_the_add_in_train_and_eval_mode(method):
    """The bug of issue 12: pruned conv by conv, a removed filter's channel came back non-zero
    after the residual add. Pruned as one group channel it is exactly zero there, while training
    goes on (momentum and weight decay) and after it, in both modes."""
    torch.manual_seed(0)
    model = _randomise(Residual())
    config = method_config(method, ratio=0.5, interval=2, **({"factor": 0.3, "eps": 0.05} if method == "attenuation" else {}))
    pruner = Pruner(model, config)
    pruner.start(12, steps_per_epoch=4)
    _train(model, pruner, 12)
    pruner.finish()
    _train(model, pruner, 3, seed=1)  # recovery: removed channels must stay removed
    removed = pruner.status[:6] == R
    assert int(removed.sum()) == 3 and (pruner.status == W).sum() == 0
    keep_a, keep_b, keep_c = pruner.keep_masks()
    assert torch.equal(keep_a, ~removed) and torch.equal(keep_b, ~removed) and keep_c.sum() == 3
    assert torch.equal(model.c.live_in, ~removed)  # the reader of the sum
    joined = _captured(model, model.joined)
    x = torch.randn(4, 3, 6, 6)
    for train in (True, False):
        model.train(train)
        model(x)
        assert joined[-1][:, removed].abs().max() == 0, f"train={train}"
        assert joined[-1][:, ~removed].abs().amin(dim=(0, 2, 3)).max() > 0


def test_the_masked_model_computes_what_plain_convs_compute():
    """Live masks follow the group channels (members' outputs, readers' inputs): the masked model
    equals an unmasked copy of the same weights."""
    torch.manual_seed(0)
    for model in (_randomise(Residual()), _randomise(Depthwise()), _randomise(Uneven())):
        plain = copy.deepcopy(model)
        pruner = Pruner(model, method_config("hard", ratio=0.5, interval=1))
        pruner.start(2)
        _train(model, pruner, 2)
        pruner.sync_live()
        assert any(not layer.conv.live_out.all() for layer in pruner.layers)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "live_" not in k}, strict=False)
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        for train in (False, True):
            model.double().train(train)
            plain.double().train(train)
            torch.testing.assert_close(model(x), plain(x), rtol=1e-10, atol=1e-10)


def test_the_depthwise_conv_is_attenuated_and_removed_with_its_input():
    model = _randomise(Depthwise())
    pruner = Pruner(model, method_config("hard", ratio=0.25, interval=1))
    assert [m.name for m in pruner.layers] == ["expand", "dw", "project"] and pruner.counts == [8, 4]
    pruner.start(1)
    pruner.step()
    removed = pruner.status[:8] == R
    assert int(removed.sum()) == 2
    pruner.sync_live()
    assert torch.equal(model.expand.live_out, ~removed) and torch.equal(model.dw.live_out, ~removed)
    assert torch.equal(model.dw.live_in, ~removed) and torch.equal(model.project.live_in, ~removed)
    for tensor in (model.expand.weight, model.dw.weight, model.bn0.weight, model.bn1.bias, model.bn1.running_var):
        assert tensor.detach()[removed].abs().max() == 0 and tensor.detach()[~removed].abs().min() > 0
    after_dw = _captured(model, model.after_dw)
    for train in (True, False):
        model.train(train)
        model(torch.randn(2, 3, 6, 6))
        assert after_dw[-1][:, removed].abs().max() == 0


def _set_l1(conv, norms):
    """Each filter's weights: its L1 norm in its first entry, zeros elsewhere."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 0, 0] = torch.tensor(norms)


@pytest.mark.parametrize("how", ["sum", "mean", "max"])
def test_a_group_channel_scores_the_reduction_of_its_filters_scores(how):
    """The literal rule: the group channel's score is the sum, the mean or the max of the member
    filters' criterion scores, over however many filters (of however many members) it holds."""
    model = _randomise(Uneven(), seed=4)
    pruner = Pruner(model, PruningConfig(group_reduce=how))
    assert pruner.counts == [2, 2] and pruner.layout.filter_channel.tolist() == [0, 0, 1, 0, 1, 2, 3]
    l1 = [model.a.weight.detach().abs().flatten(1).sum(1), model.e.weight.detach().abs().flatten(1).sum(1),
          model.f.weight.detach().abs().flatten(1).sum(1)]
    filters = [[l1[0][0], l1[0][1], l1[1][0]], [l1[0][2], l1[2][0]]]
    reduce = {"sum": sum, "mean": lambda v: sum(v) / len(v), "max": max}[how]
    expected = torch.stack([reduce(v) for v in filters])
    torch.testing.assert_close(pruner.scores()[:2], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(pruner.scores()[2:], model.g.weight.detach().abs().flatten(1).sum(1), rtol=0, atol=0)


@pytest.mark.parametrize("channel_0, channel_1, weakest", [
    # (a0, a1, e0), (a2, f0): channel 0 has three filters, channel 1 two
    ([1.0, 1.0, 1.0], [1.2, 1.2], {"sum": 1, "mean": 0, "max": 0}),
    ([1.0, 1.0, 1.0], [0.2, 1.5], {"sum": 1, "mean": 1, "max": 0}),
])
def test_the_reduction_decides_which_channel_is_weak(channel_0, channel_1, weakest):
    for how, expected in weakest.items():
        model = Uneven()
        _set_l1(model.a, [channel_0[0], channel_0[1], channel_1[0]])
        _set_l1(model.e, [channel_0[2]])
        _set_l1(model.f, [channel_1[1]])
        pruner = Pruner(model, PruningConfig(ratio=0.5, ramp="constant", factor=0.5, interval=1, group_reduce=how))
        pruner.start(4)
        pruner.step()
        assert pruner.status[:2].tolist() == [W if c == expected else A for c in (0, 1)], how
        # every filter of the weak channel halved, a member's two filters (a0, a1) included
        halved = {0: ([0.5, 0.5, 1.0], 0.5, 1.0), 1: ([1.0, 1.0, 0.5], 1.0, 0.5)}[expected]
        a, e, f = (m.weight.detach()[:, 0, 0, 0] for m in (model.a, model.e, model.f))
        torch.testing.assert_close(a, torch.tensor(halved[0]) * torch.tensor(channel_0[:2] + channel_1[:1]))
        torch.testing.assert_close(torch.cat([e, f]), torch.tensor([halved[1] * channel_0[2], halved[2] * channel_1[1]]))


def test_a_reader_sees_each_input_channel_as_its_group_channel():
    model = Uneven()
    _set_l1(model.a, [1.0, 1.0, 5.0])
    _set_l1(model.e, [1.0])
    _set_l1(model.f, [5.0])
    pruner = Pruner(model, method_config("hard", ratio=0.5, interval=1))
    pruner.start(1)
    pruner.step()
    assert pruner.status[:2].tolist() == [R, A]
    assert [m.tolist() for m in pruner.keep_masks()[:3]] == [[False, False, True], [False], [True]]
    pruner.sync_live()
    assert model.g.live_in.tolist() == [False, False, True]  # g reads channels [0, 0, 1]


def test_global_scope_selects_over_all_group_channels():
    model = _randomise(Residual())
    pruner = Pruner(model, method_config("hard", ratio=0.5, scope="global", interval=1))
    pruner.start(1)
    pruner.step()
    per_group = [int(s.sum()) for s in (pruner.status == R).split(pruner.counts)]
    assert sum(per_group) in (math.floor(0.5 * 11) - 1, math.floor(0.5 * 11))
    assert all(n < count for n, count in zip(per_group, pruner.counts))  # each group keeps one


def test_fates_and_history_are_per_group():
    model = _randomise(Depthwise())
    pruner = Pruner(model, PruningConfig(criterion="random", ratio=0.5, factor=0.5, eps=0.2, interval=1))
    pruner.start(8)
    _train(model, pruner, 8)
    pruner.finish()
    fates = pruner.fates()
    assert [f["name"] for f in fates] == ["expand", "project"]
    assert [len(f["removed_at"]) for f in fates] == [8, 4]
    history = pruner.status_history()
    assert list(history) == ["expand", "project"] and [h.shape[1] for h in history.values()] == [8, 4]
    removed = torch.cat([h[-1] for h in history.values()]) == R
    assert torch.equal(removed, pruner.status == R) and pruner.n_removed == int(removed.sum()) > 0
    assert [r >= 0 for f in fates for r in f["removed_at"]] == removed.tolist()
    assert pruner.live_fraction() == 1 - pruner.n_removed / 12


def test_a_state_round_trip_continues_identically():
    torch.manual_seed(0)
    model = _randomise(Residual())
    config = PruningConfig(ratio=0.5, factor=0.5, eps=0.1, interval=1, group_reduce="max")
    pruner = Pruner(model, config)
    pruner.start(16)
    opt = _train(model, pruner, 6)
    clone_model = copy.deepcopy(model)
    clone = Pruner(clone_model, config)
    clone.load_state_dict(copy.deepcopy(pruner.state_dict()))
    clone_opt = torch.optim.SGD(clone_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    clone_opt.load_state_dict(opt.state_dict())
    assert [m.tolist() for m in clone.keep_masks()] == [m.tolist() for m in pruner.keep_masks()]
    for m, p in ((model, pruner), (clone_model, clone)):
        _train(m, p, 8, seed=1)
    assert (pruner.status == R).any()
    for key in ("status", "multiplier", "steps_weak", "returns", "removed_at"):
        assert torch.equal(getattr(pruner, key), getattr(clone, key)), key
    for a, b in zip(model.state_dict().values(), clone_model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_state_of_other_groups_or_from_before_groups_is_refused():
    state = Pruner(_randomise(Residual()), PruningConfig()).state_dict()
    old = {k: v for k, v in state.items() if k != "filter_channels"}
    with pytest.raises(ValueError, match="before channel groups"):
        Pruner(Residual(), PruningConfig()).load_state_dict(old)
    other = {**state, "filter_channels": state["filter_channels"].flip(0)}
    with pytest.raises(ValueError, match="other group channels"):
        Pruner(Residual(), PruningConfig()).load_state_dict(other)
    with pytest.raises(ValueError, match="another configuration"):
        Pruner(Residual(), PruningConfig(group_reduce="mean")).load_state_dict(state)


def test_a_state_from_before_groups_loads_where_every_conv_is_its_own_group():
    """A VGG-like model: the state layout of one group per conv is the old per-layer layout, so a
    state saved before channel groups (no filter map, no group_reduce) resumes identically."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    config = PruningConfig(criterion="random", ratio=0.5, factor=0.5, eps=0.1, interval=1)
    model = net()
    pruner = Pruner(model, config, seed=1)
    pruner.start(10)
    _train(model, pruner, 5)
    state = copy.deepcopy(pruner.state_dict())
    del state["filter_channels"]
    state["config"] = {k: v for k, v in state["config"].items() if k != "group_reduce"}
    clone_model = copy.deepcopy(model)
    clone = Pruner(clone_model, config)
    clone.load_state_dict(state)
    for m, p in ((model, pruner), (clone_model, clone)):
        _train(m, p, 5, seed=2)
    assert torch.equal(pruner.status, clone.status) and (pruner.status != A).any()


def test_group_reduce_is_validated():
    with pytest.raises(ValueError, match="unknown group_reduce 'median'"):
        PruningConfig(group_reduce="median")
    with pytest.raises(TypeError, match="group_reduce must be a string"):
        PruningConfig(group_reduce=None)


def test_a_criterion_with_one_score_per_group_channel_is_refused():
    from attenuation.criteria import register_criterion

    @register_criterion("_per_channel")
    def per_channel(ctx):
        return torch.zeros(11)

    pruner = Pruner(Residual(), PruningConfig(criterion="_per_channel", interval=1))
    pruner.start(2)
    with pytest.raises(ValueError, match=r"one per member filter: \(17,\)"):
        pruner.step()

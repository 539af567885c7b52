"""The attenuation engine: DESIGN.md's rule, its presets, checkpointing and bad input."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation.criteria import available_criteria, register_criterion
from attenuation.methods import METHODS, method_config
from attenuation.pruner import Pruner, PruningConfig


def _net(width=8):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 4))


def _train(model, pruner, steps, seed=0, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    return opt


def _status(pruner):
    return [pruner.status[pruner.offsets[i]:pruner.offsets[i + 1]].tolist() for i in range(len(pruner.counts))]


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "bn", "taylor", "random"])
def test_each_criterion_scores_every_filter(criterion):
    model = _net()
    pruner = Pruner(model, PruningConfig(criterion=criterion, ratio=0.5, interval=1))
    pruner.start(4)
    _train(model, pruner, 4)
    assert pruner.history and all(s == sorted(s) or True for s in _status(pruner))
    removed_or_weak = [sum(v > 0 for v in layer) for layer in _status(pruner)]
    assert removed_or_weak == [4, 8]  # floor(0.5 * n) weak at the end of the ramp


def test_criteria_values():
    from attenuation.criteria import CriterionContext, get_criterion
    model = _net()
    pruner = Pruner(model, PruningConfig())
    removed = torch.zeros(24, dtype=torch.bool)
    removed[1] = True
    ctx = CriterionContext(pruner.layers, removed, torch.Generator().manual_seed(0))
    w0 = model[0].weight.detach().flatten(1)
    torch.testing.assert_close(get_criterion("l1")(ctx)[:8], w0.abs().sum(1))
    torch.testing.assert_close(get_criterion("l2")(ctx)[:8], w0.norm(dim=1))
    fpgm = get_criterion("fpgm")(ctx)[:8]
    expected = torch.stack([sum((w0[i] - w0[j]).norm() for j in range(8) if j != 1) for i in range(8)])
    torch.testing.assert_close(fpgm, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(get_criterion("bn")(ctx)[8:], model[5].weight.detach().abs())
    with pytest.raises(RuntimeError, match="needs gradients"):
        get_criterion("taylor")(ctx)
    a = get_criterion("random")(CriterionContext(pruner.layers, removed, torch.Generator().manual_seed(3)))
    b = get_criterion("random")(CriterionContext(pruner.layers, removed, torch.Generator().manual_seed(3)))
    assert torch.equal(a, b)


def test_registered_criterion_is_usable():
    @register_criterion("first_is_weakest")
    def first(ctx):
        return torch.cat([torch.arange(layer.n_filters, dtype=torch.float32) for layer in ctx.layers])
    assert "first_is_weakest" in available_criteria()
    model = _net()
    pruner = Pruner(model, method_config("hard", criterion="first_is_weakest", ratio=0.25, interval=1))
    pruner.start(1)
    _train(model, pruner, 1)
    assert _status(pruner) == [[2, 2] + [0] * 6, [2] * 4 + [0] * 12]


def test_attenuation_scales_filters_and_removes_below_eps():
    model = _net()
    pruner = Pruner(model, PruningConfig(ratio=0.25, ramp="constant", factor=0.5, eps=0.1, interval=1))
    pruner.start(10)
    before = model[1].weight.detach().clone()
    pruner.step()  # first attenuation step, no training: weak filters are scaled exactly by a
    weak = pruner.status[:8] == 1
    assert int(weak.sum()) == 2
    torch.testing.assert_close(model[1].weight.detach()[weak], before[weak] * 0.5)
    torch.testing.assert_close(model[1].weight.detach()[~weak], before[~weak])
    for _ in range(3):  # 0.5**4 < 0.1: removed on the 4th consecutive weak step
        pruner.step()
    assert _status(pruner)[0].count(2) == 2
    assert model[1].weight.detach()[weak].abs().sum() == 0
    assert pruner.removed_at[:8][weak].tolist() == [4, 4]
    assert model[0].live_out.sum() == 6 and model[4].live_in.sum() == 6  # chained input mask


def test_weak_filter_returns_when_it_grows():
    model = _net()
    pruner = Pruner(model, PruningConfig(ratio=0.25, ramp="constant", factor=0.9, eps=0.01, interval=1))
    pruner.start(10)
    pruner.step()
    weak = (pruner.status[:8] == 1).nonzero().flatten().tolist()
    with torch.no_grad():
        model[0].weight[weak[0]] *= 100  # training made it important again
    pruner.step()
    assert pruner.status[weak[0]] == 0 and pruner.multiplier[weak[0]] == 1
    assert pruner.returns[weak[0]] == 1 and pruner.total_returns() == 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_presets_meet_the_target(method):
    model = _net()
    pruner = Pruner(model, method_config(method, interval=2) if method != "sfp" else method_config(method))
    pruner.start(12, steps_per_epoch=3)
    _train(model, pruner, 12)
    pruner.finish()
    target = [math.floor(pruner.config.ratio * n) for n in pruner.counts]
    assert [layer.count(2) for layer in _status(pruner)] == target
    assert all(v in (0, 2) for layer in _status(pruner) for v in layer)
    removed = pruner.status == 2
    assert model[1].weight[removed[:8]].abs().sum() == 0 and model[5].bias[removed[8:]].abs().sum() == 0


def test_hard_removes_at_once_and_sfp_only_at_the_end():
    hard_model, sfp_model = _net(), _net()
    hard = Pruner(hard_model, method_config("hard", ratio=0.5, interval=1))
    sfp = Pruner(sfp_model, method_config("sfp", ratio=0.5))
    hard.start(6)
    sfp.start(6, steps_per_epoch=2)
    _train(hard_model, hard, 1)
    _train(sfp_model, sfp, 2)
    assert hard.n_removed == 12 and sfp.n_removed == 0
    assert _status(sfp)[0].count(1) == 4  # weak and zeroed, not removed
    weak = sfp.status[:8] == 1
    assert sfp_model[0].weight.detach()[weak].abs().sum() == 0
    _train(sfp_model, sfp, 1)  # zeroed filters still train: gradients are not masked
    assert sfp_model[0].weight.detach()[weak].abs().sum() > 0
    _train(hard_model, hard, 5)  # removed filters stay exactly zero under momentum and decay
    assert hard_model[0].weight.detach()[hard.status[:8] == 2].abs().sum() == 0


def test_gradients_of_removed_filters_are_masked():
    model = _net()
    pruner = Pruner(model, method_config("hard", ratio=0.5, interval=1))
    pruner.start(2)
    _train(model, pruner, 1)
    removed = pruner.status[8:] == 2
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    assert model[5].bias.grad[removed].abs().sum() == 0 and model[5].bias.grad[~removed].abs().sum() > 0


def test_global_scope_ranks_across_layers_and_keeps_one_filter():
    model = _net()
    pruner = Pruner(model, method_config("hard", ratio=0.6, scope="global", interval=1))
    pruner.start(1)
    pruner.step()
    counts = [layer.count(2) for layer in _status(pruner)]
    assert sum(counts) <= math.floor(0.6 * 24) and all(c < n for c, n in zip(counts, pruner.counts))
    assert sum(counts) >= math.floor(0.6 * 24) - 1


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = _net()
    config = method_config("attenuation", ratio=0.5, interval=1, criterion="random")
    pruner = Pruner(model, config, seed=3)
    pruner.start(20)
    opt = _train(model, pruner, 8)
    clone_model = copy.deepcopy(model)
    clone = Pruner(clone_model, config, seed=99)
    clone.load_state_dict(copy.deepcopy(pruner.state_dict()))
    clone_opt = torch.optim.SGD(clone_model.parameters(), lr=0.05, momentum=0.9)
    clone_opt.load_state_dict(opt.state_dict())
    for m, p in ((model, pruner), (clone_model, clone)):
        _train(m, p, 8, seed=1)
    assert torch.equal(pruner.status, clone.status) and torch.equal(pruner.multiplier, clone.multiplier)
    for a, b in zip(model.state_dict().values(), clone_model.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_from_elsewhere_is_refused():
    pruner = Pruner(_net(), method_config("attenuation"))
    with pytest.raises(ValueError, match="another model"):
        Pruner(_net(width=4), method_config("attenuation")).load_state_dict(pruner.state_dict())
    with pytest.raises(ValueError, match="another configuration"):
        Pruner(_net(), method_config("hard")).load_state_dict(pruner.state_dict())


@pytest.mark.parametrize("overrides,match", [
    (dict(criterion="magic"), "unknown criterion"), (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"),
    (dict(factor=1.5), "factor"), (dict(eps=-1.0), "eps"), (dict(interval=0), "interval"),
    (dict(scope="world"), "scope"), (dict(ramp="sine"), "ramp")])
def test_bad_configuration_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**overrides).validate()


def test_bad_method_and_models_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        method_config("magic")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        Pruner(nn.Sequential(nn.Linear(2, 2)))
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="criterion 'bn'"):
        Pruner(no_bn, PruningConfig(criterion="bn"))
    with pytest.raises(ValueError, match="at least one step"):
        Pruner(_net()).start(0)


@pytest.mark.parametrize("reversible,returned", [(True, True), (False, False)])
def test_reversible_multiplier_lets_attenuated_filters_return(reversible, returned):
    """Filter i has L1 norm proportional to i+1. After one step filters 0 and 1 are weak (x0.5).
    Filter 2 then shrinks to 1.5/3 of itself: between filter 1's attenuated and original norm."""
    model = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1, 1))
    pruner = Pruner(model, PruningConfig(ratio=0.25, ramp="constant", factor=0.5, eps=0.01,
                                         interval=1, reversible=reversible))
    assert not PruningConfig().reversible  # off by default: the literal rule
    pruner.start(10)
    pruner.step()
    assert pruner.status.tolist()[:3] == [1, 1, 0]
    with torch.no_grad():
        model[0].weight[2] = 1.5
    pruner.step()
    assert (pruner.status.tolist()[:3] == [1, 0, 1]) == returned
    assert pruner.total_returns() == int(returned)
    if returned:  # the returning filter gets its full scale back
        assert torch.allclose(model[0].weight[1], torch.tensor(2.0))

"""The attenuation engine: the rule (docs/METHOD.md), its presets, checkpointing and bad input."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation import ops
from attenuation.criteria import available_criteria, register_criterion
from attenuation.methods import METHODS, method_config
from attenuation import Pruner, PruningConfig


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


def _head(channels):
    """A classifier head: a conv whose channels reach the model's output is left unprunable
    (find_groups), so a toy model ends in one."""
    return nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2)


def _live_out(pruner):
    return [layer.conv.live_out.tolist() for layer in pruner.layers]


def _keep(pruner):
    return [mask.tolist() for mask in pruner.keep_masks()]


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
    pruner.layers[1].bn = None  # the criterion refuses it too, naming the layer
    with pytest.raises(ValueError, match="criterion 'bn' needs an affine BatchNorm2d.*: 4"):
        get_criterion("bn")(ctx)
    a = get_criterion("random")(CriterionContext(pruner.layers, removed, torch.Generator().manual_seed(3)))
    b = get_criterion("random")(CriterionContext(pruner.layers, removed, torch.Generator().manual_seed(3)))
    assert torch.equal(a, b)


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm"])
def test_weight_scores_leave_out_the_columns_that_read_removed_channels(criterion):
    """Once channels of the first conv are removed, the second conv's filters are scored on the
    weights that read live channels only (docs/METHOD.md, "The rule"): what physical removal
    leaves of them, and all that a compacted network still has."""
    model = _net()
    pruner = Pruner(model, method_config("iterative", criterion=criterion, ratio=0.5, interval=1))
    pruner.start(8)
    _train(model, pruner, 2)
    dead = pruner.status[:8] == ops.REMOVED
    assert dead.any()
    rows = model[4].weight.detach()[:, ~dead].flatten(1)  # the reading columns of the live channels
    if criterion == "fpgm":
        live = pruner.status[8:] != ops.REMOVED
        expected = (torch.cdist(rows, rows) * live.float()).sum(1)
    else:
        expected = rows.abs().sum(1) if criterion == "l1" else rows.norm(dim=1)
    torch.testing.assert_close(pruner.scores()[8:], expected)
    assert not torch.allclose(model[4].weight.detach()[:, dead], torch.zeros(()))  # there to leave out


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
    assert model[0].live_out.all()  # step() read nothing back: the convs follow at the next step
    assert pruner.n_removed == 6    # the count is current all the same
    pruner.step()
    assert model[0].live_out.sum() == 6 and model[4].live_in.sum() == 6  # chained input mask
    assert pruner.n_removed == 6


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
    assert (hard.status == 2).sum() == 12 and (sfp.status == 2).sum() == 0
    assert _status(sfp)[0].count(1) == 4  # weak and zeroed (behind a BN: its gamma), not removed
    weak = sfp.status[:8] == 1
    assert sfp_model[1].weight.detach()[weak].abs().sum() == 0
    _train(sfp_model, sfp, 1)  # zeroed filters still train: gradients are not masked
    assert sfp_model[1].weight.detach()[weak].abs().sum() > 0
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


def test_live_masks_follow_an_attenuation_step_at_the_next_step():
    """An attenuation step only starts copying the status to the host; the convs get its live
    masks at the start of the next step(), or at once from live_masks, state_dict and finish.
    Reading the counts waits for the copy but leaves the convs alone (reading changes no result)."""
    model = _net()
    pruner = Pruner(model, method_config("iterative", ratio=0.75, interval=1))
    pruner.start(8)
    pruner.step()
    first = pruner.status.clone()
    assert (first == 2).any()
    assert all(all(mask) for mask in _live_out(pruner)) and model[4].live_in is None
    assert pruner.n_removed == int((first == 2).sum()) and pruner.live_fraction() == 1 - pruner.n_removed / 24
    assert all(all(mask) for mask in _live_out(pruner)) and model[4].live_in is None
    pruner.step()  # gives the convs the first step's masks, then attenuates again
    assert _live_out(pruner) == [(first[:8] != 2).tolist(), (first[8:] != 2).tolist()]
    assert model[4].live_in.tolist() == (first[:8] != 2).tolist()  # chained input mask
    assert int((first == 2).sum()) < int((pruner.status == 2).sum()) == pruner.n_removed
    masks = pruner.live_masks()
    assert [out.tolist() for out, _ in masks] == _keep(pruner) == _live_out(pruner)
    assert masks[0][1] is None and masks[1][1].tolist() == _keep(pruner)[0]
    pruner.step()
    pruner.state_dict()
    assert _live_out(pruner) == _keep(pruner)
    pruner.step()
    pruner.finish()
    removed = int((pruner.status == 2).sum())
    assert _live_out(pruner) == _keep(pruner) and pruner.live_fraction() == 1 - removed / 24


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_readers_are_current_without_sync_live(seed, scope):
    """Right after an attenuation step that removes filters, with no call in between, every reader
    agrees with the model itself: a removed filter is one whose parameters were zeroed."""
    torch.manual_seed(seed)
    model = _net()
    pruner = Pruner(model, method_config("hard", ratio=0.5, interval=3, scope=scope, criterion="random"), seed=seed)
    pruner.start(3)
    _train(model, pruner, 3, seed=seed)  # the third step() attenuates and returns at once
    zeroed = [(model[0].weight.detach().flatten(1).abs().sum(1) == 0).tolist(),
              (model[4].weight.detach().flatten(1).abs().sum(1) == 0).tolist()]
    n_zeroed = sum(map(sum, zeroed))
    assert n_zeroed > 0 and all(all(mask) for mask in _live_out(pruner))   # the convs not given them yet
    assert pruner.n_removed == n_zeroed and pruner.live_fraction() == 1 - n_zeroed / 24
    assert _keep(pruner) == [[not z for z in layer] for layer in zeroed]
    assert [[r >= 0 for r in fate["removed_at"]] for fate in pruner.fates()] == zeroed
    assert [out.tolist() for out, _ in pruner.live_masks()] == _keep(pruner) == _live_out(pruner)
    assert pruner.live_masks()[1][1].tolist() == _keep(pruner)[0]


def test_grouped_and_padded_convs_are_pruned_consistently():
    """Depthwise and reflect-padded convs are pruned and take their masks like the others (their
    masked forward itself: tests/test_modules.py; a depthwise conv is in its input's group, other
    grouped convs are left unprunable: tests/test_groups.py); the masked model computes what the
    same weights compute in plain nn.Conv2d layers."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model = copy.deepcopy(plain)
    pruner = Pruner(model, method_config("hard", ratio=0.5, interval=1, criterion="random"))
    pruner.start(2)
    _train(model, pruner, 2)
    masks = pruner.live_masks()
    assert [int(out.sum()) for out, _ in masks] == [4, 4, 4]
    assert masks[1][1].tolist() == masks[0][0].tolist() and masks[2][1].tolist() == masks[1][0].tolist()
    assert masks[2][0].tolist() == masks[1][0].tolist()  # the depthwise conv follows its input
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "live_" not in k})
    model.double()
    plain.double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for train in (False, True):
        model.train(train)
        plain.train(train)
        torch.testing.assert_close(model(x), plain(x), rtol=1e-10, atol=1e-10)


def _filter_parameters(pruner):
    """Per pruned layer, its filters' parameters: conv weight and bias, BN gamma and beta."""
    out = []
    for layer in pruner.layers:
        bn = (layer.bn.weight, layer.bn.bias) if layer.bn is not None else ()
        out.append([p for p in (layer.conv.weight, layer.conv.bias, *bn) if p is not None])
    return out


def test_removed_filters_stay_zero_while_the_convs_catch_up():
    """In the optimizer step after an attenuation step the convs still compute the newly removed
    channels: the gradient masks (they read the device status) and zero_removed_ keep them zero,
    under momentum and weight decay. The second conv has no BatchNorm, so its removed filters do
    get gradients unless they are masked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4))
    pruner = Pruner(model, method_config("iterative", ratio=0.75, interval=2))
    pruner.start(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    g = torch.Generator().manual_seed(0)
    behind = 0
    for _ in range(14):
        removed = (pruner.status == 2).split(pruner.counts)
        behind += _live_out(pruner) != _keep(pruner)
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for parameters, rows in zip(_filter_parameters(pruner), removed):
            assert all(p.grad[rows].abs().sum() == 0 for p in parameters)
        opt.step()
        pruner.step()
        for parameters, rows in zip(_filter_parameters(pruner), removed):
            assert all(p.detach()[rows].abs().sum() == 0 for p in parameters)
    assert behind >= 3 and all(r.any() for r in (pruner.status == 2).split(pruner.counts))


def test_nothing_runs_before_the_first_attenuation_step(monkeypatch):
    """Unpruned training pays for neither zero_removed_ nor the gradient masks; once a step has
    found no removals (the "none" method), they stop again."""
    calls = []
    zero_removed = ops.zero_removed_

    def counted(*args, **kwargs):
        calls.append(1)
        zero_removed(*args, **kwargs)

    monkeypatch.setattr(ops, "zero_removed_", counted)
    grad = torch.ones(8, 3, 3, 3)
    for method, ratio, runs in (("hard", 0.5, True), ("none", 0.0, False)):
        calls.clear()
        pruner = Pruner(_net(), method_config(method, ratio=ratio, interval=3))
        pruner.start(6)
        pruner.step()
        pruner.step()
        assert not calls and pruner._gradient_mask(0, 8)(grad) is grad
        pruner.step()  # the attenuation step: from here on removals may exist
        assert pruner._gradient_mask(0, 8)(grad) is not grad
        pruner.step()
        assert bool(calls) == runs and (pruner._gradient_mask(0, 8)(grad) is not grad) == runs


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: checks that Pruner.step() never makes the host wait for it")
@pytest.mark.parametrize("backend,scope", [("reference", "layer"), ("native", "layer"),
                                           ("reference", "global"), ("triton", "global"), ("triton", "layer")])
def test_step_does_not_synchronise_on_cuda(backend, scope):
    if backend not in ops.available_backends():
        pytest.skip(f"no {backend} backend in this environment")
    if backend == "native":
        native = pytest.importorskip("attenuation.ops.native")
        if not native.has_kernel("cuda"):
            pytest.skip("the native extension was built without CUDA kernels")
    torch.manual_seed(0)
    model = _net(width=16).cuda()
    pruner = Pruner(model, method_config("iterative", ratio=0.75, interval=1, scope=scope), backend=backend)
    pruner.start(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 4, (8,), device="cuda")

    def train_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # warm-up: allocators, cuDNN, pinned host memory, the first live masks
        train_step()
        pruner.step()
    removed_after_warm_up = pruner.n_removed
    previous = torch.cuda.get_sync_debug_mode()
    for _ in range(9):
        train_step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pruner.step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    pruner.sync_live()
    assert pruner.n_removed > removed_after_warm_up and _live_out(pruner) == _keep(pruner)


def test_global_scope_ranks_across_layers_and_keeps_one_filter():
    model = _net()
    pruner = Pruner(model, method_config("hard", ratio=0.6, scope="global", interval=1))
    pruner.start(1)
    pruner.step()
    counts = [layer.count(2) for layer in _status(pruner)]
    assert sum(counts) <= math.floor(0.6 * 24) and all(c < n for c, n in zip(counts, pruner.counts))
    assert sum(counts) >= math.floor(0.6 * 24) - 1


@pytest.mark.parametrize("factor", [0.7, 0.0])  # 0.0: filters removed before and after the cut
def test_state_dict_round_trip_continues_identically(factor):
    torch.manual_seed(0)
    model = _net()
    config = method_config("attenuation", ratio=0.5, interval=1, criterion="random", factor=factor)
    pruner = Pruner(model, config, seed=3)
    pruner.start(20)
    opt = _train(model, pruner, 8)
    clone_model = copy.deepcopy(model)
    clone = Pruner(clone_model, config, seed=99)
    clone.load_state_dict(copy.deepcopy(pruner.state_dict()))
    assert _live_out(clone) == _live_out(pruner) == _keep(pruner)  # state_dict applied the last step's masks
    clone_opt = torch.optim.SGD(clone_model.parameters(), lr=0.05, momentum=0.9)
    clone_opt.load_state_dict(opt.state_dict())
    for m, p in ((model, pruner), (clone_model, clone)):
        _train(m, p, 8, seed=1)
    assert torch.equal(pruner.status, clone.status) and torch.equal(pruner.multiplier, clone.multiplier)
    for a, b in zip(model.state_dict().values(), clone_model.state_dict().values()):
        assert torch.equal(a, b)


def test_state_dict_from_before_attenuate_and_step_at_start_is_read():
    """A checkpoint saved before ``attenuate`` replaced ``attenuate_bn`` and ``step_at_start`` was
    added resumes under the configuration that computes what it computed; the first sfp preset
    (conv weights only) has no such configuration and is refused."""
    for method, attenuate_bn, loads in (("attenuation", True, True), ("iterative", True, True),
                                        ("sfp", False, False)):
        state = Pruner(_net(), method_config(method)).state_dict()
        old = {k: v for k, v in state["config"].items() if k not in ("attenuate", "step_at_start")}
        state["config"] = {**old, "attenuate_bn": attenuate_bn}
        pruner = Pruner(_net(), method_config(method))
        if loads:
            pruner.load_state_dict(state)
        else:
            with pytest.raises(ValueError, match="another configuration"):
                pruner.load_state_dict(state)


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


@pytest.mark.parametrize("overrides,error,match", [
    (dict(ratio="0.5"), TypeError, "ratio must be a number"), (dict(ratio=None), TypeError, "ratio"),
    (dict(ratio=True), TypeError, "ratio"), (dict(factor=math.nan), ValueError, "factor must be finite"),
    (dict(eps=math.inf), ValueError, "eps must be finite"), (dict(eps=math.nan), ValueError, "eps"),
    (dict(ratio=-math.inf), ValueError, "ratio"), (dict(interval=True), TypeError, "interval"),
    (dict(interval=2.0), TypeError, "interval"), (dict(interval="daily"), ValueError, "interval"),
    (dict(criterion=None), TypeError, "criterion must be a string"), (dict(ramp=["cubic"]), TypeError, "ramp"),
    (dict(scope=1), TypeError, "scope"), (dict(reversible=1), TypeError, "reversible must be True or False"),
    (dict(mask_gradients="yes"), TypeError, "mask_gradients"), (dict(attenuate=None), TypeError, "attenuate"),
    (dict(step_at_start=1), TypeError, "step_at_start must be True or False"),
    (dict(attenuate="conv"), ValueError, "unknown attenuate 'conv'")])
def test_configuration_types_are_checked(overrides, error, match):
    """Every field is checked at construction, with an error naming it (bool is not a number)."""
    with pytest.raises(error, match=match):
        PruningConfig(**overrides)
    if None not in overrides.values():  # method_config reads None as "the preset's value"
        with pytest.raises(error, match=match):
            method_config("attenuation", **overrides)


def test_valid_configurations_of_every_numeric_kind_are_accepted():
    import numpy as np
    config = PruningConfig(ratio=0, factor=np.float32(0.5), eps=np.float64(0.1), interval=np.int64(3))
    assert config.interval == 3 and PruningConfig(interval="epoch").interval == "epoch"


def test_bad_method_and_models_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        method_config("magic")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        Pruner(nn.Sequential(nn.Linear(2, 2)))
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), *_head(4))
    with pytest.raises(ValueError, match="criterion 'bn'"):
        Pruner(no_bn, PruningConfig(criterion="bn"))
    not_affine = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), *_head(4))
    with pytest.raises(ValueError, match="criterion 'bn' needs an affine BatchNorm2d.*: 0"):
        Pruner(not_affine, PruningConfig(criterion="bn"))
    with pytest.raises(ValueError, match="at least one step"):
        Pruner(_net()).start(0)


@pytest.mark.parametrize("reversible,returned", [(True, True), (False, False)])
def test_reversible_multiplier_lets_attenuated_filters_return(reversible, returned):
    """Filter i has L1 norm proportional to i+1. After one step filters 0 and 1 are weak (x0.5).
    Filter 2 then shrinks to 1.5/3 of itself: between filter 1's attenuated and original norm."""
    model = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False), *_head(8))
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

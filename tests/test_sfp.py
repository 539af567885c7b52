"""Soft Filter Pruning (docs/METHOD.md, "Special cases" and "Decisions"): the rule stated literally,
regrowth at the ordinary rate, returns, and a short run that must not collapse."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation import ops
from attenuation.config import preset_config
from attenuation.methods import method_config
from attenuation.pruner import Pruner
from attenuation.run import Run


@pytest.fixture(scope="module")
def squares_npz(tmp_path_factory):
    """1,280 training and 200 test images, CIFAR-shaped: a square of its class's colour on a black
    background, in noise. Easy to learn, and black around the square like the loader's crop padding,
    so that eval mode's BatchNorm statistics fit the test images (tiny_npz's grey noise does not)."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(60, 255, (10, 3))
    arrays = {}
    for split, n in (("train", 1280), ("test", 200)):
        y = np.arange(n) % 10
        x = np.zeros((n, 32, 32, 3))
        x[:, 8:24, 8:24] = colours[y][:, None, None]
        x += rng.normal(0, 30, x.shape)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = np.clip(x, 0, 255).astype(np.uint8), y.astype(np.uint8)
    path = tmp_path_factory.mktemp("squares") / "cifar10.npz"
    np.savez(path, **arrays)
    return path


def _net():
    """conv-BN-ReLU twice; BN parameters and statistics spread so that the folded norm ranks the
    filters differently from the conv weights' own norm, and beta > 0 so that a zeroed filter's
    constant output passes the ReLU (a zeroed filter behind beta <= 0 receives no gradient, with or
    without a BN: the ReLU zeroes it)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.weight.copy_(torch.empty(bn.num_features).uniform_(0.5, 1.5, generator=g))
            bn.bias.copy_(torch.empty(bn.num_features).uniform_(0.2, 0.6, generator=g))
            bn.running_var.copy_(torch.empty(bn.num_features).uniform_(0.2, 3.0, generator=g))
    return model


def _pairs(model):
    return [(model[0], model[1]), (model[4], model[5])]


def _folded_l1(conv, bn):
    """The L1 norm of each filter with its BatchNorm folded in, as eval mode computes it."""
    gain = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    return conv.weight.detach().flatten(1).abs().sum(1) * gain.abs()


def _lowest(scores, ratio):
    weak = torch.zeros(len(scores), dtype=torch.bool)
    weak[torch.sort(scores, stable=True).indices[:math.floor(ratio * len(scores))]] = True
    return weak


def _expected_weak(model, ratio):
    return torch.cat([_lowest(_folded_l1(conv, bn), ratio) for conv, bn in _pairs(model)])


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_selection(model, pruner, expected, before):
    """The selection the pruner made is the rule's: the expected filters are weak, their BN gamma
    (only) is zero, and their channel outputs beta after the BN, in train and in eval mode."""
    assert torch.equal(pruner.status == ops.WEAK, expected)
    weak = expected.split(pruner.counts)
    for i, ((conv, bn), w) in enumerate(zip(_pairs(model), weak)):
        assert (bn.weight.detach()[w] == 0).all()
        prefix = f"{4 * i}."
        torch.testing.assert_close(conv.weight.detach(), before[prefix + "weight"], rtol=0, atol=0)
        torch.testing.assert_close(bn.bias.detach(), before[f"{4 * i + 1}.bias"], rtol=0, atol=0)
        torch.testing.assert_close(bn.weight.detach()[~w], before[f"{4 * i + 1}.weight"][~w], rtol=0, atol=0)
    x = torch.randn(6, 3, 8, 8)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model[1](model[0](x))
        expected_out = model[1].bias.detach().view(1, -1, 1, 1).expand_as(out)
        torch.testing.assert_close(out[:, weak[0]], expected_out[:, weak[0]], rtol=0, atol=1e-6)
    model.train()


def _step(model, opt, g):
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_sfp_zeroes_the_lowest_norms_every_epoch_and_zeroed_filters_regrow_and_return():
    """He et al.'s rule, literally: as the phase starts (after its first step) and after every
    epoch the floor(p n) filters of lowest norm (behind a BN: of the folded filter) in each layer
    are zeroed; all keep training; the selection is recomputed from the current weights, so a
    regrown filter returns; at the end the zeroed ones are removed."""
    model = _net()
    raw = torch.cat([_lowest(conv.weight.detach().flatten(1).abs().sum(1), 0.5) for conv, _ in _pairs(model)])
    assert not torch.equal(raw, _expected_weak(model, 0.5))  # the folded norm is what decides
    pruner = Pruner(model, method_config("sfp", ratio=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    pruner.start(9, steps_per_epoch=3)
    for epoch in range(3):
        for i in range(3):
            _step(model, opt, g)
            if epoch == 0 and i == 1:  # one step after zeroing, the weak filters have regrown a little
                gamma = torch.cat([bn.weight.detach() for _, bn in _pairs(model)])
                assert (gamma[first_weak] != 0).all()
                assert gamma[first_weak].abs().max() < 0.05 * gamma[~first_weak].abs().median()
            if epoch == 1 and i == 2:  # training made a weak filter important again
                with torch.no_grad():
                    returning = int(torch.nonzero(pruner.status[:8] == ops.WEAK)[0])
                    model[1].weight[returning] = 10 * model[1].weight.abs().max()
            selects = i == 2 or (epoch == 0 and i == 0)  # after every epoch, and as the phase starts
            if selects:
                expected, before = _expected_weak(model, 0.5), _snapshot(model)
            pruner.step()
            if selects:
                _check_selection(model, pruner, expected, before)
            else:
                assert torch.equal(pruner.status == ops.WEAK, expected)  # nothing changes in between
            if epoch == 0 and i == 0:
                first_weak = expected
        assert [int(w.sum()) for w in (pruner.status == ops.WEAK).split(pruner.counts)] == [4, 8]
    assert pruner.returns[returning] == 1 and pruner.multiplier[returning] == 1
    assert pruner.status[returning] == ops.ACTIVE
    pruner.finish()
    assert torch.equal(pruner.status == ops.REMOVED, expected)
    for (conv, bn), removed in zip(_pairs(model), expected.split(pruner.counts)):
        for t in (conv.weight, bn.weight, bn.bias):
            assert (t.detach()[removed] == 0).all()


def test_a_zeroed_filter_regrows_at_the_rate_of_training():
    """One optimizer step after SFP zeroes a filter, its channel (after the BN, in train mode)
    carries a small fraction of a kept channel's signal. Zeroing the conv weights instead would
    put the filter at the BN's singular point: its first gradient is amplified by 1/sqrt(bn.eps)
    (and the momentum moves it even where the ReLU passes no gradient), and the BN rescales the
    tiny regrown filter to full strength at once (the collapse of issue 11)."""
    model = _net()
    pruner = Pruner(model, method_config("sfp", ratio=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    pruner.start(6, steps_per_epoch=3)
    for _ in range(3):  # an epoch: the selection at its start, momentum builds up, the selection at its end
        _step(model, opt, g)
        pruner.step()
    weak = (pruner.status == ops.WEAK)[:8]
    _step(model, opt, g)
    with torch.no_grad():
        signal = model[1](model[0](torch.randn(64, 3, 8, 8, generator=g))).std(dim=(0, 2, 3))
    assert signal[weak].max() < 0.1 * signal[~weak].median()


def test_a_short_sfp_run_does_not_collapse(squares_npz, tmp_path):
    """Issue 11: from a sound baseline, sfp at ratio 0.5 trained on with ever lower accuracy and
    tested at exactly chance after every epoch of its phase (here: 10-20% at its end). The phase
    must stay near the baseline's test accuracy: within 20 points on average over its epochs, and
    far above chance at its end. (On this tiny test set one epoch's accuracy swings by 10-25 points
    and differs between processors: 79, 80, 97.5, 86, 70% on an AMD EPYC from a 100% baseline.)"""
    config = preset_config("smoke", method="sfp", ratio=0.5, interval="epoch", width=0.125,
                           data=str(squares_npz), train_subset=1280, test_subset=200, out=str(tmp_path / "run"),
                           epochs={"baseline": 5, "attenuation": 5, "recovery": 0, "finetune": 0})
    run = Run(config, progress=False)
    run.execute(until_phase="attenuation")
    accuracy = {phase: [row["test_acc"] for row in run.state["metrics"] if row["phase"] == phase]
                for phase in ("baseline", "attenuation")}
    assert accuracy["baseline"][-1] >= 80  # the data is learnable: a sound baseline
    phase = accuracy["attenuation"]
    assert sum(phase) / len(phase) >= accuracy["baseline"][-1] - 20, accuracy
    assert phase[-1] >= 50, accuracy


def test_without_a_batchnorm_sfp_zeroes_the_conv_and_refuses_a_batchnorm_without_gamma():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3),  # read by a head: prunable
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    expected = torch.cat([_lowest(model[i].weight.detach().flatten(1).abs().sum(1), 0.5) for i in (0, 2)])
    pruner = Pruner(model, method_config("sfp", ratio=0.5))
    pruner.start(4, steps_per_epoch=2)
    pruner.step()  # the selection as the phase starts
    assert torch.equal(pruner.status == ops.WEAK, expected)
    for conv, weak in zip((model[0], model[2]), expected.split(pruner.counts)):
        assert (conv.weight.detach()[weak] == 0).all() and (conv.bias.detach()[weak] == 0).all()
        assert (conv.weight.detach()[~weak].flatten(1).abs().sum(1) > 0).all()
    no_gamma = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"affine=False\): 0"):
        Pruner(no_gamma, method_config("sfp"))

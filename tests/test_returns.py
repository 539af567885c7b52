"""Return mechanisms (docs/METHOD.md, "Scores under attenuation" and "Hysteresis"): the bn_taylor
criterion, unattenuated scores and the hysteresis of returns, each against a literal statement of
its rule on fresh random inputs."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation import ops
from attenuation.criteria import CriterionContext, get_criterion, register_criterion
from attenuation.fates import fate_statistics
from attenuation.ops import reference
from attenuation import Pruner, PruningConfig
from attenuation.schedule import ramp_ratio, weak_count

ACTIVE, WEAK, REMOVED = ops.ACTIVE, ops.WEAK, ops.REMOVED
_SCRIPT: list = []  # the scores the scripted criterion hands out, one tensor per attenuation step


@register_criterion("_scripted", scales_with_filter=True)
def _scripted(ctx: CriterionContext):
    return _SCRIPT.pop(0).clone()


def _net(width=6):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 4))


def _literal_rule(score_steps, counts, config):
    """The rule with hysteresis, written out filter by filter: per step, the status after it and
    the multipliers."""
    n, steps = sum(counts), len(score_steps)
    status, mult, left_out = [ACTIVE] * n, [1.0] * n, [0] * n
    divide = config.reversible if config.unattenuated_scores is None else config.unattenuated_scores
    out = []
    for i, raw in enumerate(score_steps, start=1):
        s = [raw[f].item() / mult[f] if divide and status[f] == WEAK else raw[f].item() for f in range(n)]
        p = ramp_ratio(config.ramp, config.ratio, i, steps)
        if config.scope == "global":  # the k of each layer: the global selection's (the reference)
            chosen = reference.select_weak_global(torch.tensor(s), torch.tensor([x == REMOVED for x in status]),
                                                  counts, weak_count(p, n))
            ks = [int(c.sum()) for c in chosen.split(counts)]
        else:
            ks = [weak_count(p, c) for c in counts]
        weak = [False] * n
        start = 0
        for layer, count in enumerate(counts):
            filters = range(start, start + count)
            plain = sorted(filters, key=lambda f: (status[f] != REMOVED, s[f], f))[:ks[layer]]
            live = [s[f] for f in plain if status[f] != REMOVED]
            threshold = max(live) if live else None
            held = set()
            for f in filters:
                if status[f] == WEAK and f not in plain:
                    left_out[f] += 1
                    clears = (config.return_margin == 0 or threshold is None
                              or s[f] > threshold + config.return_margin * abs(threshold))
                    if left_out[f] < config.return_after or not clears:
                        held.add(f)
                else:
                    left_out[f] = 0
            final = sorted(filters, key=lambda f: (status[f] != REMOVED, f not in held, s[f], f))[:ks[layer]]
            for f in filters:
                weak[f] = f in final
                left_out[f] = left_out[f] if weak[f] else 0
            start += count
        for f in range(n):
            if status[f] == REMOVED:
                continue
            if weak[f]:
                mult[f] *= config.factor
                status[f] = REMOVED if mult[f] < config.eps else WEAK
                mult[f] = 0.0 if status[f] == REMOVED else mult[f]
            else:
                status[f], mult[f] = ACTIVE, 1.0
        out.append((list(status), list(mult)))
    return out


CONFIGS = [
    dict(),                                                    # the literal rule: hysteresis off
    dict(return_margin=0.3),
    dict(return_after=3),
    dict(return_margin=0.2, return_after=2, unattenuated_scores=True),
    dict(return_margin=0.5, reversible=True, unattenuated_scores=False),
    dict(return_margin=0.2, return_after=2, scope="global"),
    dict(return_after=2, unattenuated_scores=True, ramp="linear", scope="global"),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "off")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_engine_follows_the_literal_rule(overrides, seed):
    g = torch.Generator().manual_seed(seed)
    config = PruningConfig(criterion="_scripted", ratio=0.5, factor=0.5, eps=0.1, interval=1, **overrides)
    pruner = Pruner(_net(), config, backend="reference")
    steps = 12
    scores = [torch.rand(sum(pruner.counts), generator=g) for _ in range(steps)]
    _SCRIPT[:] = scores
    pruner.start(steps)
    expected = _literal_rule(scores, pruner.counts, config)
    returns = 0
    for step, (status, mult) in enumerate(expected):
        pruner.step()
        assert pruner.status.tolist() == status, f"step {step + 1}"
        assert torch.allclose(pruner.multiplier, torch.tensor(mult)), f"step {step + 1}"
        returns = pruner.total_returns()
    pruner.finish()
    if config.scope == "layer":  # the end of the phase meets the target exactly
        removed = [int(k.logical_not().sum()) for k in pruner.keep_masks()]
        assert removed == [weak_count(0.5, n) for n in pruner.counts]
    if config.hysteresis:  # the random scores make the plain rule return filters; some are held
        plain = _literal_rule(scores, pruner.counts, PruningConfig(**{**vars(config), "return_margin": 0.0,
                                                                      "return_after": 1}))
        assert [s for s, _ in plain] != [s for s, _ in expected]
    assert returns >= 0


def test_hysteresis_holds_a_weak_filter_until_it_clears_the_margin_long_enough():
    """One layer of 4, k = 1: filter 0 is weak; then filter 1 scores lowest, and filter 0 returns
    once it is left out a second time (return_after 2) with a score over 1.5 x the threshold."""
    config = PruningConfig(criterion="_scripted", ratio=0.25, ramp="constant", factor=0.9, eps=0.01,
                           interval=1, return_margin=0.5, return_after=2)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    pruner = Pruner(model, config, backend="reference")
    _SCRIPT[:] = [torch.tensor(s) for s in ([1.0, 2.0, 3.0, 4.0],   # 0 weak
                                            [2.0, 1.0, 3.0, 4.0],   # clears 1 + 0.5, left out once: held
                                            [1.4, 1.0, 3.0, 4.0],   # twice, within the margin: held
                                            [2.0, 1.0, 3.0, 4.0],   # three times, clears: returns
                                            )]
    pruner.start(10)
    statuses = []
    for _ in range(4):
        pruner.step()
        statuses.append(pruner.status.tolist())
    assert statuses == [[WEAK, 0, 0, 0], [WEAK, 0, 0, 0], [WEAK, 0, 0, 0], [ACTIVE, WEAK, 0, 0]]
    assert pruner.total_returns() == 1


def test_defaults_keep_the_rule_and_scores():
    config = PruningConfig()
    assert (config.return_margin, config.return_after, config.unattenuated_scores) == (0.0, 1, None)
    assert not config.hysteresis and not config.divides_weak_scores
    assert PruningConfig(reversible=True).divides_weak_scores
    assert not PruningConfig(reversible=True, unattenuated_scores=False).divides_weak_scores
    assert PruningConfig(unattenuated_scores=True, criterion="bn_taylor").divides_weak_scores
    assert not PruningConfig(unattenuated_scores=True, criterion="fpgm").divides_weak_scores  # no scale


@pytest.mark.parametrize("overrides, error, match", [
    (dict(return_margin=-0.1), ValueError, "return_margin must be >= 0"),
    (dict(return_margin=math.nan), ValueError, "return_margin must be finite"),
    (dict(return_margin=True), TypeError, "return_margin must be a number"),
    (dict(return_after=0), ValueError, "return_after must be >= 1"),
    (dict(return_after=1.5), TypeError, "return_after must be an int"),
    (dict(return_after=True), TypeError, "return_after must be an int"),
    (dict(unattenuated_scores=1), TypeError, "unattenuated_scores must be True, False or None"),
])
def test_bad_return_options_are_refused(overrides, error, match):
    with pytest.raises(error, match=match):
        PruningConfig(**overrides)


def test_bn_taylor_is_the_taylor_contribution_after_the_batchnorm():
    """|gamma dL/dgamma + beta dL/dbeta| = |sum over batch and pixels of dL/dz * z|, z the BN output."""
    model = _net()
    pruner = Pruner(model, PruningConfig(criterion="bn_taylor"), backend="reference")
    outputs = []

    def keep(module, inputs, z):
        z.retain_grad()
        outputs.append(z)

    for layer in pruner.layers:
        layer.bn.register_forward_hook(keep)
    with torch.no_grad():
        for layer in pruner.layers:
            layer.bn.weight.normal_()
            layer.bn.bias.normal_()
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    F.cross_entropy(model(x), y).backward()
    context = CriterionContext(pruner.layers, torch.zeros(sum(pruner.counts), dtype=torch.bool), torch.Generator())
    expected = torch.cat([(z.grad * z).sum((0, 2, 3)).abs() for z in outputs])
    torch.testing.assert_close(get_criterion("bn_taylor")(context), expected, rtol=1e-4, atol=1e-7)


def test_bn_taylor_needs_batchnorms_and_gradients():
    with pytest.raises(ValueError, match="criterion 'bn_taylor' needs an affine BatchNorm2d.*: 0"):
        Pruner(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
               PruningConfig(criterion="bn_taylor"))
    pruner = Pruner(_net(), PruningConfig(criterion="bn_taylor", interval=1))
    pruner.start(2)
    with pytest.raises(RuntimeError, match="'bn_taylor' needs the BatchNorms' gradients"):
        pruner.step()


def test_hysteresis_state_survives_a_checkpoint():
    config = PruningConfig(criterion="_scripted", ratio=0.5, factor=0.8, eps=0.01, interval=1, return_after=3)
    g = torch.Generator().manual_seed(5)
    scores = [torch.rand(18, generator=g) for _ in range(8)]
    first, second = Pruner(_net(), config), Pruner(_net(), config)
    _SCRIPT[:] = list(scores)
    first.start(8)
    for _ in range(4):
        first.step()
    assert first.steps_left_out.any()  # something to carry over
    second.load_state_dict(first.state_dict())
    rest = _SCRIPT[:]
    for pruner in (first, second):
        _SCRIPT[:] = list(rest)
        for _ in range(4):
            pruner.step()
    assert torch.equal(first.status, second.status) and torch.equal(first.steps_left_out, second.steps_left_out)
    old = first.state_dict()  # a state saved before the hysteresis fields existed
    del old["steps_left_out"]
    for name in ("unattenuated_scores", "return_margin", "return_after"):
        del old["config"][name]
    Pruner(_net(), PruningConfig(criterion="_scripted", ratio=0.5, factor=0.8, eps=0.01, interval=1)
           ).load_state_dict(old)


def test_returns_happen_and_some_are_kept_in_training():
    """A short training with bn_taylor, unattenuated scores and hysteresis: filters return, some of
    them stay to the end, and the end of the phase meets the target."""
    torch.manual_seed(0)
    model = _net(8)
    config = PruningConfig(criterion="bn_taylor", ratio=0.5, factor=0.7, eps=0.01, interval=2,
                           unattenuated_scores=True, return_margin=0.1, return_after=2)
    pruner = Pruner(model, config)
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.start(60)
    for _ in range(60):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
    pruner.finish()
    stats = fate_statistics(pruner.status_history(), ended=True)
    assert stats.returns > 0 and stats.kept_returns > 0
    assert stats.removed_filters == 4 + 8

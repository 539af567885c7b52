"""Fate statistics (docs/METHOD.md, "Fate statistics"): hand-built histories with hand-computed
answers, and agreement with the pruner's own counters on real pruning phases."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from attenuation.fates import FateStatistics, describe, fate_statistics, returns_per_filter
from attenuation.methods import method_config
from attenuation import Pruner, PruningConfig

A, W, R = 0, 1, 2
# Columns are filters, rows the status after attenuation steps 1-3, then the end-of-phase row:
#   f0 weak twice, removed by step 3             steps weak 3 (2 rows weak + the removing step)
#   f1 weak, returns, weak again, removed at end  steps weak 2, one return, not kept
#   f2 weak at step 2, returns at step 3          one return, kept
#   f3 never weak
#   f4 removed at once by step 1 (a = 0)          steps weak 1
HISTORY = np.array([
    [W, W, A, A, R],
    [W, A, W, A, R],
    [R, W, A, A, R],
    [R, R, A, A, R],
], dtype=np.uint8)
# entering + leaving per step: step 1 f0, f1, f4 enter (3); step 2 f2 enters, f1 returns (2);
# step 3 f1 enters, f2 returns (2); f0's removal is no departure: removed filters stay selected
ENDED = FateStatistics(filters=5, attenuation_steps=3, returns=2, kept_returns=1, churn=7 / 3,
                       removed_filters=3, removed_during_phase=2,
                       mean_steps_weak_before_removal=(3 + 2 + 1) / 3)
# the phase still running after step 3: f1 has not been removed, so its return is kept so far
RUNNING = FateStatistics(filters=5, attenuation_steps=3, returns=2, kept_returns=2, churn=7 / 3,
                         removed_filters=2, removed_during_phase=2,
                         mean_steps_weak_before_removal=(3 + 1) / 2)


def test_hand_built_history():
    assert fate_statistics(HISTORY, ended=True) == ENDED
    assert fate_statistics(torch.from_numpy(HISTORY[:3]), ended=False) == RUNNING
    assert ENDED.removed_at_end == 1
    assert returns_per_filter(HISTORY).tolist() == [0, 1, 1, 0, 0]


def test_layers_are_taken_together():
    layers = {"conv1": HISTORY[:, :2], "conv2": torch.from_numpy(HISTORY[:, 2:])}
    assert fate_statistics(layers, ended=True) == ENDED


def test_no_attenuation_step_and_nothing_removed():
    only_end = fate_statistics(np.zeros((1, 4), dtype=np.uint8), ended=True)
    assert (only_end.attenuation_steps, only_end.churn, only_end.returns) == (0, None, 0)
    assert only_end.mean_steps_weak_before_removal is None and only_end.removed_filters == 0
    empty = fate_statistics(np.zeros((0, 4), dtype=np.uint8), ended=False)
    assert (empty.attenuation_steps, empty.churn, empty.kept_returns) == (0, None, 0)


def test_describe():
    assert ENDED.describe() == ("2 returns (1 kept to the end), weak-set churn 2.33 filters a step, "
                                "3 removed (2 during the phase, 1 at its end), weak 2.0 steps on "
                                "average before removal")
    empty = fate_statistics(np.zeros((1, 4), dtype=np.uint8), ended=True)
    assert describe(vars(empty)) == ("0 returns (0 kept to the end), no attenuation step, 0 removed "
                                     "(0 during the phase, 0 at its end)")


@pytest.mark.parametrize("history,ended,match", [
    (np.array([[R], [A]]), False, "removal is permanent"),
    (np.array([[W, A], [W, A]]), True, "not the end-of-phase removal"),   # a weak filter left
    (np.array([[W, A], [A, A]]), True, "not the end-of-phase removal"),   # a return at the end
    (np.array([[A, A], [A, R]]), True, "not the end-of-phase removal"),   # an active one removed
    (np.zeros((0, 3)), True, "history is empty"),
    (np.zeros((2, 2, 2)), False, "2-D"),
    (np.array([[3]]), False, "values outside"),
    ({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}, False, "different numbers of rows"),
    ({}, False, "no layers"),
])
def test_histories_that_the_rule_cannot_make_are_refused(history, ended, match):
    with pytest.raises(ValueError, match=match):
        fate_statistics(history, ended=ended)


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))  # all convs prunable


@pytest.mark.parametrize("config", [
    PruningConfig(criterion="random", ratio=0.5, ramp="linear", factor=0.5, eps=0.1, interval=1,
                  reversible=True),
    PruningConfig(criterion="random", ratio=0.6, ramp="cubic", factor=0.8, eps=0.3, interval=2),
    method_config("sfp", criterion="random", ratio=0.5),
    method_config("iterative", criterion="random", ratio=0.5, interval=3),
    method_config("hard", ratio=0.5, interval=2),
], ids=["reversible", "literal", "sfp", "iterative", "hard"])
def test_agrees_with_the_pruners_counters(config):
    """On real phases (random scores make the weak set churn): returns, removals and steps weak as
    the pruner counts them, and the selection's growth = entering - leaving."""
    pruner = Pruner(_net(), config, seed=3)
    pruner.start(40, steps_per_epoch=4)
    for _ in range(40):
        pruner.step()
    running = fate_statistics(pruner.status_history(), ended=False)
    removed_during_phase = pruner.n_removed
    pruner.finish()
    stats = fate_statistics(pruner.status_history(), ended=True)
    removed = pruner.status == R
    assert stats.attenuation_steps == pruner.n_attenuation_steps == running.attenuation_steps
    assert stats.returns == pruner.total_returns() == running.returns
    assert stats.kept_returns == int(((pruner.returns > 0) & ~removed).sum())
    assert stats.removed_filters == pruner.n_removed > 0
    assert stats.removed_during_phase == removed_during_phase == running.removed_filters
    assert stats.mean_steps_weak_before_removal == pytest.approx(
        pruner.steps_weak[removed].double().mean().item(), rel=1e-12)
    selected = int((pruner.history[-2] != A).sum())  # the weak set after the last attenuation step
    assert selected == stats.removed_filters  # the end of the phase removes exactly that set
    assert stats.churn * stats.attenuation_steps == pytest.approx(selected + 2 * stats.returns)
    if config.reversible or config.factor == 0 and config.eps == 0:  # sfp: zeroed filters return
        assert stats.returns > 0 and stats.kept_returns > 0

"""Fate statistics of a pruning phase, computed from its status history (docs/METHOD.md, "Fate
statistics"): returns, kept returns, churn of the weak set, removals during the phase and at its
end, steps weak before removal.

Pure functions of status matrices (numpy arrays or torch tensors, read without importing torch),
so that a run's record, a plot and a test can all compute them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .ops.status import ACTIVE, REMOVED, WEAK

__all__ = ["FateStatistics", "fate_statistics", "returns_per_filter", "status_matrix", "describe"]


@dataclass(frozen=True)
class FateStatistics:
    """The statistics of :func:`fate_statistics`; the names of the last six are summary.json's keys."""

    filters: int
    attenuation_steps: int
    returns: int
    kept_returns: int
    churn: Optional[float]  # None without an attenuation step
    removed_filters: int
    removed_during_phase: int
    mean_steps_weak_before_removal: Optional[float]  # None when no filter was removed

    @property
    def removed_at_end(self) -> int:
        return self.removed_filters - self.removed_during_phase

    def describe(self) -> str:
        return describe(dataclasses.asdict(self))


def status_matrix(name: str, matrix) -> np.ndarray:
    """``matrix`` as a 2-D int64 array of status codes; ValueError naming ``name`` otherwise."""
    if hasattr(matrix, "detach"):  # torch.Tensor, without importing torch here
        matrix = matrix.detach().cpu().numpy()
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D (steps, filters), got shape {matrix.shape}")
    if matrix.size and (matrix.min() < ACTIVE or matrix.max() > REMOVED):
        raise ValueError(f"{name} holds values outside {ACTIVE} (active), {WEAK} (weak), "
                         f"{REMOVED} (removed)")
    return matrix.astype(np.int64)


def returns_per_filter(status: np.ndarray) -> np.ndarray:
    """Per filter, its returns: the WEAK -> ACTIVE transitions between consecutive rows of a
    (steps, filters) status matrix that starts from the first attenuation step (before it every
    filter is active, so the first row holds no return)."""
    return ((status[:-1] == WEAK) & (status[1:] == ACTIVE)).sum(axis=0)


def _joined(history) -> np.ndarray:
    """One (rows, filters) matrix from a matrix or a mapping of per-layer matrices (layer order)."""
    if not isinstance(history, Mapping):
        return status_matrix("history", history)
    if not history:
        raise ValueError("history has no layers")
    layers = [status_matrix(f"history[{name!r}]", m) for name, m in history.items()]
    rows = {m.shape[0] for m in layers}
    if len(rows) > 1:
        shapes = {name: tuple(m.shape) for name, m in zip(history, layers)}
        raise ValueError(f"the layers' histories have different numbers of rows: {shapes}")
    return np.concatenate(layers, axis=1)


def fate_statistics(history, *, ended: bool) -> FateStatistics:
    """The fate statistics of a pruning phase from its status history.

    ``history``: the status of every filter after each attenuation step, a (rows, filters) matrix
    or a mapping of per-layer matrices (:meth:`attenuation.Pruner.status_history`); every filter is
    active before the first row. ``ended``: the phase has ended, so the last row is the status after
    the end-of-phase removal (``Pruner.finish`` appends it), not an attenuation step.

    - ``returns``: WEAK -> ACTIVE transitions between consecutive rows (the pruner's
      ``total_returns()``);
    - ``kept_returns``: filters with at least one return that are not removed in the last row;
    - ``churn``: the mean over attenuation steps of the filters entering the weak set (newly
      selected: ACTIVE -> WEAK, or ACTIVE -> REMOVED when a = 0 removes at once) plus those
      leaving it (returns). Removed filters stay in the weak set (the selection takes them
      first), so a removal is not a departure; None without an attenuation step. Once the phase
      ended this is (removed_filters + 2 returns) / attenuation steps;
    - ``removed_filters``: filters removed in the last row; ``removed_during_phase``: those
      removed by an attenuation step (the rest were removed at the end of the phase);
    - ``mean_steps_weak_before_removal``: over the removed filters, the mean number of attenuation
      steps that selected the filter while it was not yet removed (its ``steps_weak`` in
      fates.json: the rows where it is WEAK, plus the step that removed it); None when none was.

    A history in which a removed filter comes back, or whose last row, when ``ended``, does more
    or less than remove the weak filters, is not one of the rule's: ValueError.
    """
    status = _joined(history)
    n_rows, n_filters = status.shape
    if ended and n_rows == 0:
        raise ValueError("ended=True needs the end-of-phase row: the history is empty")
    removed = status == REMOVED
    if (removed[:-1] & ~removed[1:]).any():
        raise ValueError("a removed filter is not removed in a later row: removal is permanent")
    before = np.vstack([np.full((1, n_filters), ACTIVE), status])  # row i: status before row i
    if ended and (status[-1] != np.where(before[-2] == WEAK, REMOVED, before[-2])).any():
        raise ValueError("ended=True but the last row is not the end-of-phase removal (every weak "
                         "filter removed, nothing else changed): is the phase still running?")
    steps = n_rows - 1 if ended else n_rows
    newly_removed = removed & (before[:-1] != REMOVED)
    returns = returns_per_filter(before)
    entering = (before[:-1] == ACTIVE) & (status != ACTIVE)
    removed_last = removed[-1] if n_rows else np.zeros(n_filters, dtype=bool)
    steps_weak = ((status == WEAK) | newly_removed)[:steps].sum(axis=0)
    return FateStatistics(
        filters=n_filters,
        attenuation_steps=steps,
        returns=int(returns.sum()),
        kept_returns=int(((returns > 0) & ~removed_last).sum()),
        churn=float(entering[:steps].sum() + returns.sum()) / steps if steps else None,
        removed_filters=int(removed_last.sum()),
        removed_during_phase=int(newly_removed[:steps].sum()),
        mean_steps_weak_before_removal=(float(steps_weak[removed_last].mean())
                                        if removed_last.any() else None),
    )


def describe(values: Mapping) -> str:
    """One line for report.md and the fate plot, from the summary.json keys of
    :class:`FateStatistics` (``returns`` ... ``mean_steps_weak_before_removal``)."""
    removed, during = values["removed_filters"], values["removed_during_phase"]
    churn, weak = values["churn"], values["mean_steps_weak_before_removal"]
    churn_text = "no attenuation step" if churn is None else f"weak-set churn {churn:.2f} filters a step"
    weak_text = "" if weak is None else f", weak {weak:.1f} steps on average before removal"
    return (f"{values['returns']} returns ({values['kept_returns']} kept to the end), {churn_text}, "
            f"{removed} removed ({during} during the phase, {removed - during} at its end){weak_text}")

"""pareto.png: accuracy after pruning against MACs kept, one series per method and criterion."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from ..plots import _empty_figure, _save
from .results import TrialRecord
from .table import ALWAYS_SHOWN, Row, cells, option_text

__all__ = ["plot_pareto"]


def _baseline_accuracies(records: Sequence[TrialRecord]) -> list[float]:
    """One accuracy per distinct baseline: trials sharing a baseline_id count once; a trial with
    no baseline_id (a plain run folder) had its own."""
    by_baseline = {}
    for i, record in enumerate(records):
        if record.status == "ok":
            key = record.baseline_id if record.baseline_id is not None else ("own", i)
            by_baseline[key] = float(record.summary["baseline"]["accuracy"])
    return list(by_baseline.values())


def _series_label(row: Row) -> str:
    """method (criterion), then any other varying option as name=value."""
    extra = [f"{name}={option_text(value, '-')}" for name, value in row.options.items()
             if name not in ALWAYS_SHOWN]
    return ", ".join([f"{row.options['method']} ({row.options['criterion']})", *extra])


def _series(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Plottable rows (a finished trial with MACs known) by series label, by MACs kept."""
    series: dict[str, list[Row]] = {}
    for row in rows:
        if row.stats["accuracy"].mean is not None and row.stats["macs_removed"].mean is not None:
            series.setdefault(_series_label(row), []).append(row)
    for points in series.values():
        points.sort(key=lambda r: -r.stats["macs_removed"].mean)
    return series


def _draw_baseline(ax, accuracies: list[float]) -> None:
    mean = statistics.fmean(accuracies)
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    count = f", mean of {len(accuracies)}" if len(accuracies) > 1 else ""
    ax.axhline(mean, color="#555555", linestyle="--", linewidth=1.0)
    ax.errorbar([100.0], [mean], yerr=[std], fmt="*", markersize=11, color="#333333", capsize=3,
                label=f"baseline ({mean:.2f}%{count})")


def plot_pareto(records: Sequence[TrialRecord], path) -> Path:
    """Test accuracy after pruning against MACs kept (% of each trial's own baseline): the mean
    per cell with error bars of one standard deviation over seeds, a line per series, the
    baseline accuracy (mean over distinct baselines) as a star at 100% and a dashed line."""
    records = list(records)
    series = _series(cells(records))
    if not series:
        return _empty_figure(path, "no finished trials to plot")
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    for label, points in series.items():
        macs = [p.stats["macs_removed"] for p in points]
        accuracy = [p.stats["accuracy"] for p in points]
        ax.errorbar([100.0 - s.mean for s in macs], [s.mean for s in accuracy],
                    xerr=[s.std or 0.0 for s in macs], yerr=[s.std or 0.0 for s in accuracy],
                    marker="o", markersize=4, capsize=3, linewidth=1.2, label=label)
    _draw_baseline(ax, _baseline_accuracies(records))
    ax.set_xlabel("MACs kept (% of the baseline's)")
    ax.set_ylabel("test accuracy after pruning (%)")
    ax.set_title("Accuracy against MACs kept (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)

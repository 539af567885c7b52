"""PNG figures for a run: training curves and per-filter fates.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, so
this module never touches pyplot or the caller's global backend.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .fates import FateStatistics, returns_per_filter, status_matrix
from .files import atomic_open
from .ops.status import REMOVED, WEAK

__all__ = ["plot_training_curves", "plot_filter_fates"]

_FATE_NAMES = ("active", "weak", "removed")
_FATE_COLORS = ("#cfe3ef", "#f39c34", "#2b2b3a")

# One colour per known phase, so a phase looks the same in every run's figure.
_PHASE_COLORS = {
    "baseline": "#4c72b0",
    "attenuation": "#dd8452",
    "recovery": "#55a868",
    "removal": "#c44e52",
    "finetune": "#8172b3",
}
_FALLBACK_PHASE_COLORS = ("#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
_DPI = 120


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=_DPI)
    return path


def _column(metrics: Sequence[Mapping], key: str) -> np.ndarray:
    """Values of ``key`` as floats, NaN where a row lacks it or holds None."""
    values = [row.get(key) for row in metrics]
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _phase_spans(phases: Sequence[str], epochs: np.ndarray) -> list[tuple[str, float, float]]:
    """Consecutive runs of one phase as (name, x_start, x_end), epoch edges at +-0.5."""
    spans: list[tuple[str, float, float]] = []
    start = 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            spans.append((phases[start], epochs[start] - 0.5, epochs[i - 1] + 0.5))
            start = i
    return spans


def _phase_color(name: str, fallback: dict[str, str]) -> str:
    if name in _PHASE_COLORS:
        return _PHASE_COLORS[name]
    if name not in fallback:
        fallback[name] = _FALLBACK_PHASE_COLORS[len(fallback) % len(_FALLBACK_PHASE_COLORS)]
    return fallback[name]


def _plot_series(ax, x: np.ndarray, y: np.ndarray, **kwargs) -> None:
    """Line through the recorded points only, so sparse evaluations still connect.

    Markers are added when there are few points (a single epoch is otherwise invisible).
    """
    known = np.isfinite(y)
    marker = "o" if known.sum() <= 30 else None
    ax.plot(x[known], y[known], marker=marker, markersize=3.5, **kwargs)


def plot_training_curves(metrics: list[dict], path) -> Path:
    """Accuracy, loss and live-filter fraction against epoch, with phases shaded.

    ``metrics`` are the metrics.jsonl rows, one per epoch (keys ``phase``, ``epoch``,
    ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``val_loss``, ``val_acc``,
    ``live_fraction``); missing or None values are skipped, and a series with no value at all
    (the test set's with a validation split, the validation's without) is not drawn. Returns the
    written PNG path.
    """
    if not metrics:
        raise ValueError("plot_training_curves needs at least one metrics row")
    for i, row in enumerate(metrics):
        for key in ("phase", "epoch"):
            if row.get(key) is None:
                raise ValueError(f"metrics row {i} has no {key!r}: {row!r}")
    metrics = sorted(metrics, key=lambda row: row["epoch"])
    epochs = _column(metrics, "epoch")
    phases = [str(row["phase"]) for row in metrics]

    fig = Figure(figsize=(10, 8.5), layout="constrained")
    ax_acc, ax_loss, ax_live = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 2]}
    )
    for ax, quantity in ((ax_acc, "acc"), (ax_loss, "loss")):
        for split, label, color in (("train", "train", "C0"), ("test", "test", "C1"),
                                    ("val", "validation", "C2")):
            values = _column(metrics, f"{split}_{quantity}")
            if np.isfinite(values).any():
                _plot_series(ax, epochs, values, label=label, color=color)
    _plot_series(ax_live, epochs, _column(metrics, "live_fraction"), color="#333333")

    ax_acc.set_ylabel("accuracy (%)")
    ax_loss.set_ylabel("loss (log scale)")
    ax_loss.set_yscale("log")  # a spike (e.g. right after a one-shot removal) would flatten the rest
    ax_live.set_ylabel("live filter fraction")
    ax_live.set_ylim(-0.02, 1.05)
    ax_live.set_xlabel("epoch")
    ax_live.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_acc.legend(loc="lower right", fontsize="small")
    ax_loss.legend(loc="upper right", fontsize="small")

    fallback: dict[str, str] = {}
    spans = _phase_spans(phases, epochs)
    for name, x0, x1 in spans:
        color = _phase_color(name, fallback)
        for ax in (ax_acc, ax_loss, ax_live):
            ax.axvspan(x0, x1, color=color, alpha=0.10, linewidth=0)
            ax.axvline(x0, color=color, alpha=0.5, linewidth=0.8)
        # Names sit above the top panel, in axes-fraction y so data limits do not matter.
        ax_acc.text(
            (x0 + x1) / 2, 1.01, name, transform=ax_acc.get_xaxis_transform(),
            ha="center", va="bottom", fontsize="small", color=color, fontweight="bold",
        )
    ax_acc.set_xlim(spans[0][1], spans[-1][2])
    for ax in (ax_acc, ax_loss, ax_live):
        ax.grid(True, alpha=0.3)
    fig.suptitle("Training curves by phase")
    return _save(fig, path)


def _as_status_matrix(name: str, matrix, n_steps: int) -> np.ndarray:
    matrix = status_matrix(f"history[{name!r}]", matrix)
    if matrix.shape[0] != n_steps:
        raise ValueError(
            f"history[{name!r}] has {matrix.shape[0]} rows but {n_steps} steps were given"
        )
    return matrix


def _fate_order(status: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Filter order for one layer, with the group sizes and the number of returns.

    Removed filters come first, earliest removal first; then filters that were ever
    weak (most steps weak first); then filters that were never weak.
    """
    n_steps, n_filters = status.shape
    removed = status[-1] == REMOVED
    first_removed = np.where(removed, np.argmax(status == REMOVED, axis=0), n_steps)
    ever_weak = (status == WEAK).any(axis=0) & ~removed
    steps_weak = (status == WEAK).sum(axis=0)
    group = np.where(removed, 0, np.where(ever_weak, 1, 2))
    # lexsort sorts by the last key first.
    order = np.lexsort((np.arange(n_filters), -steps_weak, first_removed, group))
    returns = int(returns_per_filter(status).sum())
    return order, int(removed.sum()), int(ever_weak.sum()), returns


def _empty_figure(path, message: str) -> Path:
    fig = Figure(figsize=(6, 2.5))
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize="large")
    return _save(fig, path)


def plot_filter_fates(
    history: dict, steps: list[int], path, max_layers: int | None = None,
    statistics: Optional[FateStatistics] = None,
) -> Path:
    """One heatmap per conv layer of every filter's status after each attenuation step.

    ``history`` maps layer name to a (steps, n_filters) matrix of 0 active / 1 weak /
    2 removed (numpy array or torch tensor); ``steps`` holds the optimizer step of each
    row. Rows of a panel are filters sorted by fate. ``max_layers`` caps the panels
    drawn (the first layers in ``history`` order). ``statistics``, the model's fate
    statistics, are written under the title. Returns the written PNG path.
    """
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"max_layers must be a positive integer or None, got {max_layers!r}")
    steps = [int(s) for s in steps]
    layers = [(name, _as_status_matrix(name, m, len(steps))) for name, m in history.items()]
    if not layers or not steps:
        return _empty_figure(path, "no attenuation steps recorded")

    shown = layers if max_layers is None else layers[:max_layers]
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    # The extra width holds the legend on the right.
    fig = Figure(figsize=(max(3.4 * ncols + 1.3, 6.0), 2.7 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()

    cmap = ListedColormap(_FATE_COLORS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
    # Columns are attenuation-step indices; tick labels show the optimizer step.
    step_label = FuncFormatter(
        lambda x, _pos: str(steps[int(round(x))]) if 0 <= round(x) < len(steps) else ""
    )
    for ax, (name, status) in zip(axes, shown):
        n_filters = status.shape[1]
        if n_filters == 0:
            ax.text(0.5, 0.5, "no filters", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(name, fontsize="small")
            ax.set_axis_off()
            continue
        order, n_removed, n_ever_weak, returns = _fate_order(status)
        ax.imshow(
            status[:, order].T, cmap=cmap, norm=norm, aspect="auto",
            interpolation="nearest", origin="upper",
        )
        for boundary in (n_removed, n_removed + n_ever_weak):
            if 0 < boundary < n_filters:
                ax.axhline(boundary - 0.5, color="white", linewidth=0.8)
        ax.set_title(
            f"{name}\nremoved {n_removed}/{n_filters}, returns {returns}", fontsize="small"
        )
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.xaxis.set_major_formatter(step_label)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        ax.tick_params(labelsize="x-small")
    for ax in axes[len(shown):]:
        ax.set_axis_off()

    title = "Filter fates per layer"
    if len(shown) < len(layers):
        title += f"\nshowing {len(shown)} of {len(layers)} layers"
    if statistics is not None:  # wrapped to the figure's width (about 13 characters an inch)
        title += "\n" + textwrap.fill(statistics.describe(), int(fig.get_figwidth() * 13))
    fig.suptitle(title, fontsize="medium")
    fig.supxlabel("optimizer step of the attenuation step", fontsize="small")
    fig.supylabel("filters, sorted: removed (by step) | ever weak | never weak", fontsize="small")
    handles = [
        Patch(facecolor=c, edgecolor="#666666", label=n) for n, c in zip(_FATE_NAMES, _FATE_COLORS)
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    return _save(fig, path)

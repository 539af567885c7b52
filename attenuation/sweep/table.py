"""Trials grouped into cells (every option but the seed), with statistics over seeds, as
table.md and table.csv."""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..config import complete_config
from ..files import atomic_write_text
from .results import TrialRecord

__all__ = ["METRICS", "ALWAYS_SHOWN", "Stat", "Row", "cells", "choice_metric", "option_text",
           "table_markdown", "write_table_md", "write_table_csv"]

# Config keys that do not define a cell: trials differing only in these are seeds of one cell.
_NOT_A_CELL = ("seed", "out")
ALWAYS_SHOWN = ("method", "criterion", "ratio")
# name -> (markdown header, markdown format of the mean, whether the markdown shows the std)
METRICS = {
    "accuracy": ("test accuracy (%)", "{:.2f}", True),
    "val_accuracy": ("validation accuracy (%)", "{:.2f}", True),  # table.md: only when some trial has one
    "accuracy_change": ("accuracy change (points)", "{:+.2f}", True),  # the std loses the sign
    "macs_removed": ("MACs removed (%)", "{:.1f}", True),
    "params_removed": ("params removed (%)", "{:.1f}", True),
    "latency_ratio": ("latency ratio (baseline / pruned)", "{:.2f}x", True),
    # the unpruned over the pruned network's training step, timed in turns at the run's end
    "train_step_speedup": ("training-step speed-up (in turns)", "{:.2f}x", True),
    "returns": ("returns", "{:.1f}", False),
    "kept_returns": ("kept returns", "{:.1f}", False),
    "churn": ("weak-set churn (filters/step)", "{:.2f}", False),
    "removed_during_phase_percent": ("removed during the phase (%)", "{:.1f}", False),
    "wall_seconds": ("wall time (s)", "{:.1f}", False),
}
DASH = "—"  # an undefined value in the tables
_MISSING = object()  # an option a trial's config does not have
# A field a trial's config lacks was added after the trial ran: the trial is read with the value
# that reproduces it (as the sweep's manifest does).
_ADDED_LATER = complete_config({})


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1) of n values; None where undefined."""

    mean: Optional[float]
    std: Optional[float]
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        values = [float(v) for v in values]
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(mean, std, len(values))


@dataclass(frozen=True)
class Row:
    """One cell: its shown options, ok and failed trial counts, a Stat per METRICS name, and
    whether it is the best at its ratio by :func:`choice_metric`."""

    options: dict
    seeds: int
    failed: int
    stats: dict
    best: bool = False


def _percent_removed(base: float, pruned: float) -> Optional[float]:
    return 100.0 * (1.0 - pruned / base) if base else None


def _trial_metrics(summary: Mapping) -> dict:
    """Each METRICS value of one ok trial, None where it cannot be computed (a cell's Stat is
    over the trials that have the value: the latency ratio needs both latencies recorded, the
    fate statistics a summary that has them, the share removed during the phase a removal)."""
    base, pruned = summary["baseline"], summary["pruned"]
    base_latency, pruned_latency = base.get("latency_ms"), pruned.get("latency_ms")
    removed, during = summary.get("removed_filters"), summary.get("removed_during_phase")
    speed = summary.get("speed")  # absent from summaries written before runs timed it
    return {
        "accuracy": pruned["accuracy"],
        "val_accuracy": pruned.get("val_accuracy"),  # absent from summaries older than the split
        "accuracy_change": pruned["accuracy"] - base["accuracy"],
        "macs_removed": _percent_removed(base["macs"], pruned["macs"]),
        "params_removed": _percent_removed(base["params"], pruned["params"]),
        "latency_ratio": base_latency / pruned_latency if base_latency and pruned_latency else None,
        "train_step_speedup": (speed["baseline_train_step_ms"] / speed["pruned_train_step_ms"]
                               if speed else None),
        "returns": summary["returns"],
        "kept_returns": summary.get("kept_returns"),
        "churn": summary.get("churn"),
        "removed_during_phase_percent": 100.0 * during / removed if removed and during is not None else None,
        "wall_seconds": summary["wall_seconds"],
    }


def _canonical(value) -> str:
    return "<missing>" if value is _MISSING else json.dumps(value, sort_keys=True)


def _option(config: Mapping, name: str):
    return config[name] if name in config else _ADDED_LATER.get(name, _MISSING)


def _cell_key(config: Mapping, names: Sequence[str]) -> tuple:
    return tuple(_canonical(_option(config, name)) for name in names)


def in_cell(config: Mapping, row: "Row") -> bool:
    """Whether a trial of configuration ``config`` belongs to ``row``'s cell (its shown options;
    :func:`cells` shows every option that varies)."""
    return all(_canonical(_option(config, name)) == _canonical(value) for name, value in row.options.items())


def _option_names(records: Sequence[TrialRecord]) -> list[str]:
    """Every config key but seed and out, in first-seen order."""
    names = {}
    for record in records:
        names.update(dict.fromkeys(k for k in record.config if k not in _NOT_A_CELL))
    return list(names)


def _shown_names(records: Sequence[TrialRecord], names: Sequence[str]) -> list[str]:
    varying = [name for name in names if name not in ALWAYS_SHOWN
               and len({_canonical(_option(r.config, name)) for r in records}) > 1]
    return [*ALWAYS_SHOWN, *varying]


def _row(group: Sequence[TrialRecord], shown: Sequence[str]) -> Row:
    ok = [_trial_metrics(r.summary) for r in group if r.status == "ok"]
    stats = {name: Stat.of([m[name] for m in ok if m[name] is not None]) for name in METRICS}
    options = {name: _option(group[0].config, name) for name in shown}
    return Row(options=options, seeds=len(ok), failed=len(group) - len(ok), stats=stats)


def choice_metric(rows: Sequence[Row]) -> str:
    """What the best cell at a ratio is chosen by: the mean validation accuracy when some trial
    has one (a variant is never chosen by its test accuracy then; cells without one are not
    candidates), else the test accuracy."""
    return "val_accuracy" if any(row.stats["val_accuracy"].n for row in rows) else "accuracy"


def _mark_best(rows: list[Row]) -> list[Row]:
    """Rows whose mean of :func:`choice_metric` is the highest at their ratio get best=True
    (ties: all)."""
    metric = choice_metric(rows)
    best = {}
    for row in rows:
        mean, ratio = row.stats[metric].mean, _canonical(row.options["ratio"])
        if mean is not None:
            best[ratio] = max(mean, best.get(ratio, mean))
    return [replace(row, best=row.stats[metric].mean is not None
                    and row.stats[metric].mean == best[_canonical(row.options["ratio"])])
            for row in rows]


def cells(records: Sequence[TrialRecord]) -> list[Row]:
    """The trials grouped by their config minus seed and out, one Row per group.

    Rows show method, criterion, ratio and every other option that varies among the records;
    they are sorted by ratio, method, criterion, then the other shown options.
    """
    records = list(records)
    if not records:
        raise ValueError("no trials to aggregate")
    for record in records:
        if not isinstance(record, TrialRecord):
            raise TypeError(f"records must be TrialRecord objects, got {type(record).__name__}")
    names = _option_names(records)
    groups: dict[tuple, list[TrialRecord]] = {}
    for record in records:
        groups.setdefault(_cell_key(record.config, names), []).append(record)
    shown = _shown_names(records, names)
    rows = [_row(group, shown) for group in groups.values()]
    order = ["method", "criterion", *shown[len(ALWAYS_SHOWN):]]
    rows.sort(key=lambda r: (r.options["ratio"], *(_canonical(r.options[n]) for n in order)))
    return _mark_best(rows)


def option_text(value, none: str) -> str:
    """An option as table text: strings as they are, other values as JSON, ``none`` for None
    and "(absent)" for a key the trial's config lacks."""
    if value is _MISSING:
        return "(absent)"
    if value is None:
        return none
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def stat_text(stat: Stat, fmt: str, show_std: bool) -> str:
    if stat.mean is None:
        return DASH
    text = fmt.format(stat.mean)
    if show_std:
        text += " ± " + (DASH if stat.std is None else fmt.format(stat.std).lstrip("+"))
    return text


def _shown_metrics(rows: Sequence[Row]) -> list[str]:
    """The METRICS of table.md: the validation accuracy only when some trial has one."""
    return [name for name in METRICS if name != "val_accuracy" or choice_metric(rows) == name]


def _row_md(row: Row, metrics: Sequence[str], chosen_by: str) -> str:
    options = [option_text(v, DASH).replace("|", "\\|") for v in row.options.values()]
    if row.seeds == 0:
        stats = ["failed"] * len(metrics)
    else:
        stats = []
        for name in metrics:
            _, fmt, show_std = METRICS[name]
            text = stat_text(row.stats[name], fmt, show_std)
            stats.append(f"**{text}**" if row.best and name == chosen_by else text)
    return "| " + " | ".join([*options, str(row.seeds), str(row.failed), *stats]) + " |"


def table_markdown(rows: Sequence[Row]) -> str:
    """The rows as a markdown table with a legend; the best per ratio (:func:`choice_metric`) in
    bold."""
    if not rows:
        raise ValueError("no rows to write")
    metrics, chosen_by = _shown_metrics(rows), choice_metric(rows)
    headers = [*rows[0].options, "seeds", "failed", *(METRICS[name][0] for name in metrics)]
    aligns = ["---"] * len(rows[0].options) + ["---:"] * (len(headers) - len(rows[0].options))
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(aligns) + " |",
        *(_row_md(row, metrics, chosen_by) for row in rows),
        "",
        f"Mean ± sample standard deviation over the seeds of a cell ({DASH} with one seed); "
        "seeds: finished trials, failed: failed trials. Accuracy change is against each trial's "
        "own baseline; MACs and parameters removed are relative to it too. Latency ratio: baseline "
        f"over pruned latency ({DASH} where the baseline latency was not recorded), each measured "
        "at its phase's end; training-step speed-up: the unpruned over the pruned network's "
        f"training step, timed in turns at the run's end ({DASH} for runs before it). Kept returns: "
        "filters that returned and were not removed; weak-set churn: filters entering or leaving "
        "the weak set per attenuation step; removed during the phase: the share of the removed "
        "filters removed by attenuation steps, the rest at the phase's end (docs/METHOD.md, "
        f"\"Fate statistics\"; {DASH} for results written before them). "
        + ("Bold: the best validation accuracy at its ratio (cells are chosen by it, never by the "
           "test accuracy)." if chosen_by == "val_accuracy" else "Bold: the best test accuracy at its "
           "ratio."),
    ]
    return "\n".join(lines) + "\n"


def write_table_md(rows: Sequence[Row], path) -> Path:
    """table.md, written atomically."""
    return atomic_write_text(path, table_markdown(rows))


def _number_csv(value: Optional[float]) -> str:
    return "" if value is None else repr(float(value))


def write_table_csv(rows: Sequence[Row], path) -> Path:
    """table.csv, written atomically: the shown options (JSON for non-strings, empty for None),
    seeds, failed, then <metric>_mean and <metric>_std for every METRICS name, empty where
    undefined; numbers at full precision (repr), so the file reads back exactly."""
    if not rows:
        raise ValueError("no rows to write")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stat_columns = [f"{name}_{part}" for name in METRICS for part in ("mean", "std")]
    writer.writerow([*rows[0].options, "seeds", "failed", *stat_columns])
    for row in rows:
        stats = [_number_csv(getattr(row.stats[name], part))
                 for name in METRICS for part in ("mean", "std")]
        options = [option_text(v, "") for v in row.options.values()]
        writer.writerow([*options, row.seeds, row.failed, *stats])
    return atomic_write_text(path, buffer.getvalue())

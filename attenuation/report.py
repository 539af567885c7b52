"""A run's summary.json and its human-readable report.md."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path

from .fates import describe
from .files import atomic_write_text

__all__ = [
    "SUMMARY_KEYS",
    "SECTION_KEYS",
    "SPEED_KEYS",
    "PHASE_KEYS",
    "format_count",
    "make_summary",
    "write_summary",
    "write_report",
]

# The numbers of summary.json's "baseline" and "pruned" sections and their types: accuracy is the
# test set's, val_accuracy the validation split's (None without one: it is what variants are chosen
# by), latency_ms None when not measured.
_SECTION_TYPES: dict[str, type] = {"accuracy": float, "params": int, "macs": int, "latency_ms": float,
                                   "val_accuracy": float}
_SECTION_OPTIONAL = ("latency_ms", "val_accuracy")
SECTION_KEYS = tuple(_SECTION_TYPES)
# summary.json's "speed": the unpruned and the pruned network's forward pass and training step,
# timed in turns at the end of the run (profiling.time_in_turns), so that their ratio is free of
# the machine's drift between the phases.
_SPEED_TYPES: dict[str, type] = {"batch_size": int, "baseline_forward_ms": float, "pruned_forward_ms": float,
                                 "baseline_train_step_ms": float, "pruned_train_step_ms": float}
SPEED_KEYS = tuple(_SPEED_TYPES)

# The exact summary.json schema: top-level key -> its sub-keys (None for a scalar).
# Iterating yields the top-level keys in the order they are written.
SUMMARY_KEYS: dict[str, tuple[str, ...] | None] = {
    "method": None,
    "criterion": None,
    "ratio": None,
    "data_source": None,
    "device": None,
    "wall_seconds": None,
    "baseline": SECTION_KEYS,
    "pruned": SECTION_KEYS,
    "speed": SPEED_KEYS,
    "returns": None,
    "removed_filters": None,
    # fate statistics (attenuation/fates.py; docs/METHOD.md, "Fate statistics")
    "kept_returns": None,
    "churn": None,
    "removed_during_phase": None,
    "mean_steps_weak_before_removal": None,
}

# Keys a phase row of the report table may carry; all but "phase" may be missing or None.
PHASE_KEYS = ("phase", "accuracy", "val_accuracy", "params", "macs", "latency_ms", "seconds")
_DASH = "—"
_UNITS = ("", "K", "M", "G", "T")


def format_count(n: float) -> str:
    """A count with a K/M/G/T suffix: 950K, 1.23M, 14.7M, 313.2M.

    Two decimals below 10 of the unit, one above, trailing zeros dropped.
    """
    value = float(n)
    if not math.isfinite(value):
        raise ValueError(f"cannot format a non-finite count: {n!r}")
    sign = "-" if value < 0 else ""
    value = abs(value)
    for i, unit in enumerate(_UNITS):
        scaled = value / 1000**i
        text = f"{scaled:.2f}" if scaled < 10 else f"{scaled:.1f}"
        # Rounding may carry into the next unit (999_960 -> "1000.0K"): move up then.
        if float(text) < 1000 or i == len(_UNITS) - 1:
            return sign + text.rstrip("0").rstrip(".") + unit
    raise AssertionError("unreachable")


def _number(name: str, value, kind: type) -> int | float:
    """``value`` as a plain, finite Python int or float (numpy and torch scalars accepted)."""
    if isinstance(value, (bool, str)) or value is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if kind is int:
        if not as_float.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    return as_float


def _optional_number(name: str, value, kind: type) -> int | float | None:
    return None if value is None else _number(name, value, kind)


def _section(
    name: str, given: Mapping, casts: dict[str, type], optional: tuple[str, ...] = ()
) -> dict:
    """The ``casts`` keys of ``given`` as plain numbers; keys in ``optional`` may be None."""
    if not isinstance(given, Mapping):
        raise ValueError(f"{name} must be a dict, got {type(given).__name__}")
    out = {}
    for key, kind in casts.items():
        if key not in given:
            raise ValueError(f"{name} is missing the key {key!r} (has {sorted(given)})")
        number = _optional_number if key in optional else _number
        out[key] = number(f"{name}.{key}", given[key], kind)
    return out


def make_summary(
    method: str,
    criterion: str,
    ratio: float,
    data_source: str,
    device: str,
    wall_seconds: float,
    baseline: dict,
    pruned: dict,
    speed: dict,
    returns: int,
    removed_filters: int,
    kept_returns: int,
    churn: float | None,
    removed_during_phase: int,
    mean_steps_weak_before_removal: float | None,
) -> dict:
    """The summary.json content, exactly ``SUMMARY_KEYS``, with plain Python numbers.

    ``baseline`` and ``pruned`` need every ``SECTION_KEYS`` key: accuracy/params/macs, latency_ms
    (None when not measured) and val_accuracy (None without a validation split); extra keys in
    either are ignored. ``speed`` needs every ``SPEED_KEYS`` key, times positive. Accuracies are
    in percent. The last four are
    :class:`attenuation.fates.FateStatistics` fields; churn is None without an attenuation step,
    mean_steps_weak_before_removal when no filter was removed.
    """
    summary = {
        "method": str(method),
        "criterion": str(criterion),
        "ratio": _number("ratio", ratio, float),
        "data_source": str(data_source),
        "device": str(device),
        "wall_seconds": _number("wall_seconds", wall_seconds, float),
        "baseline": _section("baseline", baseline, _SECTION_TYPES, optional=_SECTION_OPTIONAL),
        "pruned": _section("pruned", pruned, _SECTION_TYPES, optional=_SECTION_OPTIONAL),
        "speed": _section("speed", speed, _SPEED_TYPES),
        "returns": _number("returns", returns, int),
        "removed_filters": _number("removed_filters", removed_filters, int),
        "kept_returns": _number("kept_returns", kept_returns, int),
        "churn": _optional_number("churn", churn, float),
        "removed_during_phase": _number("removed_during_phase", removed_during_phase, int),
        "mean_steps_weak_before_removal": _optional_number(
            "mean_steps_weak_before_removal", mean_steps_weak_before_removal, float
        ),
    }
    for key, value in summary["speed"].items():
        if not value > 0:
            raise ValueError(f"speed.{key} must be positive, got {value!r}")
    for part, whole in (("kept_returns", "returns"), ("removed_during_phase", "removed_filters")):
        if not 0 <= summary[part] <= summary[whole]:
            raise ValueError(f"{part} must be in [0, {whole}] = [0, {summary[whole]}], "
                             f"got {summary[part]}")
    _check_keys(summary)
    return summary


def _check_keys(summary: Mapping) -> None:
    """Raise ValueError unless ``summary`` has exactly the ``SUMMARY_KEYS`` layout."""
    if set(summary) != set(SUMMARY_KEYS):
        missing = sorted(set(SUMMARY_KEYS) - set(summary))
        extra = sorted(set(summary) - set(SUMMARY_KEYS))
        raise ValueError(
            f"summary keys differ from SUMMARY_KEYS: missing {missing}, unexpected {extra}"
        )
    for key, sub_keys in SUMMARY_KEYS.items():
        if sub_keys is None:
            continue
        section = summary[key]
        if not isinstance(section, Mapping) or set(section) != set(sub_keys):
            found = sorted(section) if isinstance(section, Mapping) else type(section).__name__
            raise ValueError(
                f"summary[{key!r}] must have exactly the keys {list(sub_keys)}, got {found}"
            )


def write_summary(summary: dict, path) -> Path:
    """Validate ``summary`` against ``SUMMARY_KEYS`` and write it as JSON, atomically."""
    _check_keys(summary)
    # allow_nan=False: NaN/Infinity are not JSON and would break strict readers.
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def _cell(value, fmt) -> str:
    return _DASH if value is None else fmt(value)


def _phase_rows(phases: list[dict], latency_batch: int) -> list[str]:
    """The phase table; a validation accuracy column when some row has one."""
    with_val = any(row.get("val_accuracy") is not None for row in phases)
    lines = [
        "| phase | test accuracy (%) | " + ("validation accuracy (%) | " if with_val else "")
        + f"parameters | MACs | latency (ms, batch {latency_batch}) | wall time (s) |",
        "| --- |" + " ---: |" * (6 if with_val else 5),
    ]
    for i, row in enumerate(phases):
        unknown = set(row) - set(PHASE_KEYS)
        if "phase" not in row or unknown:
            raise ValueError(
                f"phases[{i}] must have a 'phase' key and only keys from {PHASE_KEYS}; "
                f"got {sorted(row)}"
            )
        cells = (
            str(row["phase"]),
            _cell(row.get("accuracy"), lambda v: f"{v:.2f}"),
            *([_cell(row.get("val_accuracy"), lambda v: f"{v:.2f}")] if with_val else []),
            _cell(row.get("params"), format_count),
            _cell(row.get("macs"), format_count),
            _cell(row.get("latency_ms"), lambda v: f"{v:.2f}"),
            _cell(row.get("seconds"), lambda v: f"{v:.1f}"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _comparison(summary: Mapping, baseline_latency_ms: float | None) -> str:
    base, pruned = summary["baseline"], summary["pruned"]

    def reduction(key: str) -> str:
        return f"{100 * (1 - pruned[key] / base[key]):.1f}%" if base[key] else _DASH

    if baseline_latency_ms is not None and pruned["latency_ms"]:
        latency = (
            f"latency {pruned['latency_ms']:.2f} vs {baseline_latency_ms:.2f} ms "
            f"(speedup {baseline_latency_ms / pruned['latency_ms']:.2f}x)"
        )
    else:
        latency = f"latency speedup {_DASH} (not measured)"
    accuracy_change = f"{pruned['accuracy'] - base['accuracy']:+.2f}".replace("-", "−")
    validation = ""
    if base["val_accuracy"] is not None and pruned["val_accuracy"] is not None:
        validation = (f", validation accuracy {pruned['val_accuracy']:.2f}% vs "
                      f"{base['val_accuracy']:.2f}%")
    speed = summary["speed"]
    return (
        f"Pruned vs baseline: MACs {format_count(pruned['macs'])} vs "
        f"{format_count(base['macs'])} (reduction {reduction('macs')}), parameters "
        f"{format_count(pruned['params'])} vs {format_count(base['params'])} "
        f"(reduction {reduction('params')}), {latency}, accuracy {pruned['accuracy']:.2f}% vs "
        f"{base['accuracy']:.2f}% ({accuracy_change} points){validation}. Timed in turns at the "
        f"end of the run (batch {speed['batch_size']}; the latencies above were measured at each "
        f"phase's end, minutes apart): forward pass {speed['pruned_forward_ms']:.2f} vs "
        f"{speed['baseline_forward_ms']:.2f} ms "
        f"({speed['pruned_forward_ms'] / speed['baseline_forward_ms']:.2f}x the time), training "
        f"step {speed['pruned_train_step_ms']:.2f} vs {speed['baseline_train_step_ms']:.2f} ms "
        f"({_step_ratio(speed):.2f}x the time)."
    )


def _step_ratio(speed: Mapping) -> float:
    """The pruned over the unpruned network's training step, timed in turns (summary "speed")."""
    return speed["pruned_train_step_ms"] / speed["baseline_train_step_ms"]


def _epoch_cost_rows(epochs: list[dict], speed: Mapping) -> list[str]:
    """Each epoch after the baseline against the baseline epochs' median time, next to its MACs as
    a fraction of the first epoch's (at the epoch's end): what pruning makes training cost, with
    the training steps timed in turns (``speed``) as the figure free of the machine's drift. Empty
    without baseline epochs."""
    baseline = [row["seconds"] for row in epochs if row["phase"] == "baseline"]
    if not baseline or not epochs[0].get("macs"):
        return []
    median = statistics.median(baseline)
    full_macs = epochs[0]["macs"]
    lines = ["## Epoch times", "",
             f"Each epoch after the baseline against the baseline epochs' median ({median:.1f} s), and its "
             "live MACs at the epoch's end against the unpruned network's. Epochs minutes apart also "
             "differ by the machine's drift in speed; the pruned network's training step timed in "
             f"turns with the unpruned one's took "
             f"{_step_ratio(speed):.2f}x its time.", "",
             "| epoch | phase | time (s) | x baseline median | live MACs fraction |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for row in epochs:
        if row["phase"] != "baseline":
            fraction = _cell(row.get("macs"), lambda macs: f"{macs / full_macs:.2f}")
            lines.append(f"| {row['epoch']} | {row['phase']} | {row['seconds']:.1f} | "
                         f"{row['seconds'] / median:.2f} | {fraction} |")
    return lines + [""]


def _mentions_jpeg_copy(data_source: str) -> bool:
    source = data_source.lower()
    return any(word in source for word in ("npz", "jpeg", "jpg"))


def write_report(
    path,
    *,
    title: str,
    config: dict,
    data_source: str,
    device: str,
    phases: list[dict],
    latency_batch: int,
    summary: dict,
    plots: list[str],
    notes: Iterable[str] = (),
    epochs: Iterable[dict] = (),
) -> Path:
    """Write report.md (atomically) and return its path.

    ``phases`` rows hold ``PHASE_KEYS``: phase, accuracy (test, %), val_accuracy (%, with a
    validation split), params, macs, latency_ms (measured at batch ``latency_batch``), seconds;
    all but phase may be None.
    The baseline latency used for the speedup is taken from the row whose phase is
    "baseline". ``plots`` are file names relative to the report. ``epochs``: the metrics.jsonl
    rows (phase, epoch, seconds, macs), for the table of epoch times.
    """
    _check_keys(summary)
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1:
        raise ValueError(f"latency_batch must be a positive int, got {latency_batch!r}")
    table = _phase_rows(phases, latency_batch)
    baseline_latency = next(
        (row.get("latency_ms") for row in phases if row.get("phase") == "baseline"), None
    )

    data_line = f"Data: {data_source}."
    if _mentions_jpeg_copy(data_source):
        data_line += (
            " This is the JPEG-compressed (lossy) copy of CIFAR-10: accuracies are not directly "
            "comparable with published CIFAR-10 numbers (comparisons between runs on this "
            "copy are fair)."
        )
    lines = [
        f"# {title}",
        "",
        f"Method: {summary['method']}, criterion: {summary['criterion']}, "
        f"target ratio: {summary['ratio']:g}, total wall time: {summary['wall_seconds']:.1f} s.",
        "",
        data_line,
        "",
        f"Device: {device}.",
        "",
        "## Phases",
        "",
        *table,
        "",
        _comparison(summary, baseline_latency),
        "",
        f"Filter fates: {describe(summary)}.",
        "",
        *_epoch_cost_rows(list(epochs), summary["speed"]),
    ]
    notes = list(notes)
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines += [f"![{Path(plot).stem.replace('_', ' ')}]({plot})", ""]
    lines += [
        "## Configuration",
        "",
        "<details><summary>run configuration (JSON)</summary>",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "</details>",
        "",
    ]
    return atomic_write_text(path, "\n".join(lines))

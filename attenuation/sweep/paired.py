"""Paired differences: each cell of a reference method against every other method's cell at the
same ratio and criterion, trial by trial over the trials that share a baseline (same seed, same
trained network), so that the baseline's own spread cancels out. paired.md."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..files import atomic_write_text
from .results import TrialRecord
from .table import DASH, Row, Stat, cells, in_cell, option_text, stat_text

__all__ = ["Pair", "paired_differences", "paired_markdown", "write_paired_md"]


@dataclass(frozen=True)
class Pair:
    """``reference`` minus ``against`` (cells' shown options), per shared baseline: test and
    validation accuracy differences in points."""
    reference: dict
    against: dict
    baselines: tuple          # the shared baseline ids, sorted
    test: tuple               # per baseline, in the order of ``baselines``
    val: tuple                # per baseline; None where either trial has no validation accuracy

    @property
    def test_stat(self) -> Stat:
        return Stat.of(self.test)

    @property
    def val_stat(self) -> Stat:
        return Stat.of([v for v in self.val if v is not None])


def _accuracies(records: Sequence[TrialRecord], row: Row) -> dict:
    """baseline id -> (test, val) accuracy of the ok trials of ``row``'s cell."""
    out = {}
    for record in records:
        if record.status == "ok" and record.baseline_id is not None and in_cell(record.config, row):
            pruned = record.summary["pruned"]
            out[record.baseline_id] = (pruned["accuracy"], pruned.get("val_accuracy"))
    return out


def paired_differences(records: Sequence[TrialRecord], reference_method: str = "attenuation") -> list[Pair]:
    """Every cell of ``reference_method`` against every cell of another method (``none``
    excepted: it prunes nothing) with the same ratio and criterion, over their shared baselines."""
    records = list(records)
    rows = cells(records)
    per_row = [(row, _accuracies(records, row)) for row in rows]
    pairs = []
    for ref, ref_acc in per_row:
        if ref.options["method"] != reference_method:
            continue
        for other, other_acc in per_row:
            if (other.options["method"] in (reference_method, "none")
                    or other.options["ratio"] != ref.options["ratio"]
                    or other.options["criterion"] != ref.options["criterion"]):
                continue
            shared = sorted(set(ref_acc) & set(other_acc))
            if not shared:
                continue
            test = tuple(ref_acc[b][0] - other_acc[b][0] for b in shared)
            val = tuple(None if ref_acc[b][1] is None or other_acc[b][1] is None
                        else ref_acc[b][1] - other_acc[b][1] for b in shared)
            pairs.append(Pair(ref.options, other.options, tuple(shared), test, val))
    return pairs


def _variant(options: dict, skip: Sequence[str]) -> str:
    parts = [f"{k}={option_text(v, DASH)}" for k, v in options.items() if k not in skip and v is not None]
    return ", ".join(parts) or "defaults"


def paired_markdown(pairs: Sequence[Pair], reference_method: str = "attenuation") -> str:
    if not pairs:
        raise ValueError(f"no {reference_method} cell shares a baseline with another method's cell")
    lines = [
        f"| ratio | criterion | {reference_method} variant | against | seeds | test difference (points) | "
        "validation difference (points) | per seed (test) |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for pair in pairs:
        per_seed = ", ".join(f"{d:+.2f}" for d in pair.test)
        lines.append(
            f"| {option_text(pair.reference['ratio'], DASH)} | {option_text(pair.reference['criterion'], DASH)} "
            f"| {_variant(pair.reference, ('method', 'ratio', 'criterion'))} "
            f"| {_variant(pair.against, ('ratio', 'criterion'))} | {len(pair.test)} "
            f"| {stat_text(pair.test_stat, '{:+.2f}', True)} | {stat_text(pair.val_stat, '{:+.2f}', True)} | {per_seed} |")
    lines += ["", f"{reference_method} minus the other method, trial by trial over the trials that start "
              "from the same baseline (same seed), then the mean ± sample standard deviation of those "
              f"differences ({DASH} with one). Positive: {reference_method} is ahead."]
    return "\n".join(lines) + "\n"


def write_paired_md(records: Sequence[TrialRecord], path, reference_method: str = "attenuation") -> Optional[Path]:
    """paired.md, written atomically; None (nothing written) when no pair exists."""
    pairs = paired_differences(records, reference_method)
    return atomic_write_text(path, paired_markdown(pairs, reference_method)) if pairs else None

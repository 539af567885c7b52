"""Experiments at scale: ``attenuation sweep`` (grids of runs as Ray Tune trials with shared
baselines, resumable) and ``attenuation compare`` (results.jsonl records, per-cell tables over
seeds, the Pareto plot)."""
from .compare import compare
from .pareto import plot_pareto
from .results import TrialRecord, append_result, load_trials, read_results
from .table import Row, Stat, cells, write_table_csv, write_table_md

__all__ = ["TrialRecord", "append_result", "read_results", "load_trials", "Stat", "Row", "cells",
           "write_table_md", "write_table_csv", "plot_pareto", "compare"]

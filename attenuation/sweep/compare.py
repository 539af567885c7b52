"""``attenuation compare DIR [DIR ...]``: one table and one Pareto plot from sweep folders and
plain run folders, so results of different sweeps can be put side by side."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from .paired import write_paired_md
from .pareto import plot_pareto
from .results import load_trials
from .table import Row, cells, write_table_csv, write_table_md

__all__ = ["compare", "add_arguments", "run_command"]


def compare(dirs: Iterable, out_dir) -> list[Row]:
    """Write table.md, table.csv and pareto.png for the trials of ``dirs`` into ``out_dir``, and
    paired.md where attenuation cells share baselines with other methods' cells; return the
    table's rows."""
    records = load_trials(dirs)
    rows = cells(records)
    out = Path(out_dir)
    write_table_md(rows, out / "table.md")
    write_table_csv(rows, out / "table.csv")
    plot_pareto(records, out / "pareto.png")
    write_paired_md(records, out / "paired.md")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="sweep folders (results.jsonl) and run folders "
                             "(config.json + summary.json)")
    parser.add_argument("--out", default="comparison",
                        help="folder for table.md, table.csv and pareto.png "
                             "(default: ./comparison)")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed ``attenuation compare``: 0 on success, 2 with the reason on bad input."""
    try:
        rows = compare(args.dirs, args.out)
    except ValueError as error:
        print(f"attenuation compare: error: {error}", file=sys.stderr)
        return 2
    trials = sum(row.seeds + row.failed for row in rows)
    print(f"{len(rows)} cells from {trials} trials: "
          f"{Path(args.out) / 'table.md'}, table.csv, pareto.png")
    return 0


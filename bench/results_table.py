"""Turn suite reports into bench/RESULTS.md: tables per device, each with the date and commit of
its figures.

    python -m bench.results_table [--add DIR/report.json ...]

``--add`` publishes reports: each is copied into bench/results/ as
``suite-<device>-<date>.json`` (a quick report, sized to check the suite, is refused). Then
bench/RESULTS.md is written anew from every ``bench/results/suite-*.json``: per device, newest
first.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import report
from .environment import REPO, device_slug

RESULTS = REPO / "bench" / "results"
OUTPUT = REPO / "bench" / "RESULTS.md"


def published_name(record: dict) -> str:
    env = record["environment"]
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    return f"suite-{device_slug(env)}-{stamp}.json"


def add(path: Path, results: Path) -> Path:
    record = json.loads(path.read_text())
    if record.get("format") != "attenuation.bench-suite/1":
        raise ValueError(f"{path} is not a bench.suite report")
    if record["quick"]:
        raise ValueError(f"{path} is a --quick report (sizes for checking the suite): not published")
    target = results / published_name(record)
    shutil.copyfile(path, target)
    return target


def render(reports: list[tuple[Path, dict]]) -> str:
    by_device: dict[str, list[tuple[Path, dict]]] = {}
    for path, record in sorted(reports, key=lambda item: item[1]["environment"]["date"], reverse=True):
        by_device.setdefault(report.device_name(record["environment"]), []).append((path, record))
    index = [[device, record["environment"]["date"][:10], record["environment"]["commit"]["sha"][:10],
              f"[{path.name}](results/{path.name})"]
             for device, items in by_device.items() for path, record in items]
    lines = ["# Benchmark results", "",
             "Written by `python -m bench.results_table` from the suite reports in `bench/results/` "
             "(`python -m bench.suite --out DIR`, then `python -m bench.results_table --add "
             "DIR/report.json`); do not edit by hand. Every ratio in a table was measured in the "
             "same run as the figures it compares.", "",
             *report.markdown_table(["device", "date", "commit", "report"], index)]
    for device, items in by_device.items():
        lines += ["", f"## {device}"]
        for path, record in items:
            lines += ["", report.render(record, level=3)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.results_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--add", nargs="+", type=Path, default=[], metavar="REPORT",
                        help="suite report.json files to publish into bench/results/")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of published reports")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="markdown file to write")
    args = parser.parse_args(argv)
    try:
        for path in args.add:
            print(f"published {add(path, args.results)}")
    except (OSError, ValueError, KeyError) as error:
        print(f"bench.results_table: error: {error}", file=sys.stderr)
        return 2
    reports = [(path, json.loads(path.read_text())) for path in sorted(args.results.glob("suite-*.json"))]
    args.output.write_text(render(reports))
    print(f"wrote {args.output} from {len(reports)} report(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

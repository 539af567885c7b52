"""``attenuation sweep``: every option of ``attenuation run``, each a comma-separated list; the
cross product runs as Ray Tune trials with shared baselines (see :mod:`.engine`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import PHASES

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _boolean(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError("expected true or false")


def _converter(keywords: dict):
    """The run option's parsing of one value: its type, its choices, booleans as true/false."""
    if keywords.get("action") is argparse.BooleanOptionalAction:
        return _boolean
    convert, choices = keywords.get("type", str), keywords.get("choices")

    def one(text: str):
        value = convert(text)
        if choices is not None and value not in choices:
            raise ValueError(f"choose from {', '.join(map(str, choices))}")
        return value
    return one


def add_arguments(parser: argparse.ArgumentParser, field_options: dict[str, tuple[str, dict]]) -> None:
    """The run's options as lists (``field_options``: the run command's, by RunConfig field),
    plus where and how the trials run."""
    grid = parser.add_argument_group("the grid: any run option, as a comma-separated list")
    for name, (_, keywords) in field_options.items():
        if name == "out":
            continue
        grid.add_argument("--" + name.replace("_", "-"), dest=name, metavar="LIST",
                          help=keywords.get("help"))
    for phase in PHASES:
        grid.add_argument(f"--epochs-{phase}", dest=f"epochs_{phase}", metavar="LIST",
                          help=f"epochs of the {phase} phase")
    where = parser.add_argument_group("where the trials run")
    where.add_argument("--out", required=True, help="the sweep folder (resumed when it exists)")
    where.add_argument("--address", help="HOST:PORT (or auto) of a Ray cluster to join; default: a "
                                         "local Ray instance")
    where.add_argument("--cpus-per-trial", type=float, default=1.0,
                       help="CPUs (and torch threads) per trial")
    where.add_argument("--gpus-per-trial", type=float, default=0.0,
                       help="GPUs per trial; a fraction lets several trials share one GPU")
    where.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    where.add_argument("--extend", action="store_true",
                       help="add this grid's trials to a sweep folder holding another grid")
    where.add_argument("--no-progress", action="store_true", help="no progress bar or per-trial lines")
    parser.set_defaults(field_options=field_options)


def grid_options(args: argparse.Namespace) -> dict[str, list]:
    """The option lists the user gave, converted and checked value by value."""
    from .grid import split_values

    converters = {name: _converter(keywords) for name, (_, keywords) in args.field_options.items()}
    converters.update({f"epochs_{phase}": int for phase in PHASES})
    options = {}
    for name, convert in converters.items():
        text = getattr(args, name, None)
        if text is not None:
            options[name] = split_values("--" + name.replace("_", "-"), text, convert)
    return options


def run_command(args: argparse.Namespace) -> int:
    """0 when every trial finished ok, 1 when some failed, 2 on bad input."""
    from .engine import Resources, run_sweep
    from .grid import expand

    try:
        out = Path(args.out).resolve()
        trials = expand(grid_options(args), out)
        resources = Resources(args.address, args.cpus_per_trial, args.gpus_per_trial,
                              args.max_concurrent)
        failed = run_sweep(trials, out, resources, extend=args.extend, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"attenuation sweep: error: {error}", file=sys.stderr)
        return 2
    if failed:
        print(f"attenuation sweep: {failed} trial(s) failed; see {out / 'results.jsonl'}", file=sys.stderr)
        return 1
    print(f"attenuation sweep: every trial finished; tables in {out / 'table.md'}")
    return 0

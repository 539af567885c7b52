"""The contract of a measured section of the suite: ``python -m bench.<section> --device D --out
FILE.json [--quick]`` measures in a process of its own (so that the suite can hold it to a deadline
and a crash costs only that section) and writes one JSON object: the section's figures, the sizes
it used, the ops backends that ran on the device in that process, and every warning raised."""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from attenuation import ops

from .workload import Settings, backends_for, settings_for

Measure = Callable[[torch.device, Settings], dict]


def main(name: str, measure: Measure, argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=measure.__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite, not a figure")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as `attenuation run` does: denormals slow a CPU 2x
    settings = settings_for(device, args.quick)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends = {"registered": ops.available_backends(), "on_device": backends_for(device)}
        result = measure(device, settings)
    record = {"section": name, "device": str(device), "quick": args.quick,
              "settings": settings.as_dict(), "backends": backends, "result": result,
              "warnings": sorted({f"{w.category.__name__}: {w.message}" for w in caught}),
              "seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

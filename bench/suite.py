"""One command for every check and benchmark of a machine, GPU or CPU, in one call:

    python -m bench.suite --out DIR [--quick] [--budget 540] [--commit SHA]

On a CUDA machine (nothing installed but PyTorch, Triton, pytest-benchmark and a compiler): build
the extension, run the test suite, measure the device's peaks, run every kernel benchmark, the
training-step overhead, the peer tools, the removed network's latency, and end-to-end runs of
``attenuation run`` (smoke, one epoch of the paper preset, the full quick preset). On a CPU the
same command runs the CPU half: the build only if the extension is not importable, the tests and
the longer runs only when asked (``--tests``, ``--paper-epoch``, ``--quick-preset``).

Every step runs in a process of its own with a deadline inside the overall budget; a step that
fails or runs out of time is recorded and the next one runs; DIR/report.json and DIR/summary.md are
written at the end whatever happened. ``python -m bench.results_table --add DIR/report.json``
publishes a report into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import end_to_end, kernels, report, steps
from .environment import REPO, collect
from .steps import Budget, Outcome, Step

FORMAT = "attenuation.bench-suite/1"
SECTIONS = ("peak", "overhead", "peers", "removed_latency")
# Steps that run by default on a GPU (without --quick) and on a CPU only when asked: step -> option.
OPTIONAL = {"tests": "--tests", "e2e_paper_epoch": "--paper-epoch", "e2e_quick": "--quick-preset"}
# Steps that need a GPU: step -> why.
GPU_ONLY = {"e2e_smoke_triton": "the triton backend runs on a GPU (on a CPU only under Triton's interpreter)"}
# Deadline of each step in seconds, on a CPU and on a GPU; the budget left may cut it shorter.
CAPS = {
    "build": (300, 240), "tests": (420, 150), "peak": (60, 30), "kernels": (360, 150),
    "overhead": (120, 60), "peers": (150, 90), "removed_latency": (90, 60),
    "e2e_smoke": (120, 60), "e2e_smoke_triton": (0, 120), "e2e_paper_epoch": (600, 120), "e2e_quick": (900, 180),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for report.json, summary.md, logs and runs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and rounds: checks the suite, figures not for publishing")
    parser.add_argument("--budget", type=float, default=540, help="overall time budget in seconds")
    parser.add_argument("--commit", help="commit measured, where the tree has no .git (default: git HEAD)")
    parser.add_argument("--data", help="CIFAR-10 for the end-to-end runs (default: where `attenuation "
                        "run` finds it, else a synthetic stand-in of the same shape)")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--build", action=flag,
                        help="pip install --no-build-isolation -e . (default: on a GPU; on a CPU "
                             "only when attenuation._C is not importable)")
    parser.add_argument("--tests", action=flag, help="run the test suite (default: on a GPU)")
    parser.add_argument("--paper-epoch", action=flag,
                        help="one epoch of the paper preset, end to end (default: on a GPU)")
    parser.add_argument("--quick-preset", action=flag,
                        help="the full quick preset, end to end (default: on a GPU; ~8 min on a "
                             "2-core CPU, so raise --budget there)")
    parser.add_argument("--skip", action="append", default=[], choices=list(CAPS), metavar="STEP",
                        help=f"leave a step out (repeatable): {', '.join(CAPS)}")
    return parser.parse_args(argv)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _native_status() -> dict:
    """Whether attenuation._C imports in a fresh process, and for which devices it has kernels."""
    probe = ("import json\ntry:\n    from attenuation.ops import native\n"
             "    print(json.dumps({'importable': True, 'cpu': native.has_kernel('cpu'), "
             "'cuda': native.has_kernel('cuda')}))\n"
             "except ImportError as e:\n    print(json.dumps({'importable': False, 'error': str(e)}))")
    done = subprocess.run(_python("-W", "ignore", "-c", probe), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"importable": False, "error": done.stderr[-500:]}


def _pytest_counts(text: str) -> dict:
    """The counts of pytest's closing line ("3 passed, 1 skipped in 2.0s"); {} without one."""
    closing = [line for line in text.splitlines() if re.search(r"\d+ \w+.* in [\d.]+s", line)]
    if not closing:
        return {}
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)",
                        closing[-1])
    plural = {"error": "errors", "warning": "warnings"}
    return {plural.get(word, word): int(n) for n, word in counts}


class Suite:
    """The plan of steps for one device, and the figures they produce."""

    def __init__(self, args: argparse.Namespace, device: torch.device, out: Path):
        self.args, self.device, self.out = args, device, out
        self.gpu = device.type == "cuda"
        self.results: dict[str, dict] = {}

    def plan(self) -> list:
        """Steps, and records of the steps left out with the reason, in the order they run."""
        candidates = [self._build(), self._tests(), self._section("peak"), self._kernels(),
                      *(self._section(name) for name in SECTIONS[1:]),
                      *(self._end_to_end(run) for run in end_to_end.RUNS)]
        plan = []
        for step in candidates:
            wanted, reason = self._wanted(step.name)
            plan.append(step if wanted else steps.skipped(step.name, reason))
        return plan

    def _cap(self, name: str) -> float:
        return CAPS[name][1 if self.gpu else 0]

    def _wanted(self, name: str) -> tuple[bool, str]:
        if name in self.args.skip:
            return False, "left out with --skip"
        if name == "build":
            return self._build_wanted()
        if name in GPU_ONLY and not self.gpu:
            return False, GPU_ONLY[name]
        if name in OPTIONAL:
            option = OPTIONAL[name]
            chosen = getattr(self.args, option[2:].replace("-", "_"))
            if chosen is not None:
                return chosen, f"left out with --no-{option[2:]}"
            return (self.gpu and not self.args.quick,
                    f"runs by default on a GPU without --quick; here only with {option}")
        return True, ""

    def _build_wanted(self) -> tuple[bool, str]:
        if self.args.build is not None:
            return self.args.build, "left out with --no-build"
        if self.gpu:
            return True, ""
        return (not _native_status()["importable"],
                "on a CPU only when attenuation._C is not importable, and it is")

    def _build(self) -> Step:
        env = {}
        if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda").is_dir():
            env["CUDA_HOME"] = "/usr/local/cuda"
        argv = _python("-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".")
        return Step("build", self._cap("build"), lambda: argv,
                    lambda outcome: {"native": _native_status()}, env)

    def _tests(self) -> Step:
        argv = _python("-m", "pytest", "-q", "tests", "-p", "no:cacheprovider")
        return Step("tests", self._cap("tests"), lambda: argv,
                    lambda outcome: _pytest_counts(outcome.log_tail()))

    def _section(self, name: str) -> Step:
        path = self.out / "sections" / f"{name}.json"
        argv = _python("-m", f"bench.{name}", "--device", self.device.type, "--out", str(path))
        argv += ["--quick"] if self.args.quick else []

        def parse(outcome: Outcome) -> Optional[dict]:
            return json.loads(path.read_text()) if path.exists() else None
        return Step(name, self._cap(name), lambda: argv, parse)

    def _kernels(self) -> Step:
        path = self.out / "sections" / "kernels-pytest-benchmark.json"

        def parse(outcome: Outcome) -> Optional[dict]:
            if not path.exists():
                return None
            folded = kernels.fold(json.loads(path.read_text()), self.results.get("peak"))
            return {**folded, "pytest": _pytest_counts(outcome.log_tail())}
        argv = kernels.command(path, self.device.type, self.args.quick)
        return Step("kernels", self._cap("kernels"), lambda: argv, parse)

    def _end_to_end(self, run: str) -> Step:
        run_dir = self.out / "runs" / run
        data = {}

        def argv() -> list[str]:
            path, synthetic = end_to_end.find_data(self.args.data, self.out / "data")
            data.update(data=str(path), synthetic_data=synthetic)
            return end_to_end.command(run, self.device.type, path, run_dir)

        def parse(outcome: Outcome) -> dict:
            return {**data, "command": " ".join(outcome.argv),
                    **end_to_end.figures(run_dir, outcome.seconds)}
        return Step(f"e2e_{run}", self._cap(f"e2e_{run}"), argv, parse)

    def run(self, budget: Budget, record: dict) -> None:
        """Run the plan, filling ``record``'s steps and results as each step ends."""
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for step in self.plan():
            if isinstance(step, dict):
                entry, result = step, None
            else:
                entry, result = steps.run(step, budget, logs)
            record["steps"].append(entry)
            if result is not None:
                self.results[entry["name"]] = result
            print(f"[suite] {entry['name']}: {entry['status']}"
                  + (f" in {entry['seconds']} s" if "seconds" in entry else "")
                  + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)


def _device_argument(name: str) -> torch.device:
    """attenuation's device resolution, its errors as the suite's exit message. The package is
    imported here with its warnings silenced: the suite may not have built the native extension
    yet (its first step does), and that warning would only mislead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from attenuation.devices import resolve_device
    try:
        return resolve_device(name)
    except ValueError as error:
        raise SystemExit(f"bench.suite: --device: {error}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget)
    device = _device_argument(args.device)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(args, device, out)
    command = " ".join(["python -m bench.suite", *(sys.argv[1:] if argv is None else argv)])
    record = {"format": FORMAT, "quick": args.quick, "command": command, "budget_s": args.budget,
              "environment": collect(device, args.commit), "steps": [], "results": suite.results}
    try:
        suite.run(budget, record)
    except BaseException as error:  # interrupted: the report of what ran is still written
        record["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        record["wall_s"] = round(budget.elapsed(), 1)
        record["environment"]["host"]["load_average_after"] = os.getloadavg()
        report.write(record, out)
        print("\n".join(["[suite] headline figures:", *report.headlines(suite.results),
                          f"[suite] report: {out / 'report.json'}, summary: {out / 'summary.md'}"]),
              flush=True)
    return 1 if any(s["status"] in ("failed", "timeout") for s in record["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())

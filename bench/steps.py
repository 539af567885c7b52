"""Running the suite's steps: each one a command in a process of its own, held to a deadline
within the suite's overall time budget, its output logged, its outcome recorded whatever happens."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .environment import REPO

REPORT_RESERVE_S = 10   # kept back from the budget to fold and write the report
MIN_STEP_S = 5          # a step is not started with less time than this left
LOG_TAIL_CHARS = 3000


class Budget:
    """The suite's overall time budget, counted from its creation."""

    def __init__(self, seconds: float):
        self.total = seconds
        self._start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def left(self) -> float:
        return self.total - self.elapsed()


@dataclass
class Outcome:
    """What a step's command did."""
    argv: list[str]
    returncode: Optional[int]
    timed_out: bool
    seconds: float
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self.log.exists() else ""


@dataclass
class Step:
    """One step: ``argv()`` builds the command when the step starts (after the steps before it
    ran), ``parse(outcome)`` reads its figures (None when it has none)."""
    name: str
    cap_s: float
    argv: Callable[[], list[str]]
    parse: Callable[[Outcome], Optional[dict]] = lambda outcome: None
    env: dict = field(default_factory=dict)


def _execute(argv: list[str], timeout: float, log: Path, env: dict) -> Outcome:
    """Run ``argv`` from the repository root with output to ``log``; on the deadline, end its
    whole process group (pytest and the compilers start children)."""
    started = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                   start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if process.poll() is None:  # its deadline passed, or the suite itself was interrupted
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return Outcome(argv, process.returncode, timed_out, time.monotonic() - started, log)


def skipped(name: str, reason: str) -> dict:
    return {"name": name, "status": "skipped", "reason": reason}


def run(step: Step, budget: Budget, logs: Path) -> tuple[dict, Optional[dict]]:
    """Run ``step`` within what is left of ``budget``; returns its record and its figures."""
    left = budget.left() - REPORT_RESERVE_S
    if left < MIN_STEP_S:
        return skipped(step.name, f"time budget spent ({budget.left():.0f} s of {budget.total:.0f} s "
                                  f"left)"), None
    timeout = min(step.cap_s, left)
    print(f"[suite] {step.name}: running, deadline {timeout:.0f} s", flush=True)
    record = {"name": step.name, "timeout_s": round(timeout, 1), "log": f"logs/{step.name}.log"}
    try:
        outcome = _execute(step.argv(), timeout, logs / f"{step.name}.log", step.env)
    except Exception as error:  # the command could not be built or started
        return {**record, "status": "failed", "error": f"{type(error).__name__}: {error}"}, None
    record.update(seconds=round(outcome.seconds, 1), returncode=outcome.returncode)
    if outcome.timed_out:
        record.update(status="timeout", reason=f"stopped at its deadline of {timeout:.0f} s")
    else:
        record["status"] = "ok" if outcome.returncode == 0 else "failed"
    if record["status"] != "ok":
        record["error"] = outcome.log_tail()
    try:
        result = step.parse(outcome)
    except Exception as error:
        record.update(status="failed" if record["status"] == "ok" else record["status"],
                      parse_error=f"{type(error).__name__}: {error}")
        result = None
    return record, result

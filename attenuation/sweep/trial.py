"""What a Ray Tune trial runs: one ``attenuation run`` (or the baseline phase of one), resumed from
its own checkpoint when it has one, its epochs reported to Ray, its outcome reported last.

The outcome is a result row with ``DONE_KEY`` set, ``status`` "ok" or "failed" and the error's
message: a trial never raises, so a failure is recorded and the other trials go on."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import RunConfig
from ..run import BASELINE_FILE, Run

DONE_KEY = "trial_done"


def spec(kind: str, name: str, config: RunConfig, baseline: Optional[Path], threads: int) -> dict:
    """A trial's whole description, plain values only (it travels to the Ray worker)."""
    if kind not in ("baseline", "trial"):
        raise ValueError(f"unknown trial kind {kind!r}")
    return {"kind": kind, "name": name, "config": config.to_dict(),
            "baseline": None if baseline is None else str(baseline), "threads": int(threads)}


def execute(spec: dict, report) -> dict:
    """Run ``spec`` and return its outcome row; ``report(row)`` receives every epoch's metrics."""
    torch.set_num_threads(spec["threads"])  # bitwise like `attenuation run` with as many threads
    try:
        config = RunConfig(**spec["config"])
        folder = Path(config.out)
        resume = (folder / "checkpoint.pt").exists()
        run = Run(config, resume=resume, progress=False, on_epoch=report,
                  baseline=None if resume else spec["baseline"])
        if spec["kind"] == "baseline":
            run.execute(until_phase="baseline")
            if not (folder / BASELINE_FILE).exists():
                raise RuntimeError(f"the baseline run in {folder} ended without writing {BASELINE_FILE}")
            summary = None
        else:
            summary = run.execute()
        return {DONE_KEY: True, "status": "ok", "error": None, "summary_json": json.dumps(summary)}
    except Exception as error:  # recorded as the trial's failure; the sweep goes on
        return {DONE_KEY: True, "status": "failed", "error": f"{type(error).__name__}: {error}",
                "summary_json": "null"}


def ray_trainable(config: dict) -> None:
    """The function Ray Tune runs: ``config`` is ``{"spec": spec(...)}``."""
    from ray import tune

    outcome = execute(config["spec"], lambda row: tune.report({**row, DONE_KEY: False}))
    tune.report(outcome)

"""Running a sweep on Ray Tune: the shared baselines first, then the trials, each a Tune trial with
its own resources; results.jsonl, progress lines and the tables written as trials finish.

Everything a rerun needs is on disk (sweep.json, results.jsonl, the run folders' checkpoints), so
running the same command again skips finished trials and resumes interrupted ones; Ray's own
experiment state is not used for that."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from ..config import RunConfig
from ..run import BASELINE_FILE
from . import grid
from .trial import DONE_KEY, ray_trainable, spec as make_spec
from .compare import compare
from .manifest import reconcile
from .results import RESULTS_FILE, TrialRecord, append_result, read_results

RAY_DIR = "ray"


@dataclass(frozen=True)
class Resources:
    """Where and how wide the trials run."""
    address: Optional[str] = None       # None: a local Ray instance; "auto" or HOST:PORT: a cluster
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0         # fractions let several small trials share one GPU
    max_concurrent: Optional[int] = None

    def validate(self) -> "Resources":
        if not self.cpus_per_trial >= 1:
            raise ValueError(f"--cpus-per-trial must be >= 1, got {self.cpus_per_trial}")
        if not 0 <= self.gpus_per_trial:
            raise ValueError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        return self


def _finished(out: Path) -> dict[str, TrialRecord]:
    """The last record of every trial in results.jsonl."""
    path = out / RESULTS_FILE
    return {r.trial: r for r in read_results(path)} if path.exists() else {}


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the address, when no Ray cluster answers there."""
    if address == "auto":
        return  # Ray finds a running local cluster or says at once that there is none
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address must be HOST:PORT or auto, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(f"no Ray cluster answers at {address}: {error}") from None


def _start_ray(resources: Resources) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("attenuation sweep runs its trials on Ray Tune, which is not installed: "
                         "pip install 'attenuation[sweep]'") from None

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # Tune's tables stay quiet at verbose=0
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"          # relative data paths mean what they mean here
    runtime_env = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    if resources.address is None:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env=runtime_env)
    else:
        try:
            ray.init(address=resources.address, log_to_driver=False, configure_logging=False,
                     runtime_env=runtime_env)
        except (ConnectionError, RuntimeError) as error:
            hint = ("" if os.environ.get("RAY_AUTH_MODE") else
                    " (a cluster started by `ray start` authenticates with a token by default: set "
                    "RAY_AUTH_MODE=token, and RAY_AUTH_TOKEN to its `ray get-auth-token` on another machine)")
            raise ValueError(f"cannot join the Ray cluster at {resources.address}: {error}{hint}") from None


class _Progress:
    """The overall bar and one line per finished trial."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = tqdm(total=total, initial=done, desc="sweep", unit="trial", disable=not enabled,
                        dynamic_ncols=True)
        self.enabled = enabled

    def trial_done(self, record: TrialRecord, seconds: float) -> None:
        self.bar.update(1)
        if not self.enabled:
            return
        if record.status == "ok":
            s = record.summary
            kept = 100.0 * s["pruned"]["macs"] / s["baseline"]["macs"]
            text = (f"{record.trial}: {s['pruned']['accuracy']:.2f}% "
                    f"({s['pruned']['accuracy'] - s['baseline']['accuracy']:+.2f}), "
                    f"MACs kept {kept:.1f}%, {seconds:.0f} s")
        else:
            text = f"{record.trial}: FAILED ({record.error})"
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def _tune(specs: Sequence[dict], stage: str, out: Path, resources: Resources,
          on_done: Callable[[dict, dict], None]) -> None:
    """Run ``specs`` as Tune trials; ``on_done(spec, outcome)`` in this process as each ends."""
    from ray import tune

    by_name = {s["name"]: s for s in specs}
    started: dict[str, float] = {}

    class Outcomes(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            started[trial.config["spec"]["name"]] = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get(DONE_KEY):
                name = trial.config["spec"]["name"]
                outcome = {k: result[k] for k in ("status", "error", "summary_json")}
                outcome["seconds"] = time.perf_counter() - started.get(name, time.perf_counter())
                on_done(by_name[name], outcome)

        def on_trial_error(self, iteration, trials, trial, **info):  # the worker itself died
            name = trial.config["spec"]["name"]
            on_done(by_name[name], {"status": "failed", "summary_json": "null", "seconds": 0.0,
                                    "error": f"the Ray trial failed: {trial.error_file or 'no error file'}"})

    trainable = tune.with_resources(ray_trainable, {"cpu": resources.cpus_per_trial,
                                                          "gpu": resources.gpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space={"spec": tune.grid_search(list(specs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent,
                                    trial_dirname_creator=lambda t: t.config["spec"]["name"]),
        run_config=tune.RunConfig(name=f"{stage}-{time.strftime('%Y%m%dT%H%M%S')}",
                                  storage_path=str((out / RAY_DIR).resolve()), verbose=0,
                                  callbacks=[Outcomes()]))
    tuner.fit()


def run_sweep(trials: Sequence[grid.Trial], out: Path, resources: Resources, *, extend: bool = False,
              progress: bool = True) -> int:
    """Run every unfinished trial of ``out`` (``trials`` recorded into it first); returns the number
    of failed trials. The tables and the plot are rebuilt at the end."""
    out = out.resolve()
    resources = resources.validate()
    if resources.address is not None:
        check_address(resources.address)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    trials = reconcile(out, trials, extend)
    finished = _finished(out)
    pending = [t for t in trials if t.name not in finished or finished[t.name].status != "ok"]
    if pending:
        _run_pending(pending, out, resources, len(trials), len(trials) - len(pending), progress)
    finished = _finished(out)
    if finished:
        compare([out], out)
    return sum(1 for t in trials if finished.get(t.name) is None or finished[t.name].status != "ok")


def _run_pending(pending: Sequence[grid.Trial], out: Path, resources: Resources, total: int, done: int,
                 progress: bool) -> None:
    threads = int(resources.cpus_per_trial)
    baselines = grid.baselines(pending, out)
    baseline_specs = [make_spec("baseline", identifier, _baseline_run(out, identifier, config), None, threads)
                      for identifier, config in baselines.items()
                      if not (grid.baseline_folder(out, identifier) / BASELINE_FILE).exists()]
    bar = _Progress(total, done, progress)
    failed_baselines: dict[str, str] = {}
    _start_ray(resources)
    try:
        if baseline_specs:
            def baseline_done(spec: dict, outcome: dict) -> None:
                if outcome["status"] != "ok":
                    failed_baselines[spec["name"]] = outcome["error"]
            _tune(baseline_specs, "baselines", out, resources, baseline_done)

        def trial_done(spec: dict, outcome: dict) -> None:
            record = _record(spec, outcome)
            append_result(out / RESULTS_FILE, record)
            bar.trial_done(record, outcome["seconds"])

        runnable = []
        for t in pending:
            if t.baseline_id in failed_baselines:
                trial_done(_trial_spec(t, out, threads), {
                    "status": "failed", "summary_json": "null", "seconds": 0.0,
                    "error": f"its baseline {t.baseline_id} failed: {failed_baselines[t.baseline_id]}"})
            else:
                runnable.append(_trial_spec(t, out, threads))
        if runnable:
            _tune(runnable, "trials", out, resources, trial_done)
    finally:
        bar.close()
        import ray
        ray.shutdown()


def _baseline_run(out: Path, identifier: str, config: RunConfig) -> RunConfig:
    """The baseline's run configuration: the one its folder started with, when it did (a resumed
    run must keep it), else ``config``."""
    saved = grid.baseline_folder(out, identifier) / "config.json"
    if (saved.parent / "checkpoint.pt").exists() and saved.exists():
        return RunConfig(**json.loads(saved.read_text()))
    return config


def _trial_spec(t: grid.Trial, out: Path, threads: int) -> dict:
    return make_spec("trial", t.name, t.config, grid.baseline_folder(out, t.baseline_id), threads)


def _record(spec: dict, outcome: dict) -> TrialRecord:
    return TrialRecord(trial=spec["name"], config=spec["config"],
                       baseline_id=Path(spec["baseline"]).name if spec["baseline"] else None,
                       status=outcome["status"], error=outcome["error"],
                       summary=json.loads(outcome["summary_json"]))

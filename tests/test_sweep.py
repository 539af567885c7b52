"""``attenuation sweep``: grids of runs as Ray Tune trials with shared baselines, resumable, with
failures isolated; the grid parsing and its bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attenuation.cli import main
from attenuation.config import preset_config
from attenuation.run import run
from attenuation.sweep.engine import check_address
from attenuation.sweep.grid import expand, split_values, trial_name

REPO = Path(__file__).resolve().parents[1]


def _argv(tiny_npz, out, *grid):
    return ["sweep", "--preset", "smoke", "--data", str(tiny_npz), "--batch-size", "32", "--criterion", "random",
            "--out", str(out), "--no-progress", *grid]


def _results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def one_thread():
    """A sweep trial runs with --cpus-per-trial threads (1 here): compare it with a run on as many."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.slow
def test_a_sweep_shares_baselines_and_a_rerun_trains_nothing(tiny_npz, tmp_path, one_thread, capsys):
    out = tmp_path / "sweep"
    argv = _argv(tiny_npz, out, "--method", "attenuation,hard", "--seed", "0,1")
    assert main(argv) == 0
    results = _results(out)
    assert len(results) == 4 and all(r["status"] == "ok" and r["error"] is None for r in results)
    assert len({r["baseline_id"] for r in results}) == 2  # one baseline per seed, shared by its trials
    assert len({(r["baseline_id"], r["config"]["seed"]) for r in results}) == 2
    for r in results:
        assert json.loads((out / "trials" / r["trial"] / "summary.json").read_text()) == r["summary"]
    assert sorted(p.name for p in (out / "baselines").iterdir()) == sorted({r["baseline_id"] for r in results})
    for name in ("table.md", "table.csv", "pareto.png"):
        assert (out / name).stat().st_size > 0
    assert "| attenuation |" in (out / "table.md").read_text() and "| hard |" in (out / "table.md").read_text()

    # a trial equals, bit for bit, `attenuation run --baseline` of its configuration
    trial = next(r for r in results if r["config"]["method"] == "hard" and r["config"]["seed"] == 1)
    config = preset_config(**{**trial["config"], "out": str(tmp_path / "alone")})
    alone = run(config, progress=False, baseline=out / "baselines" / trial["baseline_id"])
    assert alone["pruned"]["accuracy"] == trial["summary"]["pruned"]["accuracy"]
    assert _equal(_weights(tmp_path / "alone" / "model.pt"), _weights(out / "trials" / trial["trial"] / "model.pt"))
    # the two trials of a seed started their attenuation phase from the same weights
    first = [json.loads(line) for line in (out / "trials" / trial["trial"] / "metrics.jsonl").read_text().splitlines()]
    other = next(r for r in results if r["config"]["method"] == "attenuation" and r["config"]["seed"] == 1)
    second = [json.loads(line) for line in (out / "trials" / other["trial"] / "metrics.jsonl").read_text().splitlines()]
    assert first[0] == second[0] and first[0]["phase"] == "baseline"

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/*.pt")}
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing runs, no Ray is started
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/*.pt")} == stamps
    assert len(_results(out)) == 4


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_others_finish_then_extend(tiny_npz, tmp_path, capsys):
    out = tmp_path / "sweep"
    # an absurd attenuation-phase rate diverges after the (shared, sound) baseline
    assert main(_argv(tiny_npz, out, "--method", "hard", "--lr-pruning-fraction", "0.4,1e7")) == 1
    assert "1 trial(s) failed" in capsys.readouterr().err
    results = {r["config"]["lr_pruning_fraction"]: r for r in _results(out)}
    assert results[0.4]["status"] == "ok"
    failed = results[1e7]
    assert failed["status"] == "failed" and failed["summary"] is None
    assert "TrainingDiverged" in failed["error"] and "the attenuation phase, epoch 1/1" in failed["error"]
    assert "failed" in (out / "table.md").read_text()

    more_seeds = _argv(tiny_npz, out, "--method", "hard", "--lr-pruning-fraction", "0.4", "--seed", "0,1")
    assert main(more_seeds) == 2
    error = capsys.readouterr().err
    assert "holds another grid (2 trials; this command adds 1 and leaves out 1)" in error and "--extend" in error
    assert main([*more_seeds, "--extend"]) == 1  # the diverging trial of the first grid fails again
    results = _results(out)
    assert sorted((r["config"]["seed"], r["config"]["lr_pruning_fraction"], r["status"]) for r in results) == [
        (0, 0.4, "ok"), (0, 1e7, "failed"), (0, 1e7, "failed"), (1, 0.4, "ok")]


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_interrupted_trial(tiny_npz, tmp_path, one_thread):
    out = tmp_path / "sweep"
    argv = _argv(tiny_npz, out, "--method", "attenuation", "--epochs-attenuation", "6")
    command = [sys.executable, "-c", f"import sys; from attenuation.cli import main; sys.exit(main({argv!r}))"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    trial_folder = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list((out / "trials").glob("*/checkpoint.pt")) if (out / "trials").exists() else []
        if found:
            trial_folder = found[0].parent
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver, the local Ray and its workers
    process.wait()
    assert trial_folder is not None, "the trial never wrote a checkpoint"
    assert not (trial_folder / "summary.json").exists(), "the trial finished before it could be killed"
    assert not (out / "results.jsonl").exists()

    assert main(argv) == 0
    (record,) = _results(out)
    rows = [json.loads(line) for line in (trial_folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 10))  # each epoch once: resumed, not restarted
    config = preset_config(**{**record["config"], "out": str(tmp_path / "alone")})
    run(config, progress=False, baseline=out / "baselines" / record["baseline_id"])
    assert _equal(_weights(tmp_path / "alone" / "model.pt"), _weights(trial_folder / "model.pt"))


def test_the_grid_is_the_cross_product_of_validated_runs(tmp_path):
    trials = expand({"method": ["attenuation", "hard"], "ratio": [0.5, 0.7], "seed": [0, 1, 2],
                     "preset": ["smoke"]}, tmp_path)
    assert len(trials) == 12 and len({t.name for t in trials}) == 12
    assert len({t.baseline_id for t in trials}) == 3
    assert all(Path(t.config.out) == tmp_path / "trials" / t.name for t in trials)
    assert trial_name(trials[0].config) == trials[0].name  # stable: a function of the configuration
    epochs = expand({"preset": ["smoke"], "epochs_baseline": [1, 2]}, tmp_path)
    assert [t.config.epochs["baseline"] for t in epochs] == [1, 2]
    assert epochs[0].baseline_id != epochs[1].baseline_id
    split = expand({"preset": ["smoke"], "val_split": [0, 40]}, tmp_path)  # the split changes the baseline
    assert [t.config.val_split for t in split] == [0, 40] and split[0].baseline_id != split[1].baseline_id


def test_a_grid_over_models():
    """--model takes a list like any option; each model has its own baseline and its name leads
    the trial's; a VGG name is the same trial as its depth."""
    trials = expand({"preset": ["smoke"], "model": ["resnet20", "resnet56b", "vgg11"]}, Path("sweep"))
    assert [t.config.model_name for t in trials] == ["resnet20", "resnet56b", "vgg11"]
    assert [t.name.split("-")[0] for t in trials] == ["resnet20", "resnet56b", "vgg11"]
    assert len({t.baseline_id for t in trials}) == 3
    assert trials[2] == expand({"preset": ["smoke"]}, Path("sweep"))[0]


@pytest.mark.parametrize("grid,message", [
    (["--method", "attenuation,magic"], "--method: invalid value 'magic'"),
    (["--ratio", "0.5,,0.7"], "--ratio: empty value"),
    (["--seed", ""], "--seed: empty value"),
    (["--ratio", "0.5,1.5"], "ratio=1.5"),
    (["--lr", "0.1,nan"], "lr must be a finite number"),
    (["--reversible", "true,maybe"], "--reversible: invalid value 'maybe'"),
    (["--val-split", "0,-5"], "val_split must be >= 0"),
    (["--model", "resnet20,resnet18"], "--model: invalid value 'resnet18'"),
    (["--model", "resnet20", "--depth", "11,16"], "depth 11 applies to VGGs only"),
])
def test_bad_lists_fail_before_anything_runs(tmp_path, capsys, grid, message):
    out = tmp_path / "sweep"
    assert main(["sweep", "--preset", "smoke", "--out", str(out), *grid]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unreachable_cluster_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="no Ray cluster answers at 127.0.0.1:9"):
        check_address("127.0.0.1:9", timeout=2)
    with pytest.raises(ValueError, match="HOST:PORT or auto"):
        check_address("nowhere")
    out = tmp_path / "sweep"
    started = time.monotonic()
    assert main(["sweep", "--preset", "smoke", "--out", str(out), "--address", "127.0.0.1:9"]) == 2
    assert "no Ray cluster answers at 127.0.0.1:9" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists() and time.monotonic() - started < 60


def test_split_values_converts_and_deduplicates():
    assert split_values("--seed", "0, 1,1,2", int) == [0, 1, 2]
    with pytest.raises(ValueError, match="--seed: invalid value 'x'"):
        split_values("--seed", "0,x", int)


def test_a_folder_written_before_a_new_field_keeps_its_trials(tmp_path):
    """A configuration field added by a later version (here: the recorded configurations lack
    `val_split`, `model` and `compact`) must not rename a folder's trials, or its sweep could not be
    resumed."""
    from attenuation.sweep.manifest import MANIFEST_FILE, reconcile

    trials = expand({"preset": ["smoke"], "seed": [0, 1]}, tmp_path)
    reconcile(tmp_path, trials, extend=False)
    saved = json.loads((tmp_path / MANIFEST_FILE).read_text())
    old = {f"old-name-{i}": {k: v for k, v in config.items() if k not in ("val_split", "model", "compact")}
           for i, config in enumerate(saved["trials"].values())}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**saved, "trials": old}))
    again = reconcile(tmp_path, trials, extend=False)  # the same grid: resumed, not refused
    assert sorted(t.name for t in again) == sorted(old)


def test_a_folder_written_before_precision_resumes_in_float32_and_says_so(tmp_path):
    """Trials recorded before `precision` existed computed in float32: the same grid at float32
    resumes them; at the default (auto) it is another grid, and the refusal says why."""
    from attenuation.sweep.manifest import MANIFEST_FILE, reconcile

    float32 = expand({"preset": ["smoke"], "seed": [0, 1], "precision": ["float32"]}, tmp_path)
    reconcile(tmp_path, float32, extend=False)
    saved = json.loads((tmp_path / MANIFEST_FILE).read_text())
    old = {name: {k: v for k, v in config.items() if k != "precision"} for name, config in saved["trials"].items()}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**saved, "trials": old}))
    with pytest.raises(ValueError, match="2 recorded trials predate --precision and ran with float32 "
                                         r"\(pass --precision float32 to resume them\)"):
        reconcile(tmp_path, expand({"preset": ["smoke"], "seed": [0, 1]}, tmp_path), extend=False)
    resumed = reconcile(tmp_path, float32, extend=False)
    assert sorted(t.name for t in resumed) == sorted(old) and {t.config.precision for t in resumed} == {"float32"}

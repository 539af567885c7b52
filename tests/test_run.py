"""The CIFAR-10 loop end to end on a tiny synthetic data set: outputs, exact resume, CLI errors."""
import json
import os
import stat

import pytest
import torch

from attenuation import run as run_module
from attenuation.checkpoint import CHECKPOINT_FORMAT
from attenuation.cli import main
from attenuation.config import RunConfig, preset_config
from attenuation.models import ResNet, model_spec
from attenuation.profiling import count_macs
from attenuation.report import SUMMARY_KEYS
from attenuation.run import OUTPUTS, Run, TrainingDiverged, run
from attenuation.surgery import load_pruned, pruned_architecture
from attenuation.train import evaluate


def _config(tiny_npz, out, **overrides):
    return preset_config("smoke", **{"data": str(tiny_npz), "out": str(out), "train_subset": None,
                                     "test_subset": None, "batch_size": 32, **overrides})


@pytest.fixture
def umask_022():
    saved = os.umask(0o022)
    yield
    os.umask(saved)


@pytest.mark.slow
def test_smoke_run_writes_every_output(tiny_npz, tmp_path, umask_022):
    summary = run(_config(tiny_npz, tmp_path / "run", latency_batch=8), progress=False)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary left either
    for name in OUTPUTS:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name  # as open() would make it
    assert json.loads((out / "summary.json").read_text()) == summary
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary["data_source"].startswith("npz file") and str(tiny_npz) in summary["data_source"]
    assert summary["removed_filters"] > 0
    assert summary["pruned"]["macs"] < summary["baseline"]["macs"]
    assert summary["pruned"]["params"] < summary["baseline"]["params"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["baseline", "attenuation", "recovery", "finetune"]
    assert all("test_acc" in r and "val_acc" not in r for r in rows)  # no validation split
    assert summary["baseline"]["val_accuracy"] is None and summary["pruned"]["val_accuracy"] is None
    assert rows[1]["pruning_seconds"] > rows[0]["pruning_seconds"] >= 0  # the baseline only calls a no-op
    assert rows[0]["macs"] == summary["baseline"]["macs"] and rows[-1]["macs"] == summary["pruned"]["macs"]
    report = (out / "report.md").read_text()
    assert "| removal |" in report and "npz file" in report
    assert report.startswith(f"# attenuation run: attenuation / {RunConfig.criterion}, ratio 0.35, VGG-11 x0.0625 (smoke preset)")
    assert "latency (ms, batch 8)" in report and "batch 256" not in report
    # the unpruned and the pruned network timed in turns at the end, at the latencies' batch
    assert summary["speed"]["batch_size"] == 8 and all(v > 0 for v in summary["speed"].values())
    assert "Timed in turns at the end of the run (batch 8;" in report
    model = load_pruned(out / "model.pt")
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_summary_carries_the_fate_statistics_of_fates_json(tiny_npz, tmp_path):
    """A phase with returns and removals both during the phase and at its end (random scores, a
    filter removed after 4 consecutive weak steps): summary.json's fate statistics agree with the
    pruner's per-filter counters in fates.json. 20 steps, an attenuation step every 3: the end of
    the phase (step 20) is no attenuation step, so removed_at tells the two kinds of removal apart."""
    config = _config(tiny_npz, tmp_path / "run", criterion="random", reversible=True, factor=0.5,
                     eps=0.1, interval=3, ramp="linear", ratio=0.5,
                     epochs={"baseline": 1, "attenuation": 2, "recovery": 1, "finetune": 1})
    summary = run(config, progress=False)
    keys = ("steps_weak", "returns", "removed_at")
    filters = [dict(zip(keys, values)) for layer in json.loads((tmp_path / "run" / "fates.json").read_text())
               for values in zip(*(layer[k] for k in keys))]
    removed = [f for f in filters if f["removed_at"] >= 0]
    assert summary["returns"] == sum(f["returns"] for f in filters) > 0
    assert summary["kept_returns"] == sum(f["returns"] > 0 and f["removed_at"] < 0 for f in filters) > 0
    assert summary["removed_filters"] == len(removed)
    assert summary["removed_during_phase"] == sum(f["removed_at"] < 20 for f in removed) > 0
    assert summary["removed_filters"] - summary["removed_during_phase"] > 0
    assert summary["mean_steps_weak_before_removal"] == pytest.approx(
        sum(f["steps_weak"] for f in removed) / len(removed))
    assert summary["churn"] > 0
    assert "Filter fates: " in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 2, 3, 4])
def test_resume_is_bitwise_exact(tiny_npz, tmp_path, stop_after):
    """Interrupted after the baseline, inside/after attenuation, and after recovery and physical
    removal (the checkpoint then holds the removed network's architecture)."""
    config = dict(epochs={"baseline": 1, "attenuation": 2, "recovery": 1, "finetune": 1}, criterion="random")
    full = run(_config(tiny_npz, tmp_path / "full", **config), progress=False)
    assert run(_config(tiny_npz, tmp_path / "cut", **config), progress=False, stop_after_epochs=stop_after) is None
    resumed = run(_config(tiny_npz, tmp_path / "cut", **config), progress=False, resume=True)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("returns", "removed_filters"):
        assert full[key] == resumed[key]
    for key in ("accuracy", "params", "macs"):  # latency_ms is a measurement
        assert full["baseline"][key] == resumed["baseline"][key]
    assert full["pruned"]["accuracy"] == resumed["pruned"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]


def _models_equal(a, b):
    a = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_val_split_zero_is_the_run_without_the_field(tiny_npz, tmp_path):
    """val_split 0 takes nothing from the global RNG or the loader's generator: the run, from a
    config without the field (as an older config.json), is bitwise the same."""
    without = {k: v for k, v in _config(tiny_npz, tmp_path / "absent").to_dict().items() if k != "val_split"}
    absent = run(RunConfig(**without), progress=False)
    zero = run(_config(tiny_npz, tmp_path / "zero", val_split=0), progress=False)
    assert _models_equal(tmp_path / "absent", tmp_path / "zero")
    assert absent["baseline"]["accuracy"] == zero["baseline"]["accuracy"]
    assert absent["pruned"]["accuracy"] == zero["pruned"]["accuracy"]
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
              for name in ("absent", "zero")]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_a_validation_split_measures_the_epochs_and_the_test_set_once_per_phase(tiny_npz, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "run"
    the_run = Run(_config(tiny_npz, out, val_split=40), progress=False)
    assert (len(the_run.train_loader.labels), len(the_run.val_loader.labels)) == (280, 40)
    evaluated = []
    original = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda model, loader, autocast_dtype: (evaluated.append(
        "test" if loader is the_run.test_loader else "val" if loader is the_run.val_loader else "?"),
        original(model, loader, autocast_dtype))[1])
    summary = the_run.execute()
    assert evaluated.count("test") == 5  # baseline, attenuation, recovery, removal, finetune
    assert evaluated.count("val") == 4 + 5 and "?" not in evaluated  # every epoch, every phase end
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_loss" in r and "val_acc" in r and not any(k.startswith("test") for k in r) for r in rows)
    phases = {row["phase"]: row for row in the_run.state["phases"]}
    assert phases["baseline"]["val_accuracy"] == rows[0]["val_acc"] == summary["baseline"]["val_accuracy"]
    assert phases["finetune"]["val_accuracy"] == rows[-1]["val_acc"] == summary["pruned"]["val_accuracy"]
    assert summary["pruned"]["accuracy"] == phases["finetune"]["accuracy"]  # the test set's
    assert "40 training images held out for validation (seed 0)" in summary["data_source"]
    assert "| validation accuracy (%) |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_resume_with_a_validation_split_is_bitwise_exact(tiny_npz, tmp_path):
    config = dict(val_split=30, criterion="random")
    full = run(_config(tiny_npz, tmp_path / "full", **config), progress=False)
    assert run(_config(tiny_npz, tmp_path / "cut", **config), progress=False, stop_after_epochs=2) is None
    resumed = run(_config(tiny_npz, tmp_path / "cut", **config), progress=False, resume=True)
    assert _models_equal(tmp_path / "full", tmp_path / "cut")
    assert full["pruned"]["val_accuracy"] == resumed["pruned"]["val_accuracy"]
    assert full["baseline"]["val_accuracy"] == resumed["baseline"]["val_accuracy"]


def test_bad_validation_splits_are_refused_before_training(tiny_npz, tmp_path):
    with pytest.raises(ValueError, match="val_split 320 must be smaller than the 320 training images"):
        Run(_config(tiny_npz, tmp_path / "run", val_split=320), progress=False)
    with pytest.raises(ValueError, match="batch_size 32 is larger than the 20 training images left after "
                                         "holding 300 out for validation"):
        Run(_config(tiny_npz, tmp_path / "run", val_split=300), progress=False)
    with pytest.raises(ValueError, match="val_split must be smaller than train_subset \\(50\\)"):
        Run(_config(tiny_npz, tmp_path / "run", val_split=50, train_subset=50), progress=False)
    with pytest.raises(TypeError, match="val_split must be int, got 0.5"):
        Run(_config(tiny_npz, tmp_path / "run", val_split=0.5), progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_configuration(tiny_npz, tmp_path):
    run(_config(tiny_npz, tmp_path / "run"), progress=False, stop_after_epochs=1)
    with pytest.raises(ValueError, match="another configuration: ratio"):
        Run(_config(tiny_npz, tmp_path / "run", ratio=0.2), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        Run(_config(tiny_npz, tmp_path / "run"), progress=False)


def test_resume_of_a_checkpoint_older_than_the_schedule_fields(tiny_npz, tmp_path):
    """Written before the schedule's constants became fields: read as their (unchanged) defaults."""
    out = tmp_path / "run"
    run(_config(tiny_npz, out), progress=False, stop_after_epochs=1)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    for name in ("lr_warmup_fraction", "lr_warmup_start", "lr_pruning_fraction", "lr_finetune_fraction"):
        del saved["config"][name]
    torch.save(saved, out / "checkpoint.pt")
    Run(_config(tiny_npz, out), resume=True, progress=False)
    with pytest.raises(ValueError, match="another configuration: lr_warmup_start=0.1 \\(now 0.2\\)"):
        Run(_config(tiny_npz, out, lr_warmup_start=0.2), resume=True, progress=False)


def test_resume_of_a_checkpoint_older_than_the_model_field(tiny_npz, tmp_path):
    """Written before `model` existed: a VGG of its depth, which is what the field's None means."""
    out = tmp_path / "run"
    run(_config(tiny_npz, out), progress=False, stop_after_epochs=1)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    del saved["config"]["model"]
    torch.save(saved, out / "checkpoint.pt")
    Run(_config(tiny_npz, out), resume=True, progress=False)
    with pytest.raises(ValueError, match="another configuration: model=None \\(now 'resnet20'\\)"):
        Run(_config(tiny_npz, out, model="resnet20"), resume=True, progress=False)


def test_a_resnet_trains_and_attenuates(tiny_npz, tmp_path):
    """--model builds the registry's model: a CIFAR ResNet-20 through the baseline and the
    attenuation phase, with filters removed by the pruner (the whole loop: the test below)."""
    the_run = Run(_config(tiny_npz, tmp_path / "run", model="resnet20", width=0.25), progress=False)
    assert isinstance(the_run.model, ResNet)
    assert model_spec(the_run.model) == {"name": "resnet20", "width": 0.25, "num_classes": 10}
    assert the_run.execute(until_phase="attenuation") is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["baseline", "attenuation"]
    assert the_run.pruner.live_fraction() < 1.0  # the end of the phase removed the weak filters
    assert count_macs(the_run.model, live_only=True) < rows[0]["macs"]
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    # compacted: the checkpoint describes the smaller network it holds
    assert saved["config"]["model"] == "resnet20" and saved["model_spec"] == pruned_architecture(the_run.model)
    assert saved["model_spec"]["channels"]["layer1.0.conv1"] < 4


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet20", "resnet20b"])
def test_a_resnet_run_removes_filters_and_its_model_file_stands_alone(tiny_npz, tmp_path, model):
    """Issue 12: a CIFAR ResNet through the whole loop (channel groups, removal by group) ends
    with fewer MACs and parameters, and model.pt, rebuilt without the run's objects, gives the
    reported test accuracy."""
    the_run = Run(_config(tiny_npz, tmp_path / "run", model=model, width=0.25, ratio=0.5), progress=False)
    summary = the_run.execute()
    assert summary["pruned"]["macs"] < summary["baseline"]["macs"]
    assert summary["pruned"]["params"] < summary["baseline"]["params"]
    rebuilt = load_pruned(tmp_path / "run" / "model.pt")
    assert isinstance(rebuilt, ResNet) and model_spec(rebuilt)["name"] == model
    assert count_macs(rebuilt) == summary["pruned"]["macs"]
    assert evaluate(rebuilt, the_run.test_loader, the_run.autocast_dtype)[1] == summary["pruned"]["accuracy"]


def test_resume_removes_stale_temporaries(tiny_npz, tmp_path):
    out = tmp_path / "run"
    run(_config(tiny_npz, out), progress=False, stop_after_epochs=1)
    stale = [out / ".checkpoint.pt.999999.tmp", out / "checkpoint.pt3kq_x1z.tmp", out / ".report.md.12.tmp"]
    for path in stale:
        path.write_bytes(b"a killed writer's half")
    (out / "notes.tmp").write_text("not ours")
    Run(_config(tiny_npz, out), resume=True, progress=False)
    assert not any(path.exists() for path in stale) and (out / "notes.tmp").exists()


@pytest.mark.parametrize("drop", ["config", "state", "optimizer", "format"])
def test_resume_of_an_incomplete_checkpoint_names_what_is_missing(tiny_npz, tmp_path, drop):
    out = tmp_path / "run"
    run(_config(tiny_npz, out), progress=False, stop_after_epochs=1)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    del saved[drop]
    torch.save(saved, out / "checkpoint.pt")
    message = f"lacks the checkpoint entries {drop}" if drop != "format" else CHECKPOINT_FORMAT
    with pytest.raises(ValueError, match=message):
        Run(_config(tiny_npz, out), resume=True, progress=False)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_npz, tmp_path):
    """A finite but absurd rate in the attenuation phase: the baseline's checkpoint stays."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged in the attenuation phase, epoch 1/1") as info:
        run(_config(tiny_npz, out, lr_pruning_fraction=1e7), progress=False)
    assert f"{out / 'checkpoint.pt'} holds the last good state" in str(info.value)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["state"]["phase_index"] == 1 and saved["state"]["global_epoch"] == 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    assert [json.loads(line)["phase"] for line in (out / "metrics.jsonl").read_text().splitlines()] \
        == ["baseline"]


def test_batch_larger_than_the_training_set_is_refused_before_training(tiny_npz, tmp_path):
    with pytest.raises(ValueError, match="batch_size 321 is larger than the 320 training images"):
        Run(_config(tiny_npz, tmp_path / "run", batch_size=321), progress=False)
    with pytest.raises(ValueError, match="batch_size 64 is larger than the 50 training images"):
        Run(_config(tiny_npz, tmp_path / "run", batch_size=64, train_subset=50), progress=False)
    assert not (tmp_path / "run").exists()


def test_lr_schedule_defaults_are_the_former_constants_bitwise():
    """The constants moved from train.lr_at into RunConfig: a run with the defaults is unchanged."""
    def former(phase, step, total, peak):  # train.lr_at before the move, verbatim
        progress = step / max(total, 1)
        if phase == "baseline":
            warm = 0.15
            return peak * (0.1 + 0.9 * progress / warm) if progress < warm else peak * (1 - progress) / (1 - warm)
        if phase == "attenuation":
            return 0.4 * peak
        if phase == "recovery":
            return 0.4 * peak * (1 - progress)
        return 0.1 * peak * (1 - progress)

    for peak in (0.2, 0.1, 0.05 * (1 + torch.rand(()).item())):
        schedule = RunConfig(lr=peak).lr_schedule()
        for phase in ("baseline", "attenuation", "recovery", "finetune"):
            for total in (1, 7, 1564):
                for step in range(total):
                    assert schedule.at(phase, step, total) == former(phase, step, total, peak)
    changed = RunConfig(lr=1.0, lr_warmup_fraction=0.5, lr_warmup_start=0.0, lr_pruning_fraction=0.3,
                        lr_finetune_fraction=0.05).lr_schedule()
    assert changed.at("baseline", 0, 10) == 0.0 and changed.at("baseline", 5, 10) == 1.0
    assert changed.at("attenuation", 3, 10) == 0.3 and changed.at("recovery", 0, 10) == 0.3
    assert changed.at("finetune", 0, 10) == 0.05


@pytest.mark.slow
def test_cli_runs_and_reports_bad_input(tiny_npz, tmp_path, capsys):
    assert main(["run", "--preset", "smoke", "--data", str(tiny_npz), "--out", str(tmp_path / "cli"),
                 "--no-progress", "--method", "hard"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "hard"
    assert main(["run", "--preset", "smoke", "--data", str(tiny_npz), "--out", str(tmp_path / "none"),
                 "--no-progress", "--method", "none"]) == 0
    control = json.loads(capsys.readouterr().out)
    assert control["ratio"] == 0 and control["removed_filters"] == 0
    assert control["pruned"]["macs"] == control["baseline"]["macs"]
    assert main(["run", "--preset", "smoke", "--ratio", "1.5", "--data", str(tiny_npz)]) == 2
    assert "ratio must be in [0, 1)" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", "--factor", "2", "--data", str(tiny_npz)]) == 2
    assert "factor" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", "--data", str(tmp_path / "nowhere.npz")]) == 2
    assert "nowhere.npz" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", "--backend", "warp", "--data", str(tiny_npz)]) == 2
    assert "backend 'warp' is not available" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", "--preset", "smoke", "--device", "cuda", "--data", str(tiny_npz)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--criterion", "magic"])
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["run", "--preset", "smoke", "--data", str(corrupt)]) == 2
    assert "corrupt.npz" in capsys.readouterr().err

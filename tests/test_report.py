"""Tests for summary.json, report.md and the PNG plots."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from attenuation import plots
from attenuation.fates import fate_statistics
from attenuation.plots import plot_filter_fates, plot_training_curves
from attenuation.report import (
    SECTION_KEYS,
    SPEED_KEYS,
    SUMMARY_KEYS,
    format_count,
    make_summary,
    write_report,
    write_summary,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BASELINE = {"accuracy": 93.5, "params": 14_728_266, "macs": 313_207_808, "latency_ms": 9.8,
            "val_accuracy": None}
PRUNED = {"accuracy": np.float32(92.1), "params": np.int64(4_100_000), "macs": 87_100_000,
          "latency_ms": torch.tensor(3.1), "val_accuracy": None}
SPEED = {"batch_size": 64, "baseline_forward_ms": 20.0, "pruned_forward_ms": np.float64(16.0),
         "baseline_train_step_ms": 64.0, "pruned_train_step_ms": 46.4}


def _summary(**overrides):
    kwargs = dict(
        method="attenuation", criterion="l1", ratio=0.5,
        data_source="shared/data/cifar10.npz (JPEG copy)", device="cpu", wall_seconds=123.4,
        baseline=BASELINE, pruned=PRUNED, speed=SPEED, returns=np.int64(17), removed_filters=2112,
        kept_returns=5, churn=np.float64(3.25), removed_during_phase=2000,
        mean_steps_weak_before_removal=9.125,
    )
    kwargs.update(overrides)
    return make_summary(**kwargs)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 0
    assert data[:8] == PNG_SIGNATURE


def test_summary_has_exact_keys():
    summary = _summary()
    assert set(summary) == set(SUMMARY_KEYS)
    assert set(summary["baseline"]) == {"accuracy", "params", "macs", "latency_ms", "val_accuracy"}
    assert set(summary["pruned"]) == set(SECTION_KEYS) == set(summary["baseline"])
    assert set(summary) == {
        "method", "criterion", "ratio", "data_source", "device", "wall_seconds",
        "baseline", "pruned", "speed", "returns", "removed_filters", "kept_returns", "churn",
        "removed_during_phase", "mean_steps_weak_before_removal",
    }
    assert list(summary["speed"]) == list(SPEED_KEYS) == list(SPEED)


@pytest.mark.parametrize("key, value, match", [
    ("pruned_train_step_ms", 0.0, "speed.pruned_train_step_ms must be positive"),
    ("baseline_forward_ms", float("nan"), "speed.baseline_forward_ms must be finite"),
    ("batch_size", 2.5, "speed.batch_size must be a whole number"),
])
def test_speed_must_be_positive_finite_times(key, value, match):
    with pytest.raises(ValueError, match=match):
        _summary(speed={**SPEED, key: value})
    missing = dict(SPEED)
    del missing[key]
    with pytest.raises(ValueError, match=f"speed is missing the key '{key}'"):
        _summary(speed=missing)


def test_summary_casts_to_plain_python_numbers():
    summary = _summary()
    assert type(summary["pruned"]["accuracy"]) is float
    assert type(summary["pruned"]["params"]) is int
    assert type(summary["pruned"]["latency_ms"]) is float
    assert type(summary["returns"]) is int
    assert type(summary["churn"]) is float and type(summary["kept_returns"]) is int
    assert summary["pruned"]["latency_ms"] == pytest.approx(3.1)


@pytest.mark.parametrize("section,key", [("baseline", "macs"), ("pruned", "latency_ms"),
                                         ("pruned", "accuracy"), ("baseline", "val_accuracy")])
def test_missing_key_raises_naming_it(section, key):
    given = dict(BASELINE if section == "baseline" else PRUNED)
    del given[key]
    with pytest.raises(ValueError, match=key):
        _summary(**{section: given})


def test_val_accuracy_is_a_number_or_none():
    summary = _summary(baseline={**BASELINE, "val_accuracy": np.float64(88.25)},
                       pruned={**PRUNED, "val_accuracy": 87})
    assert summary["baseline"]["val_accuracy"] == 88.25 and type(summary["pruned"]["val_accuracy"]) is float
    assert summary["baseline"]["accuracy"] == 93.5  # the existing keys are untouched
    assert _summary()["pruned"]["val_accuracy"] is None
    with pytest.raises(ValueError, match="pruned.val_accuracy must be finite"):
        _summary(pruned={**PRUNED, "val_accuracy": float("inf")})


def test_non_numbers_are_rejected():
    with pytest.raises(ValueError, match="baseline.params"):
        _summary(baseline={**BASELINE, "params": 12.5})
    with pytest.raises(ValueError, match="wall_seconds"):
        _summary(wall_seconds=float("nan"))


def test_undefined_fate_statistics_are_null_and_counts_are_consistent(tmp_path):
    summary = _summary(churn=None, mean_steps_weak_before_removal=None)
    assert (summary["churn"], summary["mean_steps_weak_before_removal"]) == (None, None)
    assert json.loads(write_summary(summary, tmp_path / "s.json").read_text()) == summary
    with pytest.raises(ValueError, match=r"kept_returns must be in \[0, returns\]"):
        _summary(kept_returns=18)
    with pytest.raises(ValueError, match=r"removed_during_phase must be in \[0, removed_filters\]"):
        _summary(removed_during_phase=-1)
    with pytest.raises(ValueError, match="churn must be finite"):
        _summary(churn=float("inf"))


def test_write_summary_round_trip(tmp_path):
    summary = _summary(pruned={**PRUNED, "latency_ms": None})
    path = write_summary(summary, tmp_path / "run" / "summary.json")
    assert json.loads(path.read_text()) == summary
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temp file left


def test_write_summary_rejects_wrong_keys(tmp_path):
    with pytest.raises(ValueError, match="extra"):
        write_summary({**_summary(), "extra": 1}, tmp_path / "summary.json")
    bad = _summary()
    del bad["pruned"]["latency_ms"]
    with pytest.raises(ValueError, match="latency_ms"):
        write_summary(bad, tmp_path / "summary.json")
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("n,text", [(950_000, "950K"), (1_234_567, "1.23M"),
                                    (14_728_266, "14.7M"), (313_207_808, "313.2M"),
                                    (999_960, "1M"), (512, "512")])
def test_format_count(n, text):
    assert format_count(n) == text


def _phases():
    return [
        {"phase": "baseline", "accuracy": 93.5, "params": 14_728_266, "macs": 313_207_808,
         "latency_ms": 9.8, "seconds": 600.0},
        {"phase": "attenuation", "accuracy": 91.0, "params": 14_728_266, "macs": 313_207_808,
         "latency_ms": None, "seconds": 800.0},
        {"phase": "finetune", "accuracy": 92.1, "params": 4_100_000, "macs": 87_100_000,
         "latency_ms": 3.1, "seconds": 60.0},
    ]


def test_report_contents(tmp_path):
    path = write_report(
        tmp_path / "report.md", title="VGG-16 / CIFAR-10", config={"lr": 0.1, "epochs": 3},
        data_source="shared/data/cifar10.npz (JPEG copy)", device="cpu", phases=_phases(),
        latency_batch=64, summary=_summary(), plots=["curves.png", "filter_fates.png"],
        notes=["a note"],
    )
    text = path.read_text()
    assert text.startswith("# VGG-16 / CIFAR-10")
    assert "| latency (ms, batch 64) |" in text and "batch 256" not in text
    assert "| baseline | 93.50 | 14.7M | 313.2M | 9.80 | 600.0 |" in text
    assert "| attenuation | 91.00 | 14.7M | 313.2M | — | 800.0 |" in text
    assert "| finetune | 92.10 | 4.1M | 87.1M | 3.10 | 60.0 |" in text
    assert "not directly comparable" in text
    assert "speedup 3.16x" in text
    assert ("Timed in turns at the end of the run (batch 64; the latencies above were measured at "
            "each phase's end, minutes apart): forward pass 16.00 vs 20.00 ms (0.80x the time), "
            "training step 46.40 vs 64.00 ms (0.72x the time).") in text
    assert "(reduction 72.2%)" in text  # MACs
    assert "−1.40 points" in text
    assert ("Filter fates: 17 returns (5 kept to the end), weak-set churn 3.25 filters a step, "
            "2112 removed (2000 during the phase, 112 at its end), weak 9.1 steps on average "
            "before removal.") in text
    assert "![curves](curves.png)" in text and "(filter_fates.png)" in text
    assert "<details>" in text and '"lr": 0.1' in text
    assert "- a note" in text
    assert "validation" not in text  # no split: the report is as before it


def test_report_with_a_validation_split(tmp_path):
    phases = [{**row, "val_accuracy": 90.0 + i} for i, row in enumerate(_phases())]
    phases[1]["val_accuracy"] = None
    summary = _summary(baseline={**BASELINE, "val_accuracy": 90.0}, pruned={**PRUNED, "val_accuracy": 92.0})
    text = write_report(
        tmp_path / "report.md", title="t", config={}, data_source="x", device="cpu", phases=phases,
        latency_batch=64, summary=summary, plots=[],
    ).read_text()
    assert "| phase | test accuracy (%) | validation accuracy (%) | parameters |" in text
    assert "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" in text
    assert "| baseline | 93.50 | 90.00 | 14.7M | 313.2M | 9.80 | 600.0 |" in text
    assert "| attenuation | 91.00 | — | 14.7M |" in text
    assert "| finetune | 92.10 | 92.00 | 4.1M |" in text
    assert "validation accuracy 92.00% vs 90.00%." in text


def test_report_without_jpeg_note_or_latency(tmp_path):
    phases = [{"phase": "baseline", "accuracy": 93.5}]
    path = write_report(
        tmp_path / "report.md", title="t", config={}, data_source="cifar-10-batches-py",
        device="cpu", phases=phases, latency_batch=256,
        summary=_summary(pruned={**PRUNED, "latency_ms": None}), plots=[],
    )
    text = path.read_text()
    assert "not directly comparable" not in text
    assert "not measured" in text


def test_report_rejects_unknown_phase_keys(tmp_path):
    with pytest.raises(ValueError, match="test_acc"):
        write_report(
            tmp_path / "report.md", title="t", config={}, data_source="x", device="cpu",
            phases=[{"phase": "baseline", "test_acc": 90.0}], latency_batch=1,
            summary=_summary(), plots=[],
        )


@pytest.mark.parametrize("batch", [0, -3, 2.5, True, None])
def test_report_rejects_bad_latency_batch(tmp_path, batch):
    with pytest.raises(ValueError, match="latency_batch"):
        write_report(
            tmp_path / "report.md", title="t", config={}, data_source="x", device="cpu",
            phases=_phases(), latency_batch=batch, summary=_summary(), plots=[],
        )
    assert not (tmp_path / "report.md").exists()


def _metrics(n_epochs):
    phases = ["baseline"] * (n_epochs // 2) + ["attenuation"] * (n_epochs - n_epochs // 2)
    rows = []
    for epoch, phase in enumerate(phases, start=1):
        rows.append({
            "phase": phase, "epoch": epoch, "train_loss": 2.0 / epoch, "train_acc": 50 + epoch,
            "test_loss": None if epoch % 3 == 0 else 2.2 / epoch,
            "test_acc": None if epoch % 3 == 0 else 48 + epoch,
            "live_fraction": 1.0 if phase == "baseline" else 0.7, "lr": 0.1, "seconds": 1.0,
        })
    return rows


def test_training_curves_png(tmp_path):
    _assert_png(plot_training_curves(_metrics(12), tmp_path / "a" / "curves.png"))


def test_training_curves_draw_the_held_out_set_the_rows_have(tmp_path, monkeypatch):
    drawn = []
    original = plots._plot_series
    monkeypatch.setattr(plots, "_plot_series", lambda ax, x, y, **kw: (drawn.append(kw.get("label")),
                                                                       original(ax, x, y, **kw)))
    _assert_png(plot_training_curves(_metrics(6), tmp_path / "test.png"))
    assert drawn == ["train", "test", "train", "test", None]  # accuracy, loss, live fraction
    drawn.clear()
    rows = [{**{k: v for k, v in row.items() if not k.startswith("test_")},
             "val_loss": 2.1 / row["epoch"], "val_acc": 47 + row["epoch"]} for row in _metrics(6)]
    _assert_png(plot_training_curves(rows, tmp_path / "val.png"))
    assert drawn == ["train", "validation", "train", "validation", None]


def test_training_curves_single_epoch_without_test(tmp_path):
    row = {k: v for k, v in _metrics(1)[0].items() if not k.startswith("test_")}
    _assert_png(plot_training_curves([row], tmp_path / "curves.png"))


def _fates(rng, n_steps, n_filters):
    status = np.zeros((n_steps, n_filters), dtype=np.uint8)
    for f in range(n_filters):
        weak_from = rng.integers(0, n_steps)
        status[weak_from:, f] = 1
        if f % 3 == 0:
            status[min(n_steps - 1, weak_from + 2):, f] = 2
        elif f % 3 == 1:
            status[min(n_steps - 1, weak_from + 1):, f] = 0  # returns
    return status


def test_filter_fates_png(tmp_path):
    rng = np.random.default_rng(0)
    history = OrderedDict(
        (f"features.{i}", _fates(rng, 10, n)) for i, n in enumerate([16, 32, 64, 8, 24])
    )
    history["features.1"] = torch.from_numpy(history["features.1"])
    steps = list(range(50, 550, 50))
    _assert_png(plot_filter_fates(history, steps, tmp_path / "f" / "fates.png"))
    _assert_png(plot_filter_fates(history, steps, tmp_path / "fates2.png", max_layers=2))


def test_filter_fates_title_carries_the_statistics(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    status = np.array([[1, 1, 0, 2], [1, 0, 1, 2], [2, 0, 2, 2]], dtype=np.uint8)  # ends removing
    statistics = fate_statistics({"conv1": status}, ended=True)
    plot_filter_fates({"conv1": status}, [10, 20, 20], tmp_path / "fates.png", statistics=statistics)
    plot_filter_fates({"conv1": status}, [10, 20, 20], tmp_path / "plain.png")
    annotated, plain = (" ".join(fig.get_suptitle().split()) for fig in figures)
    assert annotated == "Filter fates per layer " + statistics.describe()
    assert "1 returns (1 kept to the end), weak-set churn 2.50 filters a step" in annotated
    assert plain == "Filter fates per layer"
    panel = figures[0].axes[0].get_title()
    assert panel == "conv1\nremoved 3/4, returns 1"


def test_filter_fates_every_filter_removed(tmp_path):
    status = np.full((4, 8), 2, dtype=np.uint8)
    status[0] = 1
    _assert_png(plot_filter_fates({"conv1": status}, [10, 20, 30, 40], tmp_path / "fates.png"))


def test_filter_fates_empty_history(tmp_path):
    _assert_png(plot_filter_fates({}, [], tmp_path / "empty.png"))
    empty_rows = {"conv1": np.zeros((0, 16), dtype=np.uint8)}
    _assert_png(plot_filter_fates(empty_rows, [], tmp_path / "empty2.png"))


def test_filter_fates_rejects_mismatched_steps(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        plot_filter_fates({"conv1": np.zeros((3, 4))}, [1, 2], tmp_path / "x.png")


def test_report_times_each_epoch_against_the_baseline_median(tmp_path):
    epochs = [{"phase": "baseline", "epoch": i + 1, "seconds": s, "macs": 200} for i, s in enumerate((13.0, 11.0, 12.0))]
    epochs += [{"phase": "attenuation", "epoch": 4, "seconds": 9.0, "macs": 150},
               {"phase": "finetune", "epoch": 5, "seconds": 6.0, "macs": 50}]
    text = write_report(
        tmp_path / "report.md", title="t", config={}, data_source="x", device="cpu",
        phases=_phases(), latency_batch=64, summary=_summary(), plots=[], epochs=epochs,
    ).read_text()
    assert "baseline epochs' median (12.0 s)" in text
    assert "training step timed in turns with the unpruned one's took 0.72x its time" in text
    assert "| 4 | attenuation | 9.0 | 0.75 | 0.75 |" in text
    assert "| 5 | finetune | 6.0 | 0.50 | 0.25 |" in text
    assert "| 1 | baseline |" not in text
    without = write_report(tmp_path / "r2.md", title="t", config={}, data_source="x", device="cpu",
                           phases=_phases(), latency_batch=64, summary=_summary(), plots=[]).read_text()
    assert "## Epoch times" not in without

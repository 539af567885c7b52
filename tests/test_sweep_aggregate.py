"""The aggregation half of a sweep: results.jsonl, per-cell statistics, table.md/table.csv, the
Pareto plot, and `attenuation compare` over sweep and run folders."""

import csv
import json
import math
import random
import re
import warnings

import numpy as np
import pytest

from attenuation.config import RunConfig
from attenuation.sweep import (
    Stat, TrialRecord, append_result, cells, compare, load_trials, plot_pareto, read_results,
    write_table_csv, write_table_md,
)
from attenuation.cli import main as cli_main
from attenuation.sweep.table import METRICS, table_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary(acc, base_acc=80.0, macs=50, base_macs=200, params=30, base_params=120,
             latency=2.0, base_latency=None, returns=3, wall=10.0, kept=1, churn=2.5, during=7,
             fates=True, val=None, steps=None):
    """A summary.json; ``fates=False``: one written before the fate statistics existed; without
    ``val`` as written before the validation split (no val_accuracy); ``steps``: the unpruned and
    the pruned training step in ms, timed in turns (without: written before runs timed them)."""
    baseline = {"accuracy": base_acc, "params": base_params, "macs": base_macs}
    if base_latency is not None:
        baseline["latency_ms"] = base_latency
    pruned = {"accuracy": acc, "params": params, "macs": macs, "latency_ms": latency}
    if val is not None:
        baseline["val_accuracy"], pruned["val_accuracy"] = base_acc - 1, val
    summary = {"method": "attenuation", "criterion": "l1", "ratio": 0.5, "data_source": "synthetic",
               "device": "cpu", "wall_seconds": wall, "baseline": baseline, "pruned": pruned,
               "returns": returns, "removed_filters": 8}
    if fates:
        summary.update(kept_returns=kept, churn=churn, removed_during_phase=during,
                       mean_steps_weak_before_removal=13.0)
    if steps is not None:
        summary["speed"] = {"batch_size": 256, "baseline_forward_ms": 1.0, "pruned_forward_ms": 1.0,
                            "baseline_train_step_ms": steps[0], "pruned_train_step_ms": steps[1]}
    return summary


def _record(seed, summary=None, error=None, baseline_id=None, **config):
    config = {**RunConfig(preset="smoke").to_dict(), "ratio": 0.5, "seed": seed, "out": f"/runs/t{seed}",
              **config}
    status = "ok" if error is None else "failed"
    name = "-".join(f"{k}{v}" for k, v in sorted(config.items()) if k in ("method", "ratio", "seed"))
    return TrialRecord(trial=name, config=config, baseline_id=baseline_id, status=status,
                       error=error, summary=summary)


def _by_method_ratio(rows):
    return {(row.options["method"], row.options["ratio"]): row for row in rows}


# ---- statistics


def test_stat_mean_and_sample_std_by_hand():
    stat = Stat.of([1, 2, 4])
    assert stat.n == 3
    assert stat.mean == pytest.approx(7 / 3)
    assert stat.std == pytest.approx(math.sqrt(7 / 3))  # sum of squares 42/9 over n - 1 = 2
    one = Stat.of([5.5])
    assert (one.mean, one.std, one.n) == (5.5, None, 1)
    assert Stat.of([]) == Stat(None, None, 0)


def test_cells_hand_computed():
    records = [
        _record(0, _summary(70.0, base_acc=80.0, macs=50, latency=2.0, base_latency=4.0, wall=10.0,
                            kept=1, churn=2.0, during=2, steps=(60.0, 40.0))),
        _record(1, _summary(72.0, base_acc=81.0, macs=60, latency=2.0, base_latency=5.0, wall=20.0,
                            kept=4, churn=3.0, during=8, steps=(64.0, 32.0))),
        _record(2, error="out of memory"),
        _record(0, _summary(60.0, base_acc=80.0, returns=9), method="hard"),
    ]
    rows = _by_method_ratio(cells(records))
    att = rows[("attenuation", 0.5)]
    assert (att.seeds, att.failed) == (2, 1)
    assert att.stats["accuracy"].mean == pytest.approx(71.0)
    assert att.stats["accuracy"].std == pytest.approx(math.sqrt(2))
    # change against each trial's own baseline: -10 and -9
    assert att.stats["accuracy_change"].mean == pytest.approx(-9.5)
    assert att.stats["accuracy_change"].std == pytest.approx(math.sqrt(0.5))
    # MACs removed: 75% and 70% of 200; params removed: 75% both
    assert att.stats["macs_removed"].mean == pytest.approx(72.5)
    assert att.stats["params_removed"].mean == pytest.approx(75.0)
    assert att.stats["params_removed"].std == pytest.approx(0.0)
    assert att.stats["latency_ratio"].mean == pytest.approx(2.25)
    # training-step speed-ups in turns: 60/40 and 64/32
    assert att.stats["train_step_speedup"].mean == pytest.approx(1.75)
    assert att.stats["train_step_speedup"].std == pytest.approx(math.sqrt(0.125))
    assert att.stats["wall_seconds"].mean == pytest.approx(15.0)
    assert att.stats["kept_returns"].mean == pytest.approx(2.5)
    assert att.stats["churn"].mean == pytest.approx(2.5)
    # 2 and 8 of the 8 removed filters removed by attenuation steps: 25% and 100%
    assert att.stats["removed_during_phase_percent"].mean == pytest.approx(62.5)
    hard = rows[("hard", 0.5)]
    assert (hard.seeds, hard.failed) == (1, 0)
    assert hard.stats["accuracy"].std is None
    assert hard.stats["returns"].mean == 9
    assert hard.stats["latency_ratio"] == Stat(None, None, 0)  # no baseline latency recorded
    assert hard.stats["train_step_speedup"] == Stat(None, None, 0)  # a run before the in-turn timing
    assert att.best and not hard.best


def test_cells_match_numpy_on_random_records():
    rng = random.Random(1234)
    records, expected = [], {}
    for method in ("attenuation", "hard", "sfp"):
        for ratio in (0.3, 0.6):
            n = rng.randint(2, 5)
            accs = [rng.uniform(50, 90) for _ in range(n)]
            bases = [rng.uniform(85, 95) for _ in range(n)]
            macs = [rng.randint(10, 190) for _ in range(n)]
            for seed in range(n):
                summary = _summary(accs[seed], base_acc=bases[seed], macs=macs[seed],
                                   base_latency=rng.uniform(1, 9), latency=rng.uniform(1, 9))
                records.append(_record(seed, summary, method=method, ratio=ratio))
            expected[(method, ratio)] = (np.array(accs), np.array(accs) - np.array(bases),
                                         100 * (1 - np.array(macs) / 200))
    rng.shuffle(records)
    rows = _by_method_ratio(cells(records))
    assert len(rows) == len(expected)
    for key, (accs, changes, removed) in expected.items():
        row = rows[key]
        assert row.seeds == len(accs) and row.failed == 0
        for name, values in (("accuracy", accs), ("accuracy_change", changes),
                             ("macs_removed", removed)):
            assert row.stats[name].mean == pytest.approx(values.mean(), rel=1e-12)
            assert row.stats[name].std == pytest.approx(values.std(ddof=1), rel=1e-12)
    for ratio in (0.3, 0.6):
        at_ratio = [row for row in rows.values() if row.options["ratio"] == ratio]
        best = max(at_ratio, key=lambda row: row.stats["accuracy"].mean)
        assert [row.best for row in at_ratio] == [row is best for row in at_ratio]


def test_fate_columns_and_results_written_before_them(tmp_path):
    """Kept returns and churn are columns; older summaries without the fate statistics still
    load and aggregate, their cells' statistics over the trials that have them."""
    records = [_record(0, _summary(70.0, kept=2, churn=1.5)), _record(1, _summary(71.0, fates=False)),
               _record(0, _summary(60.0, fates=False), method="hard")]
    sweep = _sweep_folder(tmp_path / "sweep", records)
    rows = _by_method_ratio(cells(load_trials([sweep])))
    att, hard = rows[("attenuation", 0.5)], rows[("hard", 0.5)]
    assert att.seeds == 2 and att.stats["accuracy"].n == 2
    assert (att.stats["kept_returns"].mean, att.stats["kept_returns"].n) == (2, 1)
    assert (att.stats["churn"].mean, att.stats["churn"].n) == (1.5, 1)
    assert hard.stats["churn"] == hard.stats["kept_returns"] == Stat(None, None, 0)
    text = table_markdown([att, hard])
    header = text.splitlines()[0]
    assert "| kept returns | weak-set churn (filters/step) | removed during the phase (%) |" in header
    assert "| 3.0 | 2.0 | 1.50 | 87.5 |" in text  # returns, kept returns, churn, 7 of 8 removed
    assert "| 3.0 | — | — | — |" in text
    null = _summary(70.0, churn=None)  # no attenuation step: churn is null
    assert cells([_record(0, null)])[0].stats["churn"] == Stat(None, None, 0)


def test_rows_sorted_by_ratio_then_method():
    records = [_record(0, _summary(70.0), method=m, ratio=r)
               for m, r in (("sfp", 0.6), ("hard", 0.3), ("attenuation", 0.6), ("sfp", 0.3))]
    order = [(row.options["ratio"], row.options["method"]) for row in cells(records)]
    assert order == [(0.3, "hard"), (0.3, "sfp"), (0.6, "attenuation"), (0.6, "sfp")]


def test_columns_show_only_varying_options():
    same = [_record(s, _summary(70.0 + s)) for s in range(3)]
    rows = cells(same)
    assert len(rows) == 1 and list(rows[0].options) == ["method", "criterion", "ratio"]
    varied = same + [_record(0, _summary(60.0), factor=0.5, width=0.125)]
    rows = cells(varied)
    assert list(rows[0].options) == ["method", "criterion", "ratio", "factor", "width"]
    assert sorted(row.options["factor"] for row in rows if row.options["factor"] is not None) == [0.5]
    assert sorted(row.seeds for row in rows) == [1, 3]


def test_a_missing_option_reads_as_its_default(tmp_path):
    """A trial written before a field existed is read with the field's default (the value that
    keeps what runs did before it): the same cell as a newer trial at that default."""
    with_key = _record(0, _summary(70.0), reversible=True)
    at_default = _record(1, _summary(72.0), reversible=None)
    config = {k: v for k, v in with_key.config.items() if k != "reversible"}
    without = TrialRecord("old", config, None, "ok", None, _summary(71.0))
    rows = cells([with_key, without, at_default])
    assert [list(row.options) for row in rows] == [["method", "criterion", "ratio", "reversible"]] * 2
    assert sorted(row.seeds for row in rows) == [1, 2]
    text = table_markdown(rows)
    assert "| 0.5 | true | 1 | 0 |" in text and "| 0.5 | — | 2 | 0 |" in text
    with open(write_table_csv(rows, tmp_path / "table.csv"), newline="") as f:
        assert sorted(line["reversible"] for line in csv.DictReader(f)) == ["", "true"]
    unknown = TrialRecord("other", {**config, "not_a_field": 1}, None, "ok", None, _summary(69.0))
    assert "(absent)" in table_markdown(cells([with_key, unknown]))  # a key no RunConfig has


# ---- table.md and table.csv


def test_markdown_failed_one_seed_and_bold(tmp_path):
    records = [
        _record(0, _summary(70.0), method="attenuation", ratio=0.3),
        _record(1, _summary(74.0), method="attenuation", ratio=0.3),
        _record(0, _summary(71.5), method="hard", ratio=0.3),  # one seed, lower mean than 72
        _record(0, _summary(65.0), method="hard", ratio=0.6),  # best at 0.6: the only ok cell
        _record(0, error="NaN loss", method="sfp", ratio=0.6),
        _record(1, error="NaN loss", method="sfp", ratio=0.6),
    ]
    text = write_table_md(cells(records), tmp_path / "table.md").read_text()
    lines = {line.split(" | ")[0].strip("| ") + "@" + line.split(" | ")[2]: line
             for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "| 2 | 0 | **72.00 ± 2.83** | -8.00 ± 2.83 |" in lines["attenuation@0.3"]
    assert "| 1 | 0 | 71.50 ± — |" in lines["hard@0.3"]
    assert "**65.00 ± —**" in lines["hard@0.6"]
    # no trial has a validation accuracy: no column for it
    assert lines["sfp@0.6"].endswith("| 0 | 2 | " + " | ".join(["failed"] * (len(METRICS) - 1)) + " |")
    assert text.count("**") == 4
    assert "validation" not in text and "Bold: the best test accuracy at its ratio." in text


def test_cells_are_chosen_by_validation_accuracy_when_trials_have_one(tmp_path):
    """The study chooses by validation accuracy: a cell with the higher test but the lower
    validation accuracy is not the best; a trial written before the split is no candidate."""
    records = [
        _record(0, _summary(75.0, val=70.0), method="attenuation"),
        _record(1, _summary(77.0, val=72.0), method="attenuation"),
        _record(0, _summary(80.0, val=68.0), method="hard"),   # best test accuracy, worse validation
        _record(0, _summary(90.0), method="sfp"),              # an older summary: no val_accuracy
    ]
    rows = {row.options["method"]: row for row in cells(records)}
    assert rows["attenuation"].stats["val_accuracy"].mean == pytest.approx(71.0)
    assert rows["attenuation"].stats["val_accuracy"].std == pytest.approx(math.sqrt(2))
    assert rows["sfp"].stats["val_accuracy"] == Stat(None, None, 0)
    assert [m for m in ("attenuation", "hard", "sfp") if rows[m].best] == ["attenuation"]
    text = table_markdown(list(rows.values()))
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "| test accuracy (%) | validation accuracy (%) | accuracy change (points) |" in header
    line = {row.split(" | ")[0].strip("| "): row for row in text.splitlines() if row.startswith("| ")}
    assert "| 76.00 ± 1.41 | **71.00 ± 1.41** |" in line["attenuation"]
    assert "| 80.00 ± — | 68.00 ± — |" in line["hard"] and "| 90.00 ± — | — |" in line["sfp"]
    assert text.count("**") == 2 and "Bold: the best validation accuracy at its ratio" in text
    with open(write_table_csv(list(rows.values()), tmp_path / "table.csv"), newline="") as f:
        read = {line["method"]: line for line in csv.DictReader(f)}
    assert float(read["attenuation"]["val_accuracy_mean"]) == pytest.approx(71.0)
    assert read["sfp"]["val_accuracy_mean"] == ""


def test_csv_always_has_the_validation_columns(tmp_path):
    rows = cells([_record(0, _summary(70.0))])
    with open(write_table_csv(rows, tmp_path / "table.csv"), newline="") as f:
        line = next(csv.DictReader(f))
    assert (line["val_accuracy_mean"], line["val_accuracy_std"]) == ("", "")


def test_bold_ties_both():
    records = [_record(0, _summary(70.0), method="attenuation"), _record(0, _summary(70.0), method="hard")]
    assert [row.best for row in cells(records)] == [True, True]


def test_csv_round_trip(tmp_path):
    records = [_record(s, _summary(60.0 + 3.7 * s, base_latency=3.0 + s, macs=40 + s))
               for s in range(3)]
    records += [_record(0, _summary(55.5), factor=0.5), _record(0, error="boom", factor=0.9)]
    rows = cells(records)
    with open(write_table_csv(rows, tmp_path / "table.csv"), newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows)
    for row, line in zip(rows, read):
        assert line["method"] == row.options["method"]
        assert float(line["ratio"]) == row.options["ratio"]
        assert line["factor"] == ("" if row.options["factor"] is None else str(row.options["factor"]))
        assert (int(line["seeds"]), int(line["failed"])) == (row.seeds, row.failed)
        for name in METRICS:
            for part in ("mean", "std"):
                value = getattr(row.stats[name], part)
                cell = line[f"{name}_{part}"]
                assert (cell == "") if value is None else float(cell) == value


def test_empty_inputs_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no trials"):
        cells([])
    with pytest.raises(ValueError, match="no rows"):
        write_table_md([], tmp_path / "t.md")
    with pytest.raises(TypeError, match="TrialRecord"):
        cells([{"trial": "x"}])


# ---- the plot


def test_pareto_png(tmp_path):
    records = [_record(s, _summary(70.0 + s, macs=50 + 10 * r), baseline_id=f"b{s}", ratio=r)
               for s in range(2) for r in (0.3, 0.6)]
    records.append(_record(0, error="boom", method="hard"))
    path = plot_pareto(records, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    only_failed = plot_pareto([_record(0, error="boom")], tmp_path / "empty.png")
    assert only_failed.read_bytes()[:8] == PNG_SIGNATURE


# ---- results.jsonl


def test_record_json_round_trip_and_validation():
    record = _record(3, _summary(70.0), baseline_id="base-3")
    assert TrialRecord.from_json(record.to_json()) == record
    assert "\n" not in record.to_json()
    with pytest.raises(ValueError, match="status"):
        TrialRecord("t", record.config, None, "done", None, None)
    with pytest.raises(ValueError, match="error message"):
        TrialRecord("t", record.config, None, "failed", None, None)
    with pytest.raises(ValueError, match="summary null"):
        TrialRecord("t", record.config, None, "failed", "boom", _summary(1.0))
    with pytest.raises(ValueError, match="summary must be an object"):
        TrialRecord("t", record.config, None, "ok", None, None)
    with pytest.raises(ValueError, match=r"summary.pruned.accuracy must be a finite number"):
        TrialRecord("t", record.config, None, "ok", None, _summary(float("nan")))
    with pytest.raises(ValueError, match=r"summary.churn must be a finite number"):
        TrialRecord("t", record.config, None, "ok", None, _summary(1.0, churn="high"))
    with pytest.raises(ValueError, match=r"summary.pruned.val_accuracy must be a finite number"):
        TrialRecord("t", record.config, None, "ok", None, _summary(1.0, val=float("nan")))
    TrialRecord("t", record.config, None, "ok", None, _summary(1.0, val=50.0))
    TrialRecord("t", record.config, None, "ok", None, _summary(1.0, steps=(60.0, 40.0)))
    with pytest.raises(ValueError, match=r"summary.speed.pruned_train_step_ms must be positive"):
        TrialRecord("t", record.config, None, "ok", None, _summary(1.0, steps=(60.0, 0.0)))
    with pytest.raises(ValueError, match=r"summary.speed.baseline_train_step_ms must be a finite number"):
        TrialRecord("t", record.config, None, "ok", None, _summary(1.0, steps=(float("inf"), 40.0)))
    null_val = _summary(1.0, val=50.0)
    null_val["pruned"]["val_accuracy"] = None  # a run without a split
    TrialRecord("t", record.config, None, "ok", None, null_val)
    with pytest.raises(ValueError, match="config.ratio"):
        TrialRecord("t", {**record.config, "ratio": "half"}, None, "ok", None, _summary(1.0))
    with pytest.raises(ValueError, match="unexpected"):
        TrialRecord.from_dict({**json.loads(record.to_json()), "extra": 1})


def test_append_and_read(tmp_path):
    path = tmp_path / "results.jsonl"
    records = [_record(s, _summary(70.0 + s), baseline_id="b") for s in range(3)]
    records.append(_record(3, error="killed"))
    for record in records:
        append_result(path, record)
    assert read_results(path) == records
    assert path.read_text().count("\n") == 4


def test_partial_last_line_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "results.jsonl"
    first, second = _record(0, _summary(70.0)), _record(1, _summary(71.0))
    append_result(path, first)
    with open(path, "a") as f:
        f.write(second.to_json()[:40])  # a writer killed mid-line
    with pytest.warns(UserWarning, match="partial last line"):
        assert read_results(path) == [first]
    with pytest.warns(UserWarning, match="partial last line"):
        append_result(path, second)  # cuts the partial line off before appending
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_results(path) == [first, second]


def test_whole_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    first, second, third = (_record(s, _summary(70.0 + s)) for s in range(3))
    path.write_text(first.to_json() + "\n" + second.to_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_results(path) == [first, second]
        append_result(path, third)
        assert read_results(path) == [first, second, third]


def test_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "results.jsonl"
    good = _record(0, _summary(70.0)).to_json()
    path.write_text(good + "\n" + good[:-5] + "\n" + good + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: corrupt record: not valid JSON")):
        read_results(path)
    bad = json.loads(good)
    del bad["summary"]["pruned"]["macs"]
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"line 2: corrupt record: summary.pruned has no 'macs'"):
        read_results(path)


# ---- folders


def _run_folder(folder, record):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(record.config))
    (folder / "summary.json").write_text(json.dumps(record.summary))
    return folder


def _sweep_folder(folder, records):
    for record in records:
        append_result(folder / "results.jsonl", record)
    return folder


def test_load_sweep_and_run_folders_mixed(tmp_path):
    sweep_records = [_record(s, _summary(70.0 + s), baseline_id="b0") for s in range(2)]
    sweep = _sweep_folder(tmp_path / "sweep", sweep_records)
    run = _run_folder(tmp_path / "runs" / "quick-run", _record(2, _summary(72.0)))
    records = load_trials([sweep, str(run)])
    assert records[:2] == sweep_records
    assert (records[2].trial, records[2].baseline_id, records[2].status) == ("quick-run", None, "ok")
    rows = cells(records)
    assert len(rows) == 1 and rows[0].seeds == 3
    assert rows[0].stats["accuracy"].mean == pytest.approx(71.0)


def test_retried_trial_counts_once(tmp_path):
    failed, retried = _record(0, error="preempted"), _record(0, _summary(70.0))
    sweep = _sweep_folder(tmp_path / "sweep", [failed, _record(1, _summary(72.0)), retried])
    rows = cells(load_trials([sweep]))
    assert (rows[0].seeds, rows[0].failed) == (2, 0)


def test_bad_folders_name_the_path(tmp_path):
    neither = tmp_path / "neither"
    neither.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{neither} is neither a sweep folder")):
        load_trials([neither])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'absent'} is not a folder")):
        load_trials([tmp_path / "absent"])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(f"{unfinished} has config.json but no summary.json")):
        load_trials([unfinished])
    corrupt = _run_folder(tmp_path / "corrupt", _record(0, _summary(70.0)))
    (corrupt / "summary.json").write_text('{"baseline": ')
    with pytest.raises(ValueError, match=re.escape(f"cannot read {corrupt / 'summary.json'}")):
        load_trials([corrupt])
    (corrupt / "summary.json").write_text('{"baseline": {}}')
    with pytest.raises(ValueError, match=re.escape(f"{corrupt}: not a valid run folder: summary.baseline")):
        load_trials([corrupt])


def test_empty_sets_and_duplicates_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no folders"):
        load_trials([])
    empty = tmp_path / "empty-sweep"
    empty.mkdir()
    (empty / "results.jsonl").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"no finished trials in {empty}")):
        load_trials([empty])
    sweep = _sweep_folder(tmp_path / "sweep", [_record(0, _summary(70.0))])
    with pytest.raises(ValueError, match="given twice"):
        load_trials([sweep, tmp_path / "." / "sweep"])


# ---- compare


def test_compare_writes_the_three_files(tmp_path):
    sweep = _sweep_folder(tmp_path / "sweep", [
        _record(s, _summary(70.0 + s), baseline_id=f"b{s}", ratio=r) for s in range(2) for r in (0.3, 0.6)
    ])
    run = _run_folder(tmp_path / "run", _record(0, _summary(60.0), method="hard"))
    out = tmp_path / "out"
    rows = compare([sweep, run], out)
    assert len(rows) == 3
    assert (out / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "table.md").read_text() == table_markdown(rows)
    assert len((out / "table.csv").read_text().splitlines()) == 4


def test_compare_command(tmp_path, capsys):
    sweep = _sweep_folder(tmp_path / "sweep", [_record(0, _summary(70.0))])
    assert cli_main(["compare", str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "table.csv").is_file()
    assert cli_main(["compare", str(tmp_path), "--out", str(tmp_path / "out2")]) == 2
    assert f"{tmp_path} is neither a sweep folder" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# ---- paired differences


def test_paired_differences_by_hand(tmp_path):
    from attenuation.sweep.paired import paired_differences, paired_markdown

    acc = {("attenuation", 0): 81.0, ("attenuation", 1): 80.0, ("attenuation", 2): 79.5,
           ("hard", 0): 80.5, ("hard", 1): 80.25, ("hard", 2): 79.0, ("iterative", 1): 81.0}
    records = [_record(seed, _summary(value, val=value - 1), baseline_id=f"b{seed}", method=method)
               for (method, seed), value in acc.items()]
    records.append(_record(0, _summary(82.0), baseline_id="b0", method="none"))
    records.append(_record(5, _summary(70.0), baseline_id="b5", method="hard", ratio=0.7))  # other ratio
    pairs = {pair.against["method"]: pair for pair in paired_differences(records)}
    assert set(pairs) == {"hard", "iterative"}  # none prunes nothing; ratio 0.7 has no attenuation cell
    hard = pairs["hard"]
    assert hard.baselines == ("b0", "b1", "b2") and hard.test == pytest.approx((0.5, -0.25, 0.5))
    assert hard.test_stat.mean == pytest.approx(0.25)
    assert hard.test_stat.std == pytest.approx(math.sqrt(((0.25) ** 2 * 2 + 0.5 ** 2) / 2))
    assert hard.val == pytest.approx(hard.test)  # both val accuracies are test - 1
    iterative = pairs["iterative"]
    assert iterative.baselines == ("b1",) and iterative.test == pytest.approx((-1.0,))
    text = paired_markdown(list(pairs.values()))
    assert f"| 0.5 | {RunConfig.criterion} | defaults | method=hard | 3 | +0.25 ± 0.43 |" in text
    assert "| method=iterative | 1 | -1.00 ± — |" in text


def test_compare_writes_paired_md_only_with_pairs(tmp_path):
    lone = [_record(s, _summary(80.0 + s), baseline_id=f"b{s}", method="hard") for s in range(2)]
    sweep = tmp_path / "lone"
    sweep.mkdir()
    for record in lone:
        append_result(sweep / "results.jsonl", record)
    compare([sweep], tmp_path / "out1")
    assert not (tmp_path / "out1" / "paired.md").exists()
    append_result(sweep / "results.jsonl", _record(0, _summary(81.0), baseline_id="b0", method="attenuation"))
    compare([sweep], tmp_path / "out2")
    assert "+1.00 ± —" in (tmp_path / "out2" / "paired.md").read_text()

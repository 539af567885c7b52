"""Shared baselines: ``baseline.pt``, ``attenuation run --baseline`` and the baseline key."""
import json

import pytest
import torch

from attenuation.cli import main
from attenuation.config import AFTER_BASELINE_FIELDS, baseline_id, baseline_key, complete_config, preset_config
from attenuation.run import BASELINE_FILE, Run, run

# A value of every field that acts only after the baseline, valid on the smoke preset and different
# from it; "preset" and "out" compute nothing.
AFTER_BASELINE_SAMPLES = {
    "method": "iterative", "criterion": "fpgm", "ratio": 0.25, "scope": "global", "ramp": "linear",
    "factor": 0.5, "eps": 0.05, "interval": 3, "reversible": True, "unattenuated_scores": True,
    "return_margin": 0.1, "return_after": 3, "group_reduce": "max", "attenuate": "output", "round_to": 4,
    "compact": False,
    "lr_pruning_fraction": 0.3, "lr_finetune_fraction": 0.2,
}


def _config(tiny_npz, out, **overrides):
    return preset_config("smoke", **{"data": str(tiny_npz), "out": str(out), "train_subset": None,
                                     "test_subset": None, "batch_size": 32, "criterion": "random",
                                     **overrides})


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _baseline_weights(folder):
    return torch.load(folder / BASELINE_FILE, weights_only=True)["model"]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_after_baseline_field_has_a_sample():
    assert set(AFTER_BASELINE_SAMPLES) == set(AFTER_BASELINE_FIELDS) - {"preset", "out"}


def test_the_baseline_key_ignores_exactly_the_later_fields():
    base = preset_config("smoke")
    for name, value in AFTER_BASELINE_SAMPLES.items():
        assert baseline_id(preset_config("smoke", **{name: value})) == baseline_id(base), name
    epochs = {"baseline": 1, "attenuation": 3, "recovery": 0, "finetune": 2}
    assert baseline_id(preset_config("smoke", epochs=epochs)) == baseline_id(base)
    for name, value in (("lr", 0.05), ("seed", 1), ("width", 0.125), ("batch_size", 32),
                        ("lr_warmup_fraction", 0.2), ("data", "x.npz"), ("val_split", 100)):
        assert baseline_id(preset_config("smoke", **{name: value})) != baseline_id(base), name
    assert baseline_id(preset_config("smoke", epochs={"baseline": 2})) != baseline_id(base)
    assert baseline_key(base)["epochs"] == {"baseline": 1}


def test_baseline_ids_of_earlier_sweeps_stay_valid():
    """A field added later, at the value that leaves runs as they were, does not change the id
    (the name of a sweep's baselines/ folder): literals computed before val_split existed. Runs
    before ``precision`` computed in float32: at that value the ids stay, at the default (auto,
    which may compute in bfloat16) they differ."""
    assert baseline_id(preset_config("smoke", precision="float32")) == "baseline-s0-d56a4bf369"
    assert baseline_id(preset_config("quick", seed=3, precision="float32")) == "baseline-s3-7b153d00fc"
    assert baseline_id(preset_config("smoke")) != "baseline-s0-d56a4bf369"
    assert baseline_key(preset_config("smoke"))["val_split"] == 0  # compared on --baseline all the same


def test_a_saved_configuration_without_precision_reads_as_float32():
    """Configurations saved before ``precision`` existed were computed in float32: read so, a
    baseline or checkpoint of theirs is not taken for a bfloat16 one."""
    saved = preset_config("smoke").to_dict()
    del saved["precision"]
    assert complete_config(saved)["precision"] == "float32"
    assert baseline_key(saved)["precision"] == "float32"
    assert complete_config(preset_config("smoke").to_dict())["precision"] == "auto"


@pytest.mark.slow
def test_the_later_fields_do_not_change_the_trained_baseline(tiny_npz, tmp_path):
    """The claim behind the key, checked by training: a baseline is bitwise the same whatever the
    value of each field that the key ignores."""
    Run(_config(tiny_npz, tmp_path / "ref"), progress=False).execute(until_phase="baseline")
    reference = _baseline_weights(tmp_path / "ref")
    for name, value in AFTER_BASELINE_SAMPLES.items():
        out = tmp_path / name
        Run(_config(tiny_npz, out, **{name: value}), progress=False).execute(until_phase="baseline")
        assert _equal(_baseline_weights(out), reference), name


@pytest.mark.slow
def test_a_run_from_a_shared_baseline_equals_the_run_that_trained_its_own(tiny_npz, tmp_path):
    mine = dict(method="attenuation", ratio=0.5, epochs={"baseline": 1, "attenuation": 2, "recovery": 1,
                                                         "finetune": 1})
    full = run(_config(tiny_npz, tmp_path / "full", **mine), progress=False)
    other = _config(tiny_npz, tmp_path / "other", method="hard", ratio=0.25)
    assert Run(other, progress=False).execute(until_phase="baseline") is None
    assert not (tmp_path / "other" / "summary.json").exists()
    shared = run(_config(tiny_npz, tmp_path / "shared", **mine), progress=False, baseline=tmp_path / "other")
    assert _equal(_weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "shared" / "model.pt"))
    assert full["pruned"]["accuracy"] == shared["pruned"]["accuracy"]
    assert full["baseline"]["accuracy"] == shared["baseline"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["baseline", "attenuation", "attenuation", "recovery", "finetune"]
    assert not (tmp_path / "shared" / BASELINE_FILE).exists()  # it trained none of its own


def test_a_baseline_of_another_training_configuration_is_refused(tiny_npz, tmp_path, capsys):
    base = _config(tiny_npz, tmp_path / "base", train_subset=320, test_subset=100)
    Run(base, progress=False).execute(until_phase="baseline")
    argv = ["run", "--preset", "smoke", "--data", str(tiny_npz), "--batch-size", "32", "--train-subset",
            "320", "--test-subset", "100", "--no-progress", "--baseline", str(tmp_path / "base")]
    assert main([*argv, "--method", "none", "--epochs-attenuation", "0",
                 "--out", str(tmp_path / "ok")]) == 0  # the same training configuration is accepted
    capsys.readouterr()
    assert main([*argv, "--lr", "0.05", "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "trained with another model or training configuration: lr=0.2 (here 0.05)" in error
    assert main([*argv, "--width", "0.125", "--out", str(tmp_path / "b")]) == 2
    assert "width=0.0625 (here 0.125)" in capsys.readouterr().err


def test_only_a_finished_baseline_is_accepted(tiny_npz, tmp_path, capsys):
    config = dict(epochs={"baseline": 2, "attenuation": 1, "recovery": 1, "finetune": 1})
    assert run(_config(tiny_npz, tmp_path / "half", **config), progress=False, stop_after_epochs=1) is None
    with pytest.raises(ValueError, match="is not a finished baseline"):
        Run(_config(tiny_npz, tmp_path / "x", **config), progress=False,
            baseline=tmp_path / "half" / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        Run(_config(tiny_npz, tmp_path / "y", **config), progress=False, baseline=tmp_path / "half")
    with pytest.raises(ValueError, match="pass one of them"):
        Run(_config(tiny_npz, tmp_path / "half", **config), progress=False, resume=True,
            baseline=tmp_path / "half")

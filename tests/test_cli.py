"""``attenuation run``'s options: one per RunConfig field, each reaching the config; bad input is a
clear error and exit status 2, never a traceback."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attenuation.cli import build_parser, config_from_args, main
from attenuation.config import PHASES, RunConfig, preset_config

REPO = Path(__file__).resolve().parents[1]

# A value for every RunConfig field that differs from every preset's, as typed on the command line
# (after the field's option; a text starting with "--" is the whole option: a flag that is on by default).
SAMPLES = {
    "preset": ("paper", "paper"), "method": ("iterative", "iterative"), "criterion": ("fpgm", "fpgm"),
    "ratio": ("0.25", 0.25), "scope": ("global", "global"), "ramp": ("linear", "linear"),
    "factor": ("0.5", 0.5), "eps": ("0.05", 0.05), "interval": ("epoch", "epoch"),
    "reversible": (None, True), "unattenuated_scores": (None, True),
    "return_margin": ("0.1", 0.1), "return_after": ("3", 3), "group_reduce": ("max", "max"), "attenuate": ("output", "output"),
    "compact": ("--no-compact", False),
    "model": ("resnet20", "resnet20"), "depth": ("13", 13), "width": ("0.5", 0.5), "round_to": ("4", 4),
    "epochs": (None, {"baseline": 3, "attenuation": 2, "recovery": 1, "finetune": 0}),
    "batch_size": ("96", 96), "lr": ("0.05", 0.05), "lr_warmup_fraction": ("0.2", 0.2),
    "lr_warmup_start": ("0.25", 0.25), "lr_pruning_fraction": ("0.3", 0.3),
    "lr_finetune_fraction": ("0.2", 0.2), "momentum": ("0.8", 0.8), "weight_decay": ("1e-4", 1e-4),
    "label_smoothing": ("0.05", 0.05), "data": ("some/where.npz", "some/where.npz"),
    "train_subset": ("1000", 1000), "test_subset": ("200", 200), "val_split": ("500", 500), "seed": ("7", 7),
    "device": ("cpu", "cpu"), "precision": ("bfloat16", "bfloat16"), "backend": ("reference", "reference"), "latency_batch": ("16", 16),
    "out": ("runs/x", "runs/x"),
}


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def _parse(*argv):
    return build_parser().parse_args(["run", *argv])


def test_every_field_has_a_sample():
    assert set(SAMPLES) == {f.name for f in dataclasses.fields(RunConfig)}  # a new field needs one


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_field_has_an_option_that_reaches_the_config(name):
    text, value = SAMPLES[name]
    if name == "epochs":
        argv = [a for phase, n in value.items() for a in (f"--epochs-{phase}", str(n))]
    else:
        argv = [text] if text is not None and text.startswith("--") else \
            [_option(name)] + ([text] if text is not None else [])
    assert getattr(config_from_args(_parse(*argv)), name) == value
    assert value != getattr(preset_config("quick"), name), f"the sample of {name} proves nothing"


def test_unset_options_keep_the_preset():
    for preset in ("smoke", "quick", "paper"):
        assert config_from_args(_parse("--preset", preset)) == preset_config(preset)
    assert config_from_args(_parse("--preset", "smoke", "--epochs-recovery", "3")).epochs == \
        {**preset_config("smoke").epochs, "recovery": 3}
    assert config_from_args(_parse("--no-reversible")).reversible is False


@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--width", "inf"), ("--momentum", "nan"),
    ("--weight-decay", "inf"), ("--label-smoothing", "nan"), ("--lr-warmup-start", "nan"),
    ("--lr-pruning-fraction", "inf"), ("--ratio", "nan"), ("--factor", "nan"), ("--eps", "inf"),
])
def test_non_finite_numbers_are_refused(tmp_path, capsys, option, value):
    assert main(["run", "--preset", "smoke", f"{option}={value}", "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("attenuation: error: ") and "must be a finite number" in error
    assert option[2:].replace("-", "_") in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--momentum", "0"], "momentum must be in (0, 1)"),
    (["--lr-warmup-fraction", "1"], "lr_warmup_fraction must be in (0, 1)"),
    (["--label-smoothing", "1.5"], "label_smoothing must be in [0, 1]"),
    (["--test-subset", "0"], "test_subset must be >= 1"),
    (["--latency-batch", "0"], "latency_batch must be >= 1"),
    (["--val-split", "-1"], "val_split must be >= 0 (0: no validation split), got -1"),
    (["--train-subset", "100", "--val-split", "100"], "val_split must be smaller than train_subset (100)"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--model", "resnet20", "--depth", "13"], "depth 13 applies to VGGs only"),
    (["--model", "vgg13", "--depth", "11"], "model vgg13 contradicts depth 11"),
])
def test_out_of_range_values_are_refused(tmp_path, capsys, argv, message):
    assert main(["run", "--preset", "smoke", *argv, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_divergence_exits_2_without_a_checkpoint(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--preset", "smoke", "--data", str(tiny_npz), "--batch-size", "32", "--lr", "1e6",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "training diverged in the baseline phase, epoch 1/1" in error and "lower --lr" in error
    assert "no checkpoint was written" in error and not (out / "checkpoint.pt").exists()


def test_resume_without_a_run_checkpoint_is_a_clear_error(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["run", "--preset", "smoke", "--data", str(tiny_npz), "--out", str(out), "--resume"]
    assert main(base) == 2
    assert f"no checkpoint at {out / 'checkpoint.pt'}" in capsys.readouterr().err
    out.mkdir()
    torch.save({"format": "attenuation.run/1", "state": {}}, out / "checkpoint.pt")
    assert main(base) == 2
    error = capsys.readouterr().err
    assert "lacks the checkpoint entries config, removed, model_spec" in error


def test_batch_size_over_the_training_set(tiny_npz, tmp_path, capsys):
    argv = ["run", "--preset", "smoke", "--data", str(tiny_npz), "--out", str(tmp_path / "run")]
    assert main([*argv, "--batch-size", "321"]) == 2
    assert "batch_size 321 is larger than the 320 training images" in capsys.readouterr().err


def test_triton_on_the_cpu_outside_the_interpreter(tiny_npz, tmp_path):
    """Without TRITON_INTERPRET=1 the triton backend cannot take CPU tensors: a clear error at
    setup (or "not available" where triton is not installed), not a traceback mid-training."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = ["run", "--preset", "smoke", "--backend", "triton", "--device", "cpu", "--data", str(tiny_npz),
               "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", f"import sys; from attenuation.cli import main; "
                           f"sys.exit(main({command!r}))"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert ("backend 'triton' cannot run on cpu" in done.stderr
            or "backend 'triton' is not available" in done.stderr), done.stderr
    assert not (tmp_path / "run").exists()


def _write_batches(folder: Path) -> None:
    """A tiny cifar-10-batches-py folder: 5 x 20 training images, 20 test images."""
    import pickle

    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.slow
def test_first_run_on_a_fresh_machine_downloads_the_data(tmp_path, no_defaults, monkeypatch, capsys):
    """`attenuation run` with no data anywhere: torchvision fetches it (faked) into the cache."""
    import torchvision

    def download(root, train, download):  # the test split comes last: write the folder then
        if not train:
            _write_batches(Path(root) / "cifar-10-batches-py")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", download)
    assert main(["run", "--preset", "smoke", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    cache = tmp_path / "home" / ".cache" / "attenuation"
    assert f"downloading CIFAR-10 with torchvision into {cache}" in captured.err
    assert str(cache / "cifar-10-batches-py") in json.loads(captured.out)["data_source"]

"""The CIFAR-10 loop end to end on a tiny synthetic data set: outputs, exact resume, CLI errors."""
import json

import numpy as np
import pytest
import torch

from attenuation.cli import main
from attenuation.config import preset_config
from attenuation.report import SUMMARY_KEYS
from attenuation.run import Run, run
from attenuation.surgery import load_pruned


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "cifar10.npz"
    y_train, y_test = np.arange(320) % 10, np.arange(100) % 10
    # class-dependent colour so that something is learnable
    x_train = (rng.integers(0, 128, (320, 32, 32, 3)) + 12 * y_train[:, None, None, None]).astype(np.uint8)
    x_test = (rng.integers(0, 128, (100, 32, 32, 3)) + 12 * y_test[:, None, None, None]).astype(np.uint8)
    np.savez(path, x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test, y_test=y_test.astype(np.uint8))
    return path


def _config(tiny_npz, out, **overrides):
    return preset_config("smoke", data=str(tiny_npz), out=str(out), train_subset=None, test_subset=None,
                         batch_size=32, **overrides)


def test_smoke_run_writes_every_output(tiny_npz, tmp_path):
    summary = run(_config(tiny_npz, tmp_path / "run"), progress=False)
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "report.md", "summary.json",
                 "curves.png", "filter_fates.png", "fates.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary["data_source"].startswith("npz file") and str(tiny_npz) in summary["data_source"]
    assert summary["removed_filters"] > 0
    assert summary["pruned"]["macs"] < summary["baseline"]["macs"]
    assert summary["pruned"]["params"] < summary["baseline"]["params"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["baseline", "attenuation", "recovery", "finetune"]
    assert rows[1]["pruning_seconds"] > rows[0]["pruning_seconds"] >= 0  # the baseline only calls a no-op
    assert rows[0]["macs"] == summary["baseline"]["macs"] and rows[-1]["macs"] == summary["pruned"]["macs"]
    report = (out / "report.md").read_text()
    assert "| removal |" in report and "npz file" in report
    model = load_pruned(out / "model.pt")
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_resume_is_bitwise_exact(tiny_npz, tmp_path, stop_after):
    """Interrupted after the baseline, inside/after attenuation, and after physical removal."""
    config = dict(epochs={"baseline": 1, "attenuation": 2, "recovery": 1, "finetune": 1}, criterion="random")
    full = run(_config(tiny_npz, tmp_path / "full", **config), progress=False)
    assert run(_config(tiny_npz, tmp_path / "cut", **config), progress=False, stop_after_epochs=stop_after) is None
    resumed = run(_config(tiny_npz, tmp_path / "cut", **config), progress=False, resume=True)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("baseline", "returns", "removed_filters"):
        assert full[key] == resumed[key]
    assert full["pruned"]["accuracy"] == resumed["pruned"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]


def test_resume_refuses_another_configuration(tiny_npz, tmp_path):
    run(_config(tiny_npz, tmp_path / "run"), progress=False, stop_after_epochs=1)
    with pytest.raises(ValueError, match="another configuration: ratio"):
        Run(_config(tiny_npz, tmp_path / "run", ratio=0.2), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        Run(_config(tiny_npz, tmp_path / "run"), progress=False)


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

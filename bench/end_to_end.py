"""End-to-end runs of ``attenuation run``: the command for each measured run, the data it reads,
and its figures (wall time of the command, training images per second) from the run folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# name -> (preset, extra options); paper_epoch: one baseline and one attenuation epoch of the
# paper preset (full VGG-16), then removal, with neither recovery nor fine-tuning; smoke_triton:
# the smoke preset on the triton backend (GPU only: its kernels then train a model end to end).
RUNS = {
    "smoke": ("smoke", []),
    "smoke_triton": ("smoke", ["--backend", "triton"]),
    "paper_epoch": ("paper", ["--epochs-baseline", "1", "--epochs-attenuation", "1",
                              "--epochs-recovery", "0", "--epochs-finetune", "0"]),
    "quick": ("quick", []),
}
CIFAR_SHAPES = {"x_train": (50000, 32, 32, 3), "x_test": (10000, 32, 32, 3)}


def command(run: str, device: str, data: Path, out_dir: Path) -> list[str]:
    preset, extra = RUNS[run]
    return [sys.executable, "-m", "attenuation.cli", "run", "--preset", preset, *extra,
            "--device", device, "--data", str(data), "--out", str(out_dir), "--no-progress"]


def find_data(requested: str | None, workdir: Path) -> tuple[Path, bool]:
    """(path, synthetic): CIFAR-10 where ``attenuation`` finds it, else a synthetic stand-in of
    the same shape (random pixels and labels), written once under ``workdir``.

    The end-to-end figures are speeds, which do not depend on the pixels; accuracies on the
    stand-in mean nothing, and the report says which data each run read. (A lent GPU machine
    cannot fetch CIFAR-10, and the project's copy is too large to travel with the tree.)"""
    from attenuation.data import DataNotFoundError, resolve_cifar10

    try:
        return resolve_cifar10(requested), False
    except DataNotFoundError:
        if requested is not None:
            raise
    path = workdir / "synthetic-cifar10.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        arrays = {}
        for key, shape in CIFAR_SHAPES.items():
            arrays[key] = rng.integers(0, 256, shape, dtype=np.uint8)
            arrays[key.replace("x_", "y_")] = rng.integers(0, 10, shape[0], dtype=np.uint8)
        workdir.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    return path, True


def figures(run_dir: Path, wall_s: float) -> dict:
    """Figures of a run folder, also of a run stopped early (the epochs it completed)."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    # with a validation split an epoch measures the held-out images (val_acc), not the test set
    epochs = [{"phase": r["phase"], "seconds": r["seconds"], "images_per_second": r["images_per_second"],
               **{key: r[key] for key in ("test_acc", "val_acc") if key in r}} for r in rows]
    seconds = sum(e["seconds"] for e in epochs)
    images = sum(e["seconds"] * e["images_per_second"] for e in epochs)
    out = {"wall_s": wall_s, "epochs": epochs, "train_seconds": seconds,
           "train_images_per_second": images / seconds if seconds else None, "completed": False}
    summary = run_dir / "summary.json"
    if summary.exists():
        out["summary"] = json.loads(summary.read_text())
        out["completed"] = True
    return out

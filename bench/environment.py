"""What a report's figures were measured on: the device, the software, the commit, the load."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

from attenuation.config import RunConfig
from attenuation.devices import precision_name, resolve_precision

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "triton", "torchvision", "numpy", "pytest-benchmark", "torch-pruning")


def _run(argv: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def _gpu(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {"name": props.name, "driver": driver.splitlines()[0] if driver else None,
            "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}


def commit(override: Optional[str]) -> dict:
    """The commit measured: ``override`` when given (a copy of the tree without .git), else git's
    HEAD, with whether tracked files differed from it."""
    if override:
        return {"sha": override, "dirty": None, "source": "--commit"}
    sha = _run(["git", "rev-parse", "HEAD"])
    if sha is None:
        return {"sha": "unknown", "dirty": None, "source": "no git repository; pass --commit"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return {"sha": sha, "dirty": bool(status), "source": "git"}


def collect(device: torch.device, commit_override: Optional[str] = None) -> dict:
    if device.type == "cuda":
        hardware = {"type": "cuda", **_gpu(device)}
    else:
        hardware = {"type": "cpu", "name": _cpu_name()}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": hardware,
        "host": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_average": os.getloadavg()},
        "software": {"python": platform.python_version(), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                     **{name: _version(name) for name in PACKAGES}},
        "commit": commit(commit_override),
        # what the measured training steps and latencies compute in: a run's default precision
        "precision": precision_name(resolve_precision(RunConfig.precision, device)),
    }


def device_slug(environment: dict) -> str:
    """A file-name-safe name of the device, with the thread count on a CPU."""
    device = environment["device"]
    name = device["name"]
    if device["type"] == "cpu":
        name = f"cpu {name} {environment['host']['torch_threads']}t"
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")

"""The kernel benchmarks: bench/test_bench_ops.py run by pytest-benchmark in a process of its own,
and its JSON folded into the report generically (each benchmark's test, params, median and
extra_info), whatever ops, backends and shapes the file holds.

Within a group (one test function, the same params but the variant), the variant whose name says
it is the eager PyTorch code a user would write (``eager...``, ``dense...``, ``torch...``,
``cudnn...``, ``plain...``) is the baseline of the others. A benchmark that records its useful work
in extra_info (``flop``: useful floating-point operations of one call, ``bytes``: the bytes a
perfect kernel moves) gets its achieved rate and the fraction of the device's peak measured in the
same run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

BENCH_FILE = "bench/test_bench_ops.py"
VARIANT_KEYS = ("impl", "backend", "variant")
BASELINE_PREFIXES = ("eager", "dense", "torch", "cudnn", "plain")


def command(json_path: Path, device: str, quick: bool) -> list[str]:
    """On a GPU only the CUDA benchmarks run (the CPU ones are the CPU run's), each for a shorter
    time: its calls are short, and the GPU's time is lent."""
    if quick:
        rounds = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.000001", "--benchmark-warmup=off"]
    else:
        max_time = "0.1" if device == "cuda" else "0.5"
        rounds = ["--benchmark-min-rounds=5", f"--benchmark-max-time={max_time}", "--benchmark-warmup=on"]
    select = ["-k", "cuda"] if device == "cuda" else []
    return [sys.executable, "-m", "pytest", BENCH_FILE, "-q", "-p", "no:cacheprovider", *select,
            "--benchmark-only", f"--benchmark-json={json_path}", *rounds]


def _variant_key(params: dict) -> Optional[str]:
    return next((key for key in VARIANT_KEYS if key in params), None)


def _peak_flops(peak: dict, device: str, dtype: str) -> Optional[float]:
    """The matmul peak (TFLOP/s) to hold a benchmark of ``dtype`` against: float32 work on CUDA
    against the TF32 peak (cuDNN convolutions use TF32 by default), half types against bf16."""
    rates = {name: figures["tflop_per_s"] for name, figures in peak["matmul"].items()}
    if dtype in ("bfloat16", "float16"):
        return rates.get("bfloat16")
    return rates.get("tf32") if device.startswith("cuda") and "tf32" in rates else rates.get("float32")


def _rates(extra: dict, median_ms: float, device: str, peak: Optional[dict]) -> dict:
    out = {}
    on_peak_device = peak is not None and device.split(":")[0] == peak["device"].split(":")[0]
    if "flop" in extra:
        out["tflop_per_s"] = extra["flop"] / median_ms / 1e9
        dtype = str(extra.get("dtype", "float32"))
        top = _peak_flops(peak["result"], device, dtype) if on_peak_device else None
        if top:
            out["fraction_of_peak_flops"] = out["tflop_per_s"] / top
    if "bytes" in extra:
        out["gb_per_s"] = extra["bytes"] / median_ms / 1e6
        if on_peak_device:
            out["fraction_of_peak_bandwidth"] = out["gb_per_s"] / peak["result"]["copy"]["gb_per_s"]
    return out


def fold(raw: dict, peak: Optional[dict]) -> dict:
    """The report's view of a pytest-benchmark JSON; ``peak`` is the peak section's record."""
    rows = []
    for bench in raw.get("benchmarks", []):
        params = dict(bench.get("params") or {})
        key = _variant_key(params)
        variant = params.pop(key) if key else bench["name"]
        extra = bench.get("extra_info") or {}
        median_ms = bench["stats"]["median"] * 1e3
        device = str(params.get("device", extra.get("device", "")))
        rows.append({
            "test": bench["name"].split("[")[0], "name": bench["name"], "variant": str(variant),
            "group": params, "extra_info": extra, "median_ms": median_ms,
            "iqr_ms": bench["stats"]["iqr"] * 1e3, "rounds": bench["stats"]["rounds"],
            **_rates(extra, median_ms, device, peak)})
    _add_baselines(rows)
    return {"benchmarks": rows, "pytest_benchmark": raw.get("version"),
            "cpu": raw.get("machine_info", {}).get("cpu", {}).get("brand_raw")}


def _add_baselines(rows: list[dict]) -> None:
    """Give each row its group's eager baseline and the time ratio to it (< 1: faster)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["test"], json.dumps(row["group"], sort_keys=True)), []).append(row)
    for members in groups.values():
        baseline = next((r for r in members if r["variant"].startswith(BASELINE_PREFIXES)), None)
        for row in members:
            if baseline is not None and row is not baseline:
                row["baseline"] = baseline["variant"]
                row["vs_baseline"] = row["median_ms"] / baseline["median_ms"]

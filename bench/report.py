"""A suite report: the JSON file and its markdown rendering (the run's summary.md, and the
sections of bench/RESULTS.md)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

FAILURE_LINES = 25  # lines of a failed step's output quoted in the summary


def write(record: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "summary.md").write_text(render(record) + "\n")


# ------------------------------------------------------------------------------ formatting

def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _signed_pct(value: float) -> str:
    return f"{value * 100:+.1f}%"


def _count(value: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return str(value)


def _numeric(text: str) -> bool:
    """A figure, perhaps with a unit and a note in parentheses (or an empty cell)."""
    figure = r"[-+]?[\d.,]+ ?(%|x|K|M|G|GB/s|TFLOP/s)?( \(.*\))?"
    return not text.strip() or text.strip() == "-" or bool(re.fullmatch(figure, text.strip()))


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table; columns of figures are right-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    align = ["---:" if rows and all(_numeric(row[i]) for row in rows) else "---"
             for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |",
            *(f"| {' | '.join(row)} |" for row in rows)]


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


# ------------------------------------------------------------------------------ header

def device_name(environment: dict) -> str:
    """The GPU's name, or the CPU's with the threads torch used."""
    device = environment["device"]
    if device["type"] == "cuda":
        return device["name"]
    return f"{device['name']}, {environment['host']['torch_threads']} threads"


def device_label(environment: dict) -> str:
    """The device's name, with the driver of a GPU."""
    driver = environment["device"].get("driver")
    return device_name(environment) + (f" (driver {driver})" if driver else "")


def title(record: dict) -> str:
    env = record["environment"]
    commit = env["commit"]
    dirty = " + uncommitted changes" if commit.get("dirty") else ""
    return f"{device_label(env)}, {env['date'][:10]}, commit {commit['sha'][:10]}{dirty}"


def _about(record: dict) -> list[str]:
    env, sw = record["environment"], record["environment"]["software"]
    backends = next((r["backends"]["on_device"] for r in record["results"].values()
                     if "backends" in r), None)
    host = env["host"]
    load = f"{host['load_average'][0]:.2f}"
    if "load_average_after" in host:
        load += f" before, {host['load_average_after'][0]:.2f} after"
    rows = [
        ["device", device_label(env)], ["host", f"{host['cpu']}, {host['cores']} cores"],
        ["date (UTC)", env["date"]], ["commit", f"{env['commit']['sha']} ({env['commit']['source']})"],
        ["torch / triton / CUDA / cuDNN", f"{sw['torch']} / {sw['triton']} / {sw['cuda']} / {sw['cudnn']}"],
        ["Torch-Pruning", sw.get("torch-pruning") or "not installed"],
        ["ops backends on the device", ", ".join(backends) if backends else "?"],
        # reports from before the precision option computed in float32 on the CPU
        ["precision (autocast)", env.get("precision", "float32")],
        ["load average (1 min)", load],
        ["command", f"`{record['command']}`" + (" (quick: sizes for checking the suite, not figures)"
                                                  if record["quick"] else "")],
        ["wall time", f"{record.get('wall_s', '?')} s of a {record['budget_s']:.0f} s budget"],
    ]
    return markdown_table(["", "measured on"], rows)


def _steps(record: dict) -> list[str]:
    rows = []
    for step in record["steps"]:
        note = step.get("reason") or step.get("parse_error") or ""
        if step["status"] == "failed" and not note:
            note = f"exit {step.get('returncode')}, see {step.get('log', 'the log')}"
        rows.append([step["name"], step["status"], step.get("seconds", ""), note])
    lines = markdown_table(["step", "status", "seconds", "note"], rows)
    if record.get("error"):
        lines += ["", f"The suite stopped: {record['error']}"]
    for step in record["steps"]:
        if step.get("error"):
            tail = step["error"].strip().splitlines()[-FAILURE_LINES:]
            lines += ["", f"`{step['name']}` ({step['status']}), the end of its output:", "",
                      "```", *tail, "```"]
    return lines


# ------------------------------------------------------------------------------ sections

def headlines(results: dict) -> list[str]:
    """The figures a README quotes, one sentence each."""
    lines = []
    overhead = _result(results, "overhead")
    if overhead:
        u = overhead["unpruned"]
        lines.append(f"Training step of {overhead['model']} (batch {overhead['batch']}) with nothing "
                     f"pruned: {_signed_pct(u['overhead'])} against plain nn.Conv2d "
                     f"({_ms(u['ours_ms'])} ms against {_ms(u['plain_ms'])} ms; target at most +3%).")
        for row in overhead["pruned"]:
            if "error" in row:
                continue
            lines.append(f"{row['ratio']:.0%} of filters removed, {_training_path(row)}: "
                         f"{_signed_pct(row['over_ideal'])} against the physically removed network "
                         f"({_ms(row['ours_ms'])} ms against {_ms(row['ideal_ms'])} ms; "
                         f"target at most +15%).")
        ideals = overhead.get("ideal_against_bound", [])
        if ideals:
            parts = [f"{r['of_unpruned']:.2f}x at {r['ratio']:.0%} removed ({r['macs_fraction']:.2f} of the "
                     f"MACs; bound {r['bound']:.2f}x, {'met' if r['met'] else 'not met'})" for r in ideals]
            lines.append("The physically removed network's training step against the unpruned one's: "
                         + ", ".join(parts) + ".")
    removed = _result(results, "removed_latency")
    if removed:
        big = max(removed["unpruned"]["latency_ms"], key=int)
        for row in removed["rows"]:
            if row["round_to"] == 1:
                lines.append(f"Removed network, {row['ratio']:.0%} of filters: a speedup of "
                             f"{row['speedup'][big]:.2f}x at batch {big} for "
                             f"{1 / row['macs_ratio']:.2f}x fewer MACs.")
    peers = _result(results, "peers")
    if peers:
        for row in peers["ratios"]:
            tools = row["tools"]
            parts = [f"{tool} {_ms(t['train_step_ms'])} ms" for tool, t in tools.items()]
            lines.append(f"Training step while {row['ratio']:.0%} of filters are pruned: "
                         + ", ".join(parts) + ".")
    for run in ("e2e_quick", "e2e_paper_epoch", "e2e_smoke", "e2e_smoke_triton"):
        e2e = results.get(run)
        if e2e and e2e.get("train_images_per_second"):
            lines.append(f"`{run[4:]}` end to end: {e2e['wall_s']:.0f} s wall, "
                         f"{e2e['train_images_per_second']:.0f} training images/s"
                         + (" (synthetic data)" if e2e.get("synthetic_data") else "") + ".")
    return [f"- {line}" for line in lines]


def _result(results: dict, name: str) -> Optional[dict]:
    """The figures of a measured section (None when it did not run)."""
    section = results.get(name)
    return section["result"] if section else None


def _peak(results: dict) -> list[str]:
    peak = _result(results, "peak")
    if not peak:
        return []
    copy = peak["copy"]
    rows = [["copy bandwidth (read + write)", f"{copy['gb_per_s']:.1f} GB/s", f"{copy['bytes'] >> 20} MiB"]]
    for name, mm in peak["matmul"].items():
        rows.append([f"matmul {name}", f"{mm['tflop_per_s']:.2f} TFLOP/s", f"n = {mm['n']}"])
    return markdown_table(["peak", "measured", "size"], rows)


def _kernels(results: dict) -> list[str]:
    k = results.get("kernels")
    if not k or not k["benchmarks"]:
        return []
    by_test: dict[str, list] = {}
    for bench in k["benchmarks"]:
        by_test.setdefault(bench["test"], []).append(bench)
    lines = ["pytest-benchmark medians in ms; in parentheses the time against the eager PyTorch "
             "variant of the same row (below 1: faster). Achieved rates (useful work over the "
             "median time) against the peaks above. " + _pytest_line(k["pytest"])]
    for test, rows in by_test.items():
        lines += ["", f"`{test}`", "", *_pivot(rows, _time_cell)]
        if any("tflop_per_s" in r or "gb_per_s" in r for r in rows):
            lines += ["", *_pivot(rows, _rate_cell)]
    return lines


def _pivot(rows: list[dict], cell: Callable[[dict], str]) -> list[str]:
    """One line per group of params, one column per variant; the params that are the same in
    every row are left out."""
    keys = [key for key in rows[0]["group"] if len({str(r["group"].get(key)) for r in rows}) > 1]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    table: dict[str, dict] = {}
    for r in rows:
        label = json.dumps([r["group"].get(key) for key in keys])
        table.setdefault(label, {"params": [r["group"].get(key) for key in keys]})[r["variant"]] = cell(r)
    return markdown_table([*keys, *variants],
                  [[*line["params"], *(line.get(v, "") for v in variants)] for line in table.values()])


def _time_cell(bench: dict) -> str:
    ratio = f" ({bench['vs_baseline']:.2f})" if "vs_baseline" in bench else ""
    return _ms(bench["median_ms"]) + ratio


def _rate_cell(bench: dict) -> str:
    parts = []
    for rate, unit, fraction in (("tflop_per_s", "TFLOP/s", "fraction_of_peak_flops"),
                                 ("gb_per_s", "GB/s", "fraction_of_peak_bandwidth")):
        if rate in bench:
            share = f" ({bench[fraction]:.0%})" if fraction in bench else ""
            parts.append(f"{bench[rate]:.3g} {unit}{share}")
    return ", ".join(parts)


def _pytest_line(counts: dict) -> str:
    shown = [f"{n} {word}" for word, n in counts.items() if n]
    return f"pytest: {', '.join(shown)}." if shown else ""


def _overhead(results: dict) -> list[str]:
    o = _result(results, "overhead")
    if not o:
        return []
    u = o["unpruned"]
    rows = [["nothing pruned", "-", _ms(u["ours_ms"]), f"plain nn.Conv2d {_ms(u['plain_ms'])}",
             _signed_pct(u["overhead"]), "+3%", _met(u["met"])]]
    for r in o["pruned"]:
        outcome = ([_ms(r["ours_ms"]), f"physically removed {_ms(r['ideal_ms'])}",
                    _signed_pct(r["over_ideal"]), "+15%", _met(r["met"])] if "error" not in r
                   else [f"failed: {r['error'][:120]}", f"physically removed {_ms(r['ideal_ms'])}",
                         "", "+15%", ""])
        rows.append([f"{r['ratio']:.0%} removed", _training_path(r), *outcome])
    compactions = [f"{_ms(r['compaction_ms'])} ms at {r['ratio']:.0%}" for r in o["pruned"] if "compaction_ms" in r]
    first_steps = [f"{_ms(r['first_step_ms'])} ms at {r['ratio']:.0%} (steady {_ms(r['ours_ms'])})"
                   for r in o["pruned"] if "first_step_ms" in r and "ours_ms" in r]
    lines = [f"{o['model']}, batch {o['batch']}, one SGD step (forward, backward, update, pruner "
             f"step), median of interleaved repetitions; masked: the removed filters still in the "
             f"network, compacted: cut out by Pruner.compact"
             + (f" (one compaction: {', '.join(compactions)} removed)" if compactions else "")
             + (f"; the compacted network's first step, on shapes not run before: "
                f"{', '.join(first_steps)}." if first_steps else "."),
             "", *markdown_table(["network", "trained as", "ours (ms)", "against (ms)", "difference",
                                  "target", "met"], rows)]
    return lines + _ideal_against_bound(o)


def _ideal_against_bound(o: dict) -> list[str]:
    """Issue 13's per-epoch bound (live MAC fraction + 0.15 of the unpruned time) applied to the
    physically removed network's step: where even it misses, no training of the pruned network
    can meet the bound on this device."""
    ideals = o.get("ideal_against_bound")  # reports before it existed lack it
    if not ideals:
        return []
    rows = [[f"{r['ratio']:.0%} removed", _ms(r["ideal_ms"]), f"{r['of_unpruned']:.2f}x",
             f"{r['macs_fraction']:.2f}", f"{r['bound']:.2f}x", _met(r["met"])] for r in ideals]
    return ["", "The physically removed network's step against the unpruned one's (plain "
            "nn.Conv2d), held to the per-epoch bound of issue 13: its MAC fraction + 0.15.", "",
            *markdown_table(["network", "step (ms)", "of unpruned", "MAC fraction", "bound", "met"],
                            rows)]


def _training_path(row: dict) -> str:
    """The network a pruned row timed: masked (results before compaction existed are all masked)
    or compacted, and the ops backend."""
    return f"{row['backend']} backend, {row.get('path', 'masked')}"


def _peers(results: dict) -> list[str]:
    p = _result(results, "peers")
    if not p:
        return []
    u = p["unpruned"]
    lines = [f"{p['model']}; training batch {p['batch']}; latency at batch {p['latency_batch']}. "
             f"Unpruned: {_count(u['params'])} parameters, {_count(u['macs'])} MACs, "
             f"{_ms(u['latency_ms'])} ms. The same filters in every tool (the project's one-shot "
             f"L1 choice). Setup: Pruner / dependency graph; prune: choose and mask; remove: "
             f"make it permanent (physically smaller where the tool can)."]
    for row in p["ratios"]:
        table = []
        for tool, t in row["tools"].items():
            table.append([tool, _ms(t["setup_ms"]), _ms(t["prune_ms"]), _ms(t["remove_ms"]),
                          _ms(t["train_step_ms"]), _count(t["params"]), _count(t["macs"]),
                          _ms(t["latency_ms"])])
        notes = [f"ln_structured chose the same filters: {_yes(row['ln_structured_same_mask'])}"]
        agree = row.get("torch_pruning_agrees")
        if agree:
            notes.append(f"Torch-Pruning's network against ours: same parameters "
                         f"{_yes(agree['params'])}, same MACs {_yes(agree['macs'])}, "
                         f"largest output difference {agree['max_abs_output_diff']:.2g}")
        elif p.get("torch_pruning") is None:
            notes.append("Torch-Pruning not installed (`pip install torch-pruning`)")
        lines += ["", f"{row['ratio']:.0%} of filters removed ({'; '.join(notes)}):", "",
                  *markdown_table(["tool", "setup (ms)", "prune (ms)", "remove (ms)", "train step (ms)",
                           "params", "MACs", "latency (ms)"], table)]
    return lines


def _removed(results: dict) -> list[str]:
    r = _result(results, "removed_latency")
    if not r:
        return []
    batches = list(r["unpruned"]["latency_ms"])
    header = ["removed", "round to", "params", "MACs", "MACs ratio"]
    for b in batches:
        header += [f"batch {b} (ms)", f"speedup {b}"]
    u = r["unpruned"]
    rows = [["none", "-", _count(u["params"]), _count(u["macs"]), "1.00",
             *[c for b in batches for c in (_ms(u["latency_ms"][b]), "1.00")]]]
    for row in r["rows"]:
        rows.append([f"{row['ratio']:.0%}", row["round_to"], _count(row["params"]), _count(row["macs"]),
                     f"{row['macs_ratio']:.2f}",
                     *[c for b in batches for c in (_ms(row["latency_ms"][b]), f"{row['speedup'][b]:.2f}")]])
    return [f"{r['model']}, eval-mode forward pass, median of interleaved repetitions; a speedup "
            f"equal to 1 / MACs ratio would be ideal.", "", *markdown_table(header, rows)]


def _end_to_end(results: dict) -> list[str]:
    rows = []
    for name in ("e2e_smoke", "e2e_smoke_triton", "e2e_paper_epoch", "e2e_quick"):
        e = results.get(name)
        if not e:
            continue
        summary = e.get("summary", {})
        accuracy = summary.get("pruned", {}).get("accuracy")
        speed = summary.get("speed")  # runs before it was measured lack it
        rows.append([name[4:], "synthetic" if e.get("synthetic_data") else "CIFAR-10",
                     f"{e['wall_s']:.1f}", len(e["epochs"]),
                     f"{e['train_images_per_second']:.0f}" if e.get("train_images_per_second") else "",
                     f"{speed['pruned_train_step_ms'] / speed['baseline_train_step_ms']:.2f}x" if speed else "",
                     "yes" if e["completed"] else "no",
                     "" if accuracy is None or e.get("synthetic_data") else f"{accuracy:.2f}"])
    if not rows:
        return []
    return ["`attenuation run` as a subprocess: wall time of the command (data loading included); "
            "images/s over its training epochs; the pruned network's training step against the "
            "unpruned one's, timed in turns at the end of the run.", "",
            *markdown_table(["run", "data", "wall (s)", "epochs", "train images/s",
                             "pruned step", "completed", "final accuracy (%)"], rows)]


def _checks(results: dict) -> list[str]:
    lines = []
    build = results.get("build")
    if build:
        native = build["native"]
        lines.append(f"- build: native extension importable: {native['importable']}"
                     + (f" (CPU kernels {native['cpu']}, CUDA kernels {native['cuda']})"
                        if native["importable"] else f" ({native.get('error', '')})"))
    tests = results.get("tests")
    if tests:
        lines.append(f"- tests: {_pytest_line(tests)}")
    return lines


SECTIONS: list[tuple[str, Callable[[dict], list[str]]]] = [
    ("Headline figures", headlines), ("Build and tests", _checks), ("Device peaks", _peak),
    ("Kernels", _kernels), ("Training-step overhead", _overhead),
    ("The peers: the same pruning job with torch.nn.utils.prune and Torch-Pruning", _peers),
    ("The removed network", _removed), ("End to end", _end_to_end),
]


def render(record: dict, level: int = 1) -> str:
    """The report as markdown, its title at heading ``level``."""
    h = "#" * level
    lines = [f"{h} Benchmark suite: {title(record)}", "", *_about(record), "",
             f"{h}# Steps", "", *_steps(record)]
    for heading, section in SECTIONS:
        body = section(record["results"])
        if body:
            lines += ["", f"{h}# {heading}", "", *body]
    warnings = sorted({w for r in record["results"].values() for w in r.get("warnings", [])})
    if warnings:
        lines += ["", f"{h}# Warnings raised while measuring", "", *(f"- {w}" for w in warnings)]
    return "\n".join(lines)

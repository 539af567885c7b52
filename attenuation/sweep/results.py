"""A sweep's results.jsonl (one record per finished trial) and loading trials from folders.

A sweep folder holds results.jsonl; a plain run folder (``attenuation run``) holds config.json
and summary.json and is read as one "ok" trial with no shared baseline.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

__all__ = ["RESULTS_FILE", "STATUSES", "TrialRecord", "append_result", "read_results",
           "load_trials"]

RESULTS_FILE = "results.jsonl"
STATUSES = ("ok", "failed")
# The summary.json numbers the aggregation reads; the optional ones may be absent (summaries written
# before them) or null (latency not measured, no validation split).
_SECTION_KEYS = ("accuracy", "params", "macs")
# In each section: read where present (null: latency not measured, no validation split).
_OPTIONAL_SECTION_KEYS = ("latency_ms", "val_accuracy")
# At the top: read where present: results written before the fate statistics lack them; churn and
# mean_steps_weak_before_removal are null where undefined.
_OPTIONAL_KEYS = ("removed_filters", "kept_returns", "churn", "removed_during_phase",
                 "mean_steps_weak_before_removal")
# In "speed" (an object, where present): the training steps the tables compare.
_SPEED_KEYS = ("baseline_train_step_ms", "pruned_train_step_ms")


def _check_number(where: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")


def _check_summary(summary) -> None:
    """The summary.json keys the tables read: present and numeric, or for the optional ones
    absent or null (extra keys are fine)."""
    if not isinstance(summary, Mapping):
        raise ValueError(f"summary must be an object, got {type(summary).__name__}")
    for section in ("baseline", "pruned"):
        values = summary.get(section)
        if not isinstance(values, Mapping):
            raise ValueError(f"summary.{section} must be an object, got {values!r}")
        for key in _SECTION_KEYS:
            if key not in values:
                raise ValueError(f"summary.{section} has no {key!r} (has {sorted(values)})")
            _check_number(f"summary.{section}.{key}", values[key])
        for key in _OPTIONAL_SECTION_KEYS:
            _check_number(f"summary.{section}.{key}", values.get(key), True)
    for key in ("returns", "wall_seconds"):
        if key not in summary:
            raise ValueError(f"summary has no {key!r}")
        _check_number(f"summary.{key}", summary[key])
    for key in _OPTIONAL_KEYS:
        _check_number(f"summary.{key}", summary.get(key), optional=True)
    speed = summary.get("speed")  # absent from summaries written before runs timed it
    if speed is not None:
        if not isinstance(speed, Mapping):
            raise ValueError(f"summary.speed must be an object, got {speed!r}")
        for key in _SPEED_KEYS:
            _check_number(f"summary.speed.{key}", speed.get(key))
            if not speed[key] > 0:
                raise ValueError(f"summary.speed.{key} must be positive, got {speed[key]!r}")


def _check_config(config) -> None:
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be an object, got {type(config).__name__}")
    for key in ("method", "criterion"):
        if not isinstance(config.get(key), str):
            raise ValueError(f"config.{key} must be a string, got {config.get(key)!r}")
    _check_number("config.ratio", config.get("ratio"))


@dataclass(frozen=True)
class TrialRecord:
    """One line of results.jsonl: a finished trial, "ok" with its summary.json or "failed"
    with its error message."""

    trial: str
    config: dict
    baseline_id: Optional[str]
    status: str
    error: Optional[str]
    summary: Optional[dict]

    def __post_init__(self):
        if not isinstance(self.trial, str) or not self.trial:
            raise ValueError(f"trial must be a non-empty string, got {self.trial!r}")
        _check_config(self.config)
        if self.baseline_id is not None and not isinstance(self.baseline_id, str):
            raise ValueError(f"baseline_id must be a string or null, got {self.baseline_id!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "ok":
            if self.error is not None:
                raise ValueError(f"an ok trial has error null, got {self.error!r}")
            _check_summary(self.summary)
        else:
            if not isinstance(self.error, str) or not self.error:
                raise ValueError(f"a failed trial needs its error message, got {self.error!r}")
            if self.summary is not None:
                raise ValueError("a failed trial has summary null")

    @classmethod
    def from_dict(cls, data) -> "TrialRecord":
        if not isinstance(data, Mapping):
            raise ValueError(f"a record must be a JSON object, got {type(data).__name__}")
        fields = ("trial", "config", "baseline_id", "status", "error", "summary")
        if set(data) != set(fields):
            missing, extra = sorted(set(fields) - set(data)), sorted(set(data) - set(fields))
            raise ValueError(f"record keys must be {list(fields)}: "
                             f"missing {missing}, unexpected {extra}")
        return cls(**{key: data[key] for key in fields})

    @classmethod
    def from_json(cls, text: str) -> "TrialRecord":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON ({error})") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        """One line of JSON (no NaN or Infinity, which strict readers reject)."""
        return json.dumps(asdict(self), allow_nan=False)


def _parses(raw: bytes) -> bool:
    try:
        TrialRecord.from_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _end_partial_line(f, path: Path) -> None:
    """Before appending: a last line without its newline is completed if it is a whole record,
    else (a writer killed mid-line) cut off with a warning, so the new line starts clean."""
    f.seek(0)
    data = f.read()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    if _parses(data[start:]):
        f.write(b"\n")
        return
    warnings.warn(f"{path}: dropping a partial last line (a writer was killed mid-line?)")
    f.truncate(start)


def append_result(path, record: TrialRecord) -> Path:
    """Append ``record`` as one line of ``path`` and flush it to disk before returning."""
    if not isinstance(record, TrialRecord):
        raise TypeError(f"record must be a TrialRecord, got {type(record).__name__}")
    path = Path(path)
    line = (record.to_json() + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        _end_partial_line(f, path)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return path


def _parse_line(path: Path, number: int, raw: bytes) -> TrialRecord:
    try:
        return TrialRecord.from_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}, line {number}: corrupt record: {error}") from None


def read_results(path) -> list[TrialRecord]:
    """Every record of a results.jsonl, in file order (blank lines skipped).

    A last line that lacks its newline and does not parse is what a killed writer leaves:
    it is ignored with a warning. Any other bad line is a ValueError naming file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records = [_parse_line(path, i, raw) for i, raw in enumerate(lines, 1) if raw.strip()]
    if tail.strip():
        if _parses(tail):
            records.append(TrialRecord.from_json(tail.decode("utf-8")))
        else:
            warnings.warn(f"{path}, line {len(lines) + 1}: ignoring a partial last line "
                          "(a writer was killed mid-line?)")
    return records


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def _run_folder_record(folder: Path) -> TrialRecord:
    """A plain ``attenuation run`` folder as an ok trial with no shared baseline."""
    config, summary = _read_json(folder / "config.json"), _read_json(folder / "summary.json")
    try:
        return TrialRecord(trial=folder.name, config=config, baseline_id=None, status="ok",
                           error=None, summary=summary)
    except ValueError as error:
        raise ValueError(f"{folder}: not a valid run folder: {error}") from None


def _latest_per_trial(records: list[TrialRecord]) -> list[TrialRecord]:
    """A trial retried on resume appears again later in results.jsonl: its last record counts."""
    latest = {record.trial: record for record in records}
    return list(latest.values())


def _folder_trials(folder: Path) -> list[TrialRecord]:
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if (folder / RESULTS_FILE).is_file():
        return _latest_per_trial(read_results(folder / RESULTS_FILE))
    if (folder / "config.json").is_file() and (folder / "summary.json").is_file():
        return [_run_folder_record(folder)]
    if (folder / "config.json").is_file():
        raise ValueError(f"{folder} has config.json but no summary.json: the run has not finished")
    raise ValueError(f"{folder} is neither a sweep folder ({RESULTS_FILE}) nor a run folder "
                     "(config.json + summary.json)")


def load_trials(dirs: Iterable) -> list[TrialRecord]:
    """The trials of sweep folders and plain run folders, folder by folder, in the given order."""
    folders = [Path(d) for d in dirs]
    if not folders:
        raise ValueError("no folders given")
    resolved = [folder.resolve() for folder in folders]
    for i, folder in enumerate(resolved):
        if folder in resolved[:i]:
            raise ValueError(f"{folders[i]} is given twice: its trials would count twice")
    records = [record for folder in folders for record in _folder_trials(folder)]
    if not records:
        raise ValueError(f"no finished trials in {', '.join(str(f) for f in folders)}")
    return records

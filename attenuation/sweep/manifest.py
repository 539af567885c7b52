"""sweep.json: the trials a sweep folder holds, so that a rerun resumes the same grid and a
different grid is refused unless it extends the folder's (``--extend``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..config import ABSENT_MEANS, RunConfig, baseline_id, complete_config
from ..files import atomic_write_text
from .grid import TRIALS_DIR, Trial

MANIFEST_FILE = "sweep.json"
MANIFEST_FORMAT = "attenuation.sweep/1"


def _read(path: Path) -> dict[str, dict]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable sweep manifest: {error}") from None
    if not isinstance(saved, dict) or saved.get("format") != MANIFEST_FORMAT or not isinstance(
            saved.get("trials"), dict):
        raise ValueError(f"{path} is not a sweep manifest of this version (format {MANIFEST_FORMAT!r})")
    return saved["trials"]


def reconcile(out: Path, trials: Sequence[Trial], extend: bool) -> list[Trial]:
    """Record ``trials`` in ``out``'s manifest and return every trial of the folder.

    A new folder takes the grid. A folder holding the same grid is resumed. A folder holding
    another grid is refused unless ``extend``, which adds the new trials to the old ones. Trials
    are matched by configuration, a field added since the folder was written taking the value that
    reproduces the trial (config.complete_config):
    a recorded trial keeps its name (and folder) even if a newer version would name it otherwise."""
    path = out / MANIFEST_FILE
    mine = {t.name: t.config.to_dict() for t in trials}
    if path.exists():
        recorded = _read(path)
        names = {_identity(config): name for name, config in recorded.items()}
        mine = {names.get(_identity(config), name): config for name, config in mine.items()}
        if set(recorded) != set(mine):
            if not extend:
                new, gone = len(set(mine) - set(recorded)), len(set(recorded) - set(mine))
                raise ValueError(
                    f"{out} holds another grid ({len(recorded)} trials; this command adds {new} and "
                    f"leaves out {gone}): pass --extend to add this grid's trials to it, or choose "
                    "another --out" + _older_fields_hint(recorded.values(), mine.values()))
            mine = {**recorded, **mine}
    elif any(out.iterdir()) if out.is_dir() else False:
        raise ValueError(f"{out} is not empty and holds no sweep: choose another --out")
    atomic_write_text(path, json.dumps({"format": MANIFEST_FORMAT, "trials": mine}, indent=1) + "\n")
    return [_trial(out, name, config) for name, config in sorted(mine.items())]


def _older_fields_hint(recorded, grid) -> str:
    """Why a rerun of an older sweep's command may not match it: its trials predate a field whose
    default now computes otherwise (config.ABSENT_MEANS); empty when none does."""
    hints = []
    for name, value in ABSENT_MEANS.items():
        older = sum(name not in config for config in recorded)
        if older and any(config[name] != value for config in grid):
            hints.append(f"{older} recorded trials predate --{name.replace('_', '-')} and ran with "
                         f"{value} (pass --{name.replace('_', '-')} {value} to resume them)")
    return "; " + "; ".join(hints) if hints else ""


def _identity(config: dict) -> str:
    """What makes two trials the same: the whole configuration but its folder, with the defaults
    of fields it lacks."""
    values = complete_config(config)
    values.pop("out")
    return json.dumps(values, sort_keys=True)


def _trial(out: Path, name: str, config: dict) -> Trial:
    """A recorded trial, writing where this folder is now (it may have moved)."""
    config = RunConfig(**{**complete_config(config), "out": str(out / TRIALS_DIR / name)}).validate()
    return Trial(name, config, baseline_id(config))

"""The grid of a sweep: lists of option values, their cross product as validated run
configurations, stable trial names and the baselines the trials share."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import AFTER_BASELINE_FIELDS, PHASES, RunConfig, baseline_id, preset_config

TRIALS_DIR = "trials"
BASELINES_DIR = "baselines"


@dataclass(frozen=True)
class Trial:
    """One run of the grid: its folder name, configuration and shared baseline."""
    name: str
    config: RunConfig
    baseline_id: str


def split_values(option: str, text: str, convert: Callable[[str], object]) -> list:
    """``a,b,c`` as a list of converted values (duplicates dropped); an empty list or an empty
    value is an error naming the option."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise ValueError(f"{option}: empty value in the list {text!r}")
    values = []
    for part in parts:
        try:
            value = convert(part)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{option}: invalid value {part!r} ({error})") from None
        if value not in values:
            values.append(value)
    return values


def trial_name(config: RunConfig) -> str:
    """Readable and stable whatever the grid: the main options and a hash of the rest."""
    values = {k: v for k, v in config.to_dict().items() if k != "out"}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.model_name}-{config.method}-{config.criterion}-r{config.ratio:g}-s{config.seed}-{digest}"


def expand(options: dict[str, list], out: Path) -> list[Trial]:
    """The cross product of ``options`` (field name -> values; ``epochs_<phase>`` for the epochs;
    ``preset`` among them or the default) as validated trials writing under ``out``. A combination
    that does not validate fails the whole grid, before anything runs."""
    names = list(options)
    trials: dict[str, Trial] = {}
    for combination in itertools.product(*(options[name] for name in names)):
        chosen = dict(zip(names, combination))
        preset = chosen.pop("preset", "quick")
        epochs = {phase: chosen.pop(f"epochs_{phase}") for phase in PHASES if f"epochs_{phase}" in chosen}
        try:
            config = preset_config(preset, **chosen, epochs=epochs or None)
        except (TypeError, ValueError) as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in zip(names, combination))
            raise ValueError(f"the grid point {shown} is not a valid run: {error}") from None
        name = trial_name(config)
        config = dataclasses.replace(config, out=str(out / TRIALS_DIR / name))
        trials[name] = Trial(name, config, baseline_id(config))
    return list(trials.values())


def baseline_config(trial: Trial, out: Path) -> RunConfig:
    """The run that trains ``trial``'s shared baseline: the trial's configuration with every field
    that acts after the baseline at its default, writing to the baseline's folder."""
    defaults = RunConfig()
    later = {name: getattr(defaults, name) for name in AFTER_BASELINE_FIELDS if name not in ("preset", "out")}
    epochs = {**defaults.epochs, "baseline": trial.config.epochs["baseline"]}
    return dataclasses.replace(trial.config, **later, epochs=epochs,
                               out=str(out / BASELINES_DIR / trial.baseline_id)).validate()


def baselines(trials: Sequence[Trial], out: Path) -> dict[str, RunConfig]:
    """Per baseline id, the configuration of the run that trains it (the first trial needing it)."""
    found: dict[str, RunConfig] = {}
    for trial in trials:
        found.setdefault(trial.baseline_id, baseline_config(trial, out))
    return found


def baseline_folder(out: Path, identifier: str) -> Path:
    return out / BASELINES_DIR / identifier

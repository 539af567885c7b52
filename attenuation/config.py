"""Run configuration: the presets of ``attenuation run`` and their validation."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

from .devices import check_precision
from .methods import method_config
from .models import available_models, vgg_depth, vgg_name
from .overrides import apply_overrides
from .train import LRSchedule

PHASES = ("baseline", "attenuation", "recovery", "finetune")


@dataclass
class RunConfig:
    preset: str = "quick"
    # the pruning method and its rule (None = the method's preset value)
    method: str = "attenuation"
    # taylor, for every method: chosen on validation accuracy by the study (docs/STUDY.md); with it
    # attenuated filters return and stay (the library's PruningConfig keeps l1, which needs no gradients)
    criterion: str = "taylor"
    ratio: float = 0.35
    scope: str = "layer"
    ramp: Optional[str] = None
    factor: Optional[float] = None
    eps: Optional[float] = None
    interval: Optional[Union[int, str]] = None
    reversible: Optional[bool] = None
    unattenuated_scores: Optional[bool] = None
    return_margin: Optional[float] = None
    return_after: Optional[int] = None
    group_reduce: str = "sum"  # a group channel's score from its member filters' (PruningConfig)
    attenuate: Optional[str] = None  # what a step scales: filter, gamma or output (PruningConfig)
    # the model: a registry name (attenuation.models.available_models()), or None for VGG-`depth`;
    # validate() keeps one spelling per model (see _resolve_model)
    model: Optional[str] = None
    depth: int = 16
    width: float = 0.25
    round_to: int = 1
    # cut the removed filters out of the training network after the attenuation steps that removed
    # enough and at epoch ends (Pruner.compact): the same run up to rounding, cheaper epochs;
    # False keeps the shapes static (for CUDA graphs or torch.compile)
    compact: bool = True
    # the schedule: epochs per phase
    epochs: dict = field(default_factory=lambda: {"baseline": 8, "attenuation": 4, "recovery": 2,
                                                  "finetune": 2})
    batch_size: int = 256
    lr: float = 0.2
    # the learning-rate schedule (train.LRSchedule): the baseline warms up from lr_warmup_start x lr
    # over its first lr_warmup_fraction of steps; the attenuation phase holds lr_pruning_fraction x lr,
    # recovery decays from there; fine-tuning decays from lr_finetune_fraction x lr
    lr_warmup_fraction: float = 0.15
    lr_warmup_start: float = 0.1
    lr_pruning_fraction: float = 0.4
    lr_finetune_fraction: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # data and machine
    data: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    # training images held out for validation (data.hold_out); 0: none, the test set is measured each epoch
    val_split: int = 0
    seed: int = 0
    device: str = "auto"
    # autocast of training and evaluation: auto (bfloat16 where the device computes it natively,
    # else float32), float32 or bfloat16 (devices.resolve_precision)
    precision: str = "auto"
    backend: Optional[str] = None
    latency_batch: int = 256
    out: Optional[str] = None

    def pruning_config(self):
        return method_config(self.method, criterion=self.criterion, ratio=self.ratio,
                             scope=self.scope, ramp=self.ramp, factor=self.factor, eps=self.eps,
                             interval=self.interval, reversible=self.reversible,
                             unattenuated_scores=self.unattenuated_scores,
                             return_margin=self.return_margin, return_after=self.return_after,
                             group_reduce=self.group_reduce, attenuate=self.attenuate)

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(peak=self.lr, warmup_fraction=self.lr_warmup_fraction,
                          warmup_start=self.lr_warmup_start, pruning_fraction=self.lr_pruning_fraction,
                          finetune_fraction=self.lr_finetune_fraction)

    @property
    def model_name(self) -> str:
        """The registry name of the model this run trains."""
        return self.model if self.model is not None else vgg_name(self.depth)

    def validate(self) -> "RunConfig":
        if self.method == "none":  # the control prunes nothing, whatever ratio the preset carries
            self.ratio = 0.0
        self._check_numbers()
        self._resolve_model()
        self.pruning_config()  # method, criterion, ratio, factor, ... checked there
        if set(self.epochs) != set(PHASES):
            raise ValueError(f"epochs must name exactly the phases {PHASES}, got {sorted(self.epochs)}")
        for phase, n in self.epochs.items():
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"epochs for {phase} must be a non-negative integer, got {n!r}")
        check_precision(self.precision)
        if self.epochs["attenuation"] < 1 and self.method != "none":
            raise ValueError("the attenuation phase needs at least one epoch")
        return self

    def _resolve_model(self) -> None:
        """One spelling per model, so that equal models have equal configurations (and share
        baselines): a VGG is ``model=None`` with its ``depth`` (``model="vgg13"`` becomes
        ``depth=13``), any other model has ``depth`` at its default. The default depth counts as
        unset: a model name with any other depth that does not name the same VGG is an error."""
        if self.model_name not in available_models():
            what = f"model {self.model!r}" if self.model is not None else \
                f"depth {self.depth} (model {self.model_name})"
            raise ValueError(f"unknown {what}: available are {', '.join(available_models())}")
        if self.model is None:
            return
        depth = vgg_depth(self.model)
        if depth is None and self.depth != _DEFAULT_DEPTH:
            raise ValueError(f"depth {self.depth} applies to VGGs only: model {self.model} takes none "
                             f"(leave depth at its default {_DEFAULT_DEPTH})")
        if depth is not None:
            if self.depth not in (depth, _DEFAULT_DEPTH):
                raise ValueError(f"model {self.model} contradicts depth {self.depth}: give one of them")
            self.model, self.depth = None, depth

    def _check_numbers(self) -> None:
        """Every number finite and in its range: a NaN or infinite rate would train an all-NaN
        model that still reports an accuracy."""
        for name, hint in typing.get_type_hints(RunConfig).items():
            value = getattr(self, name)
            allowed = typing.get_args(hint) or (hint,)  # Optional[X] and Union[X, Y] list their types
            if not _is_instance(value, allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise TypeError(f"{name} must be {names}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        for name in ("batch_size", "round_to", "latency_batch"):
            _require(self, name, lambda v: v >= 1, ">= 1")
        for name in ("train_subset", "test_subset"):
            _require(self, name, lambda v: v is None or v >= 1, ">= 1 (or unset: all images)")
        _require(self, "val_split", lambda v: v >= 0, ">= 0 (0: no validation split)")
        if self.train_subset is not None:  # against the whole training set: checked when it is loaded
            _require(self, "val_split", lambda v: v < self.train_subset,
                     f"smaller than train_subset ({self.train_subset}): some images must remain to train on")
        for name in ("width", "lr", "lr_pruning_fraction", "lr_finetune_fraction"):
            _require(self, name, lambda v: v > 0, "> 0")
        _require(self, "lr_warmup_fraction", lambda v: 0 < v < 1, "in (0, 1)")
        _require(self, "lr_warmup_start", lambda v: 0 <= v <= 1, "in [0, 1]")
        _require(self, "momentum", lambda v: 0 < v < 1, "in (0, 1) (Nesterov momentum needs one)")
        _require(self, "weight_decay", lambda v: v >= 0, ">= 0")
        _require(self, "label_smoothing", lambda v: 0 <= v <= 1, "in [0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_DEFAULT_DEPTH = RunConfig.depth


def _is_instance(value, types: tuple) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _require(config: RunConfig, name: str, ok, what: str) -> None:
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


PRESETS: dict[str, dict] = {
    # seconds on a CPU: a tiny VGG on a slice of the data; for tests and for trying the CLI
    "smoke": dict(depth=11, width=0.0625, batch_size=64, train_subset=512, test_subset=256,
                  epochs={"baseline": 1, "attenuation": 1, "recovery": 1, "finetune": 1},
                  interval=2, latency_batch=32),
    # the default: VGG-16 at quarter width on full CIFAR-10, about 4 minutes on a 2-core CPU that
    # computes bfloat16 natively (9 in float32)
    "quick": dict(),
    # full VGG-16 and a full schedule, for a GPU
    "paper": dict(width=1.0, round_to=8, batch_size=128, lr=0.1, interval=50,
                  epochs={"baseline": 100, "attenuation": 40, "recovery": 30, "finetune": 20}),
}


def preset_config(preset: str = "quick", **overrides) -> RunConfig:
    """The preset with fields overridden (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: available are {', '.join(PRESETS)}")
    values = apply_overrides(RunConfig, PRESETS[preset], overrides, "run")
    if overrides.get("model") is not None and overrides.get("depth") is None:
        values.pop("depth", None)  # the preset's depth chooses its VGG; a named model replaces it
    if "epochs" in overrides and overrides["epochs"] is not None:
        values["epochs"] = {**RunConfig().epochs, **PRESETS[preset].get("epochs", {}), **overrides["epochs"]}
    return RunConfig(preset=preset, **values).validate()


# Fields that act only from the attenuation phase on (and labels that compute nothing): runs that
# differ in nothing else train the same baseline, so they can share one (``attenuation run
# --baseline``, ``attenuation sweep``). A field added later that only acts after the baseline
# belongs here; tests/test_baseline.py checks that runs differing in these share a baseline.
AFTER_BASELINE_FIELDS = ("preset", "method", "criterion", "ratio", "scope", "ramp", "factor", "eps",
                         "interval", "reversible", "unattenuated_scores", "return_margin",
                         "return_after", "group_reduce", "attenuate", "round_to", "compact",
                         "lr_pruning_fraction", "lr_finetune_fraction", "out")


# Fields added after runs were saved whose default computes something else than those runs did: a
# saved configuration that lacks one is read with the value that reproduces it (runs before
# ``precision`` trained in float32 on the CPU, the only device any saved run used).
ABSENT_MEANS = {"precision": "float32"}


def complete_config(values: dict) -> dict:
    """A configuration saved by any version (config.json, a checkpoint, a sweep's manifest) with
    every field: one it lacks was added later and takes the value that reproduces the saved run,
    its default unless :data:`ABSENT_MEANS` says otherwise."""
    return {**RunConfig().to_dict(), **ABSENT_MEANS, **values}


def baseline_key(config: RunConfig | dict) -> dict:
    """What a run's baseline phase depends on: the configuration without the fields that act
    later, and of the epochs only the baseline's."""
    values = complete_config(config if isinstance(config, dict) else config.to_dict())
    key = {k: v for k, v in values.items() if k not in AFTER_BASELINE_FIELDS}
    key["epochs"] = {"baseline": values["epochs"]["baseline"]}
    return key


# Fields added after sweep folders existed, with the value that leaves a run as it was before them:
# at that value they are left out of the baseline id, so the ids (the baselines/ folders) of earlier
# sweeps stay valid.
_ID_OMITS_AT = {"val_split": 0, "model": None, **ABSENT_MEANS}


def baseline_id(config: RunConfig | dict) -> str:
    """A short stable name of :func:`baseline_key`: the seed and a hash of the rest."""
    key = {k: v for k, v in baseline_key(config).items()
           if not (k in _ID_OMITS_AT and v == _ID_OMITS_AT[k])}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"baseline-s{key['seed']}-{digest}"

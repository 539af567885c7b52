"""The hyperparameters of the attenuation rule (docs/METHOD.md, "The rule"), their validation, and
the reading of configurations saved by earlier versions."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

from .criteria import get_criterion, scales_with_filter
from .layout import GROUP_REDUCTIONS
from .schedule import check_ramp

SCOPES = ("layer", "global")
# What an attenuation step scales (PruningConfig.attenuate; docs/METHOD.md, "Special cases").
ATTENUATE_TARGETS = ("filter", "gamma", "output")


@dataclass
class PruningConfig:
    """Hyperparameters of the rule. ``interval`` counts optimizer steps ("epoch" = once per epoch)."""
    criterion: str = "l1"
    ratio: float = 0.5
    scope: str = "layer"
    ramp: str = "cubic"
    factor: float = 0.7
    eps: float = 0.01
    interval: Union[int, str] = 20
    # Also attenuate after the phase's first optimizer step (at the ramp's start value: nothing
    # unless the ramp is constant). Soft Filter Pruning zeroes as the phase starts, so that every
    # epoch trains with the mask it ends with instead of the first meeting it untrained; after the
    # first step rather than before it, so that the gradients the taylor criterion reads exist.
    step_at_start: bool = False
    mask_gradients: bool = True
    # What a step scales: "filter" (weight row, bias, and the following BatchNorm's gamma, beta and
    # statistics: the rule) or "gamma" (Soft Filter Pruning: only the BN's gamma where a BN follows,
    # else the weight row and bias; the criteria score the filter with its BN folded in). Zeroing
    # the conv weights alone restarts a filter at the BN's singular point, whose 1/sqrt(bn.eps)
    # regrows it within a step or two to several times the kept filters' norm; a zero gamma gives
    # the channel the same output (beta) and regrows at the ordinary rate (docs/METHOD.md, Decisions).
    # Or "output", a straight-through soft mask: no parameter is scaled; the multiplier m scales the
    # channel's output after its BN in the forward pass, the backward pass goes through as if m were
    # 1, so a weak filter trains and is scored unscaled and a return gives it its full output back
    # (docs/METHOD.md, "The straight-through soft mask").
    attenuate: str = "filter"
    # Treat the multiplier as a reversible soft mask (an option, off by default): a weak filter is
    # scored as if it were not attenuated (its score divided by its multiplier, for criteria that
    # scale with the filter) and a filter that returns gets its full scale back. Under the literal
    # rule (off) an attenuated filter stays the weakest unless training regrows it, which behind a
    # BatchNorm it hardly does, so returns are rare. On, filters return often: on the quick preset
    # the weak set churned so much that no filter reached eps before the end of the phase (see
    # docs/ARCHITECTURE.md).
    reversible: bool = False
    # Divide a weak filter's score by its multiplier (criteria that scale with the filter only):
    # score it as if it were not attenuated. None: as ``reversible``. With ``bn_taylor`` it is the
    # score the attenuation neither erases nor inflates (docs/METHOD.md, "Scores under attenuation").
    unattenuated_scores: Optional[bool] = None
    # Hysteresis (docs/METHOD.md, "Hysteresis"): a weak filter that the selection leaves out returns
    # only if its score exceeds its layer's weak threshold by this relative margin and it has been
    # left out for ``return_after`` consecutive attenuation steps; until then it is held in the weak
    # set, which keeps its size (a held filter takes the place of the selection's highest scorer).
    return_margin: float = 0.0
    return_after: int = 1
    # How a group channel's score is made of its member filters' scores (docs/METHOD.md, "Channel
    # groups"): "sum", "mean" or "max". A group of one conv (a VGG's every conv) scores its filters
    # as they are, whichever it is.
    group_reduce: str = "sum"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "PruningConfig":
        """Check every field's type, then its value: TypeError / ValueError naming the field."""
        for name in ("criterion", "scope", "ramp", "attenuate", "group_reduce"):
            _check_type(name, getattr(self, name), str, "a string")
        for name in ("step_at_start", "mask_gradients", "reversible"):
            _check_type(name, getattr(self, name), bool, "True or False")
        for name in ("ratio", "factor", "eps"):
            _check_finite(name, getattr(self, name))
        get_criterion(self.criterion)
        check_ramp(self.ramp)
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if not 0.0 <= self.factor <= 1.0:
            raise ValueError(f"attenuation factor must be in [0, 1], got {self.factor}")
        if not self.eps >= 0.0:
            raise ValueError(f"removal threshold eps must be >= 0, got {self.eps}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}: expected one of {', '.join(SCOPES)}")
        if self.attenuate not in ATTENUATE_TARGETS:
            raise ValueError(f"unknown attenuate {self.attenuate!r}: expected one of "
                             f"{', '.join(ATTENUATE_TARGETS)}")
        if self.group_reduce not in GROUP_REDUCTIONS:
            raise ValueError(f"unknown group_reduce {self.group_reduce!r}: expected one of "
                             f"{', '.join(GROUP_REDUCTIONS)}")
        _check_interval(self.interval)
        if self.unattenuated_scores is not None:
            _check_type("unattenuated_scores", self.unattenuated_scores, bool, "True, False or None")
        if self.attenuate == "output" and (self.reversible or self.unattenuated_scores):
            raise ValueError("attenuate='output' scales no parameter: its scores are unattenuated and a "
                             "return restores the full output already; reversible and "
                             "unattenuated_scores do not apply")
        _check_finite("return_margin", self.return_margin)
        if not self.return_margin >= 0.0:
            raise ValueError(f"return_margin must be >= 0, got {self.return_margin}")
        if isinstance(self.return_after, bool) or not isinstance(self.return_after, numbers.Integral):
            raise TypeError(f"return_after must be an int number of attenuation steps, got "
                            f"{self.return_after!r} ({type(self.return_after).__name__})")
        if self.return_after < 1:
            raise ValueError(f"return_after must be >= 1 (1: no delay), got {self.return_after}")
        return self

    @property
    def divides_weak_scores(self) -> bool:
        chosen = self.reversible if self.unattenuated_scores is None else self.unattenuated_scores
        return chosen and scales_with_filter(self.criterion)

    @property
    def hysteresis(self) -> bool:
        return self.return_margin > 0.0 or self.return_after > 1


def _check_type(name: str, value, kind: type, expected: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_finite(name: str, value) -> None:
    """A finite real number; bool is not a number here (``ratio=True`` is a mistake, not 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
# Fields added to PruningConfig after checkpoints were first written, with the value that kept the
# earlier runs unchanged (a saved state lacking one is read with it).
_ADDED_FIELDS = {"step_at_start": False, "unattenuated_scores": None, "return_margin": 0.0, "return_after": 1,
                 "group_reduce": "sum"}


def upgrade_config(config):
    """A saved configuration in today's fields. ``attenuate`` replaced ``attenuate_bn``: True did
    what "filter" does; False (the first sfp preset, conv weights only) has no successor and stays
    unequal to every configuration."""
    if not isinstance(config, dict):
        return config
    config = {**_ADDED_FIELDS, **config}
    if config.get("attenuate_bn") is True and "attenuate" not in config:
        config = {**{k: v for k, v in config.items() if k != "attenuate_bn"}, "attenuate": "filter"}
    return config
def _check_interval(interval) -> None:
    if isinstance(interval, str):
        if interval != "epoch":
            raise ValueError(f"interval must be a positive number of steps or 'epoch', got {interval!r}")
    elif isinstance(interval, bool) or not isinstance(interval, numbers.Integral):
        raise TypeError(f"interval must be an int number of steps or 'epoch', got {interval!r} "
                        f"({type(interval).__name__})")
    elif interval < 1:
        raise ValueError(f"interval must be a positive number of steps or 'epoch', got {interval!r}")

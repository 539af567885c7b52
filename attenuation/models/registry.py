"""Models by name: ``create_model("resnet56", width=0.5)``. A model made here carries its spec
(name, width, num_classes), so that a checkpoint can rebuild the architecture without pickling
code: ``create_model_from_spec(model_spec(model))``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from torch import nn

from .resnet import ResNet
from .vgg import VGG_CONFIGS, vgg
from .width import check_width

__all__ = ["available_models", "create_model", "create_model_from_spec", "model_spec", "model_title",
           "vgg_depth", "vgg_name"]

# The spec rides on the model as a plain attribute: copy.deepcopy and pickling keep it.
_SPEC_ATTRIBUTE = "_attenuation_model_spec"
_SPEC_KEYS = ("name", "width", "num_classes")


@dataclass(frozen=True)
class _Entry:
    title: str  # how reports write the model
    build: Callable[[float, int], nn.Module]  # (width, num_classes) -> a fresh model


def vgg_name(depth: int) -> str:
    """The registry name of VGG-``depth``."""
    return f"vgg{depth}"


_VGG_DEPTHS = {vgg_name(depth): depth for depth in VGG_CONFIGS}
_RESNET_DEPTHS = (20, 56)
# shortcut option -> (name suffix, title suffix)
_RESNET_SHORTCUTS = {"A": ("", ""), "B": ("b", " (shortcut B)")}
_MODELS: dict[str, _Entry] = {
    **{name: _Entry(f"VGG-{depth}", partial(vgg, depth)) for name, depth in _VGG_DEPTHS.items()},
    **{f"resnet{depth}{suffix}": _Entry(f"ResNet-{depth}{title}", partial(ResNet, depth, option))
       for depth in _RESNET_DEPTHS for option, (suffix, title) in _RESNET_SHORTCUTS.items()},
}


def available_models() -> list[str]:
    return sorted(_MODELS)


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"unknown model {name!r}: available are {', '.join(available_models())}")
    return name


def model_title(name: str) -> str:
    """How reports write the model ``name``: ``VGG-16``, ``ResNet-56``, ``ResNet-56 (shortcut B)``."""
    return _MODELS[_check_name(name)].title


def vgg_depth(name: str) -> Optional[int]:
    """The depth of a registered VGG's name (``vgg16`` -> 16), None for any other name."""
    return _VGG_DEPTHS.get(name) if isinstance(name, str) else None


def create_model(name: str, width: float = 1.0, num_classes: int = 10) -> nn.Module:
    """A fresh model ``name`` (see :func:`available_models`) with every channel count scaled by
    ``width`` and a classifier of ``num_classes`` outputs."""
    name, width = _check_name(name), check_width(width)
    model = _MODELS[name].build(width, num_classes)  # the model checks num_classes
    setattr(model, _SPEC_ATTRIBUTE, {"name": name, "width": width, "num_classes": num_classes})
    return model


def model_spec(model: nn.Module) -> Optional[dict]:
    """``{"name", "width", "num_classes"}`` of a model made by :func:`create_model` (or a copy
    of one: a physically pruned copy keeps the spec of the model it was cut from), None for any
    other model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_spec takes an nn.Module, got {type(model).__name__}")
    spec = getattr(model, _SPEC_ATTRIBUTE, None)
    return None if spec is None else dict(spec)


def create_model_from_spec(spec: dict) -> nn.Module:
    """The fresh (untrained) model that :func:`model_spec` describes."""
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in _SPEC_KEYS if k not in spec]
    extra = sorted(map(str, set(spec) - set(_SPEC_KEYS)))
    if missing or extra:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) \
            + ([f"has unexpected {', '.join(extra)}"] if extra else [])
        raise ValueError(f"a model spec has exactly the keys {', '.join(_SPEC_KEYS)}; this one "
                         + " and ".join(problems))
    return create_model(spec["name"], spec["width"], spec["num_classes"])

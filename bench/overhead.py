"""Training-step overhead of the project's modules.

Nothing pruned: a VGG-16 training step with the project's pruner attached (every nn.Conv2d swapped
for AttenuatedConv2d, gradient masks registered, ``pruner.step()`` after the optimizer step)
against the same step of the same network with plain nn.Conv2d. Target: at most 3% slower.

Filters removed (25/50/75% of every layer, one-shot by L1 norm): the same step of the masked
network, on each ops backend that runs on the device, against the network physically removed (the
ideal: the dense smaller VGG that computes the same function). Target: within 15% of the ideal.

All variants are timed in turns in one measurement, from one initialisation and one batch.
"""
from __future__ import annotations

import copy

import torch

from attenuation.pruner import Pruner
from attenuation.surgery import remove_filters

from . import section
from .timing import interleaved
from .workload import (Settings, backends_for, channels_last, cifar_batch, prune_hard, train_step,
                       vgg_model)

UNPRUNED_TARGET = 0.03
PRUNED_TARGET = 0.15


def _variants(device: torch.device, settings: Settings, backends: list[str]) -> dict:
    """name -> training step; names: plain, ours, and per ratio r: ideal@r, ours@r/<backend>."""
    base = vgg_model(settings, device)
    x, y = cifar_batch(settings.train_batch, device)
    steps = {"plain": train_step(copy.deepcopy(base), x, y)}
    model = copy.deepcopy(base)
    steps["ours"] = train_step(model, x, y, Pruner(model).step)
    for ratio in settings.ratios:
        for backend in backends:
            model = copy.deepcopy(base)
            pruner = prune_hard(model, ratio, backend)
            steps[f"ours@{ratio:g}/{backend}"] = train_step(model, x, y, pruner.step)
        pruner.remove_hooks()
        ideal = channels_last(remove_filters(model, pruner.keep_masks()))
        steps[f"ideal@{ratio:g}"] = train_step(ideal, x, y)
    return steps


def measure(device: torch.device, settings: Settings) -> dict:
    """Training-step time with the project's modules against plain nn.Conv2d (nothing pruned) and
    against the physically removed network (filters removed)."""
    backends = backends_for(device)
    times = interleaved(_variants(device, settings, backends), device, settings.warmup,
                        settings.repeats)
    plain, ours = times["plain"]["median_ms"], times["ours"]["median_ms"]
    rows = []
    for ratio in settings.ratios:
        ideal = times[f"ideal@{ratio:g}"]["median_ms"]
        for backend in backends:
            masked = times[f"ours@{ratio:g}/{backend}"]
            row = {"ratio": ratio, "backend": backend, "ideal_ms": ideal, "target": PRUNED_TARGET}
            if "error" in masked:  # this backend cannot run the training step (reported, not timed)
                rows.append({**row, "error": masked["error"]})
                continue
            over = masked["median_ms"] / ideal - 1
            rows.append({**row, "ours_ms": masked["median_ms"], "over_ideal": over,
                         "met": over <= PRUNED_TARGET})
    return {"model": settings.model_name, "batch": settings.train_batch,
            "unpruned": {"plain_ms": plain, "ours_ms": ours, "overhead": ours / plain - 1,
                         "target": UNPRUNED_TARGET, "met": ours / plain - 1 <= UNPRUNED_TARGET},
            "pruned": rows, "timings": times}


if __name__ == "__main__":
    section.main("overhead", measure)

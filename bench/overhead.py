"""Training-step overhead of the project's modules.

Nothing pruned: a VGG-16 training step with the project's pruner attached (every nn.Conv2d swapped
for AttenuatedConv2d, gradient masks registered, ``pruner.step()`` after the optimizer step)
against the same step of the same network with plain nn.Conv2d. Target: at most 3% slower.

Filters removed (25/50/75% of every layer, one-shot by L1 norm): the same step of the masked
network, on each ops backend that runs on the device, and of the compacted network (what
``attenuation run`` trains once an epoch with removals has ended: ``Pruner.compact``, its convs
masked convs again with the pruner attached) against the network physically removed (the ideal:
the dense smaller VGG that computes the same function). Target: within 15% of the ideal. The
compaction itself (cutting the network and the optimizer's momentum, re-indexing the pruner) is
timed once per ratio: a run pays it at the end of each epoch that removed filters.

All variants are timed in turns in one measurement, from one initialisation and one batch.
"""
from __future__ import annotations

import copy

import torch

from attenuation.channels_last import as_channels_last
from attenuation.pruner import Pruner
from attenuation.surgery import remove_filters

from . import section
from .timing import interleaved, one_shot
from .workload import Settings, backends_for, cifar_batch, prune_hard, train_step, vgg_model

UNPRUNED_TARGET = 0.03
PRUNED_TARGET = 0.15


def _variants(device: torch.device, settings: Settings, backends: list[str]) -> dict:
    """name -> training step; names: plain, ours, and per ratio r: ideal@r, compacted@r (the
    default backend) and ours@r/<backend>."""
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
        model = copy.deepcopy(base)
        pruner = prune_hard(model, ratio, backends[0])
        steps[f"compacted@{ratio:g}"] = train_step(as_channels_last(pruner.compact(model)), x, y, pruner.step)
        ideal = as_channels_last(remove_filters(model, pruner.keep_masks()))
        steps[f"ideal@{ratio:g}"] = train_step(ideal, x, y)
    return steps


def _compaction_ms(device: torch.device, settings: Settings, ratio: float, backend: str) -> float:
    """The time of one compaction of the network pruned at ``ratio`` after a training step (so
    that the optimizer holds momentum to slice), median of a few."""
    base = vgg_model(settings, device)
    x, y = cifar_batch(settings.train_batch, device)

    def pruned():
        model = copy.deepcopy(base)
        pruner = prune_hard(model, ratio, backend)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return model, pruner, optimizer
    return one_shot(pruned, lambda made: made[1].compact(made[0], made[2]), device, 3)["median_ms"]


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
        variants = [(backend, "masked", f"ours@{ratio:g}/{backend}") for backend in backends]
        variants.append((backends[0], "compacted", f"compacted@{ratio:g}"))
        for backend, path, name in variants:
            row = {"ratio": ratio, "backend": backend, "path": path, "ideal_ms": ideal, "target": PRUNED_TARGET}
            if path == "compacted":
                row["compaction_ms"] = _compaction_ms(device, settings, ratio, backend)
            if "error" in times[name]:  # this variant cannot run the training step (reported, not timed)
                rows.append({**row, "error": times[name]["error"]})
                continue
            step_ms = times[name]["median_ms"]
            rows.append({**row, "ours_ms": step_ms, "over_ideal": step_ms / ideal - 1,
                         "met": step_ms / ideal - 1 <= PRUNED_TARGET})
    return {"model": settings.model_name, "batch": settings.train_batch,
            "unpruned": {"plain_ms": plain, "ours_ms": ours, "overhead": ours / plain - 1,
                         "target": UNPRUNED_TARGET, "met": ours / plain - 1 <= UNPRUNED_TARGET},
            "pruned": rows, "timings": times}


if __name__ == "__main__":
    section.main("overhead", measure)

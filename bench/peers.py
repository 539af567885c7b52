"""The same pruning job done with the tools a researcher would use instead.

For each ratio, the project's pruner chooses the filters (one-shot, lowest L1 norm per layer), and:

- attenuation: ``Pruner`` (setup: swap in AttenuatedConv2d and trace the layers), one attenuation
  step (prune: score, select, zero), training while pruned on the masked convolution, then
  ``surgery.remove_filters`` (remove: the dense smaller VGG).
- torch.nn.utils.prune: ``ln_structured`` (L1, dim 0) on every conv weight, whose forward
  pre-hooks multiply the weight by its mask at every call, and the same mask on each following
  BatchNorm's gamma and beta (``custom_from_mask``) so that the network computes what the removed
  one does; ``prune.remove`` makes it permanent, but the network keeps its size.
- Torch-Pruning (optional: ``pip install torch-pruning``): a ``DependencyGraph`` (setup), then
  every conv's pruning group with the project's mask (remove: the physically smaller network). It
  has no masked state: it trains the removed network.

Figures: time of each step, training-step time while pruned, and after removal the parameters,
MACs and latency at the largest latency batch.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils import prune

from attenuation.channels_last import as_channels_last
from attenuation.profiling import count_macs, count_parameters
from attenuation.pruner import Pruner
from attenuation.surgery import remove_filters

from . import section
from .timing import interleaved, one_shot
from .workload import (Settings, cifar_batch, hard_pruner, inference, keep_masks,
                       prune_hard, train_step, vgg_model)

ONE_SHOT_REPEATS = 3


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each conv of a VGG's ``features`` with the BatchNorm2d right after it, in order."""
    layers = list(model.features)
    return [(conv, bn) for conv, bn in zip(layers, layers[1:])
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)]


def apply_torch_prune(model: nn.Module, keep: list[torch.Tensor]) -> bool:
    """Prune ``model`` in place with torch.nn.utils.prune, removing as many filters per layer as
    ``keep`` drops: ln_structured (L1 over each filter) on the conv weight, and its mask on the
    BatchNorm's gamma and beta. Returns whether ln_structured chose exactly the filters of
    ``keep``."""
    same = True
    for (conv, bn), mask in zip(conv_bn_pairs(model), keep):
        prune.ln_structured(conv, "weight", amount=int((~mask).sum()), n=1, dim=0)
        chosen = conv.weight_mask.flatten(1).any(1)
        same = same and torch.equal(chosen, mask.to(chosen.device))
        for name in ("weight", "bias"):
            prune.custom_from_mask(bn, name, chosen.to(bn.weight.dtype))
    return same


def remove_torch_prune(model: nn.Module) -> nn.Module:
    """Make torch.nn.utils.prune's masks permanent (the hooks go, the zeros stay)."""
    for conv, bn in conv_bn_pairs(model):
        prune.remove(conv, "weight")
        for name in ("weight", "bias"):
            prune.remove(bn, name)
    return model


def torch_pruning_graph(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model`` (traced on ``example``)."""
    import torch_pruning as tp
    return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def torch_pruning_remove(model: nn.Module, graph, keep: list[torch.Tensor]) -> nn.Module:
    """Physically remove the filters that ``keep`` drops, with Torch-Pruning (in place)."""
    import torch_pruning as tp
    for (conv, _), mask in zip(conv_bn_pairs(model), keep):
        dropped = (~mask).nonzero().flatten().tolist()
        if dropped:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=dropped).prune()
    return model


def torch_pruning_version() -> Optional[str]:
    try:
        import torch_pruning
    except ImportError:
        return None
    return getattr(torch_pruning, "__version__", "unknown")


TORCH_PRUNE = "torch.nn.utils.prune"
TORCH_PRUNING = "Torch-Pruning"


class _Job:
    """One pruning job (a ratio, the project's mask) done by each tool on copies of ``base``."""

    def __init__(self, base: nn.Module, ratio: float, example: torch.Tensor, device: torch.device):
        self.base, self.ratio, self.example, self.device = base, ratio, example, device
        self.keep = keep_masks(base, ratio)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.base)

    def ours_masked(self) -> tuple[nn.Module, Pruner]:
        model = self.fresh()
        return model, prune_hard(model, self.ratio)

    def ours_zeroed(self) -> nn.Module:
        """Pruned by the project's pruner, its removed filters zeroed, the pruner detached."""
        model, pruner = self.ours_masked()
        pruner.remove_hooks()
        return model

    def ours_removed(self) -> nn.Module:
        return as_channels_last(remove_filters(self.ours_zeroed(), self.keep))

    def torch_pruned(self) -> tuple[nn.Module, bool]:
        model = self.fresh()
        return model, apply_torch_prune(model, self.keep)

    def torch_pruning_ready(self) -> tuple[nn.Module, object]:
        """A fresh copy and its Torch-Pruning dependency graph."""
        model = self.fresh()
        return model, torch_pruning_graph(model, self.example)

    def torch_pruning_removed(self) -> nn.Module:
        return as_channels_last(torch_pruning_remove(*self.torch_pruning_ready(), self.keep))

    def step_times(self) -> dict:
        """Setup, prune and remove times (ms) per tool; None where a tool has no such step."""
        times = {
            "attenuation": {
                "setup_ms": self._one_shot(self.fresh, lambda m: hard_pruner(m, self.ratio)),
                "prune_ms": self._one_shot(lambda: hard_pruner(self.fresh(), self.ratio), _prune),
                "remove_ms": self._one_shot(self.ours_zeroed, lambda m: remove_filters(m, self.keep))},
            TORCH_PRUNE: {
                "setup_ms": None,
                "prune_ms": self._one_shot(self.fresh, lambda m: apply_torch_prune(m, self.keep)),
                "remove_ms": self._one_shot(lambda: self.torch_pruned()[0], remove_torch_prune)},
        }
        if torch_pruning_version() is not None:
            times[TORCH_PRUNING] = {
                "setup_ms": self._one_shot(self.fresh, lambda m: torch_pruning_graph(m, self.example)),
                "prune_ms": None,
                "remove_ms": self._one_shot(self.torch_pruning_ready,
                                            lambda ready: torch_pruning_remove(*ready, self.keep))}
        return times

    def _one_shot(self, setup, fn) -> float:
        return one_shot(setup, fn, self.device, ONE_SHOT_REPEATS)["median_ms"]


def _prune(pruner: Pruner) -> None:
    """Choose and mask: one attenuation step and the live masks it gives the convs."""
    pruner.attenuation_step()
    pruner.sync_live()


def _size(model: nn.Module) -> dict:
    return {"params": count_parameters(model), "macs": count_macs(model)}


def _agreement(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> dict:
    """Whether two removed networks have the same size and compute the same (eval mode)."""
    ours.eval(), theirs.eval()
    with torch.no_grad():
        diff = (ours(x).float() - theirs(x).float()).abs().max().item()
    return {"params": count_parameters(ours) == count_parameters(theirs),
            "macs": count_macs(ours) == count_macs(theirs), "max_abs_output_diff": diff}


def measure(device: torch.device, settings: Settings) -> dict:
    """The project's pruning job against torch.nn.utils.prune and Torch-Pruning, same masks."""
    base = vgg_model(settings, device)
    x, y = cifar_batch(settings.train_batch, device)
    latency_batch = max(settings.latency_batches)
    x_latency, _ = cifar_batch(latency_batch, device, seed=1)
    has_tp = torch_pruning_version() is not None
    trains, forwards = {}, {"unpruned": inference(copy.deepcopy(base), x_latency)}
    rows = []
    for ratio in settings.ratios:
        job = _Job(base, ratio, x[:1], device)
        tools = job.step_times()
        masked, pruner = job.ours_masked()
        trains[f"attenuation@{ratio:g}"] = train_step(masked, x, y, pruner.step)
        removed = {"attenuation": job.ours_removed()}
        torch_model, same_mask = job.torch_pruned()
        trains[f"{TORCH_PRUNE}@{ratio:g}"] = train_step(torch_model, x, y)
        removed[TORCH_PRUNE] = remove_torch_prune(job.torch_pruned()[0])
        row = {"ratio": ratio, "ln_structured_same_mask": same_mask}
        if has_tp:
            trains[f"{TORCH_PRUNING}@{ratio:g}"] = train_step(job.torch_pruning_removed(), x, y)
            removed[TORCH_PRUNING] = job.torch_pruning_removed()
            row["torch_pruning_agrees"] = _agreement(removed["attenuation"], removed[TORCH_PRUNING],
                                                     x_latency[:8])
        for tool, model in removed.items():
            tools[tool].update(_size(model))
            forwards[f"{tool}@{ratio:g}"] = inference(model, x_latency)
        rows.append({**row, "tools": tools})
    train_times = interleaved(trains, device, settings.warmup, settings.repeats)
    latencies = interleaved(forwards, device, settings.warmup, settings.repeats)
    for row in rows:
        for tool, figures in row["tools"].items():
            key = f"{tool}@{row['ratio']:g}"
            figures["train_step_ms"] = train_times[key]["median_ms"]
            figures["latency_ms"] = latencies[key]["median_ms"]
    return {"model": settings.model_name, "batch": settings.train_batch,
            "latency_batch": latency_batch, "torch_pruning": torch_pruning_version(),
            "unpruned": {**_size(base), "latency_ms": latencies["unpruned"]["median_ms"]},
            "ratios": rows, "timings": {"train": train_times, "latency": latencies}}


if __name__ == "__main__":
    section.main("peers", measure)

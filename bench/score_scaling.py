"""What the attenuation does to each candidate score of a weak filter (docs/METHOD.md, "Scores
under attenuation"): on a small conv+BN+ReLU stack, one filter of the first conv is attenuated by m
(weight row, bias, gamma, beta, as the rule does); its score is measured before, right after, and
after one interval of SGD steps, next to a control model that was not attenuated and took the same
steps. Per score (raw, and divided by m):

- ``kept``: right after the attenuation / before (1: not erased; m: erased);
- ``after``: after the steps / the control's after the same steps (1: the attenuation neither
  erased nor inflated it; below 1 erased, above 1 inflated);
- ``drift``: the change over the steps / the control's change (1: training moves it as it moves an
  unattenuated filter's), meaningful for the norms, which accumulate the updates.
Medians over filters and seeds. Run: ``python -m bench.score_scaling``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

STEPS, FILTERS, SEEDS, LR, MOMENTUM, WEIGHT_DECAY = 20, (0, 5, 10, 15), (0, 1, 2), 0.08, 0.9, 5e-4


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _batches(n: int, seed: int):
    """A learnable toy task: the label sets the mean colour of a noisy image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 10, (64,), generator=g)
        x = torch.randn(64, 3, 16, 16, generator=g) + (y.float() / 5 - 1).view(-1, 1, 1, 1)
        out.append((x, y))
    return out


def _backward(model, batch) -> None:
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()


def _scores(model, batch) -> dict[str, torch.Tensor]:
    """Raw scores of the first conv's filters (gradients of one fixed batch)."""
    _backward(model, batch)
    conv, bn = model[0], model[1]
    return {
        "l1": conv.weight.detach().abs().flatten(1).sum(1),
        "bn |gamma|": bn.weight.detach().abs(),
        "taylor": (conv.weight.detach() * conv.weight.grad).abs().flatten(1).sum(1),
        "bn_taylor": (bn.weight.detach() * bn.weight.grad + bn.bias.detach() * bn.bias.grad).abs(),
    }


def _train(model, batches) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for batch in batches:
        _backward(model, batch)
        optimizer.step()


@torch.no_grad()
def _attenuate(model, filters, m: float) -> None:
    for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias):
        t[filters] *= m


def measure(m: float, filters, seed: int) -> dict[str, tuple[float, float, float]]:
    """Per score, (kept, after, drift) of the filters ``filters`` attenuated together by ``m``."""
    torch.manual_seed(seed)
    model = _model()
    _train(model, _batches(30, seed))                       # a trained starting point
    probe, steps = _batches(1, seed + 100)[0], _batches(STEPS, seed + 200)
    control, attenuated = model, copy.deepcopy(model)
    before = _scores(control, probe)
    _attenuate(attenuated, filters, m)
    right_after = _scores(attenuated, probe)
    _train(control, steps)
    _train(attenuated, steps)
    control_after, attenuated_after = _scores(control, probe), _scores(attenuated, probe)
    out = {}
    for name in before:
        for divided in (False, True):
            d = m if divided else 1.0
            b, r = before[name][filters], right_after[name][filters] / d
            c, a = control_after[name][filters], attenuated_after[name][filters] / d
            out[name + (" / m" if divided else "")] = (r / b, a / c, ((a - r) / (c - b)).abs())
    return out


def main() -> None:
    for m in (0.7, 0.7 ** 5):
        runs = [measure(m, torch.tensor([f]), seed) for seed in SEEDS for f in FILTERS]
        print(f"m = {m:.3f} (1/m = {1 / m:.2f}), one filter of 16, {STEPS} SGD steps, lr {LR}, "
              f"{len(runs)} filters x seeds")
        print(f"{'score':<16} {'kept':>8} {'after':>8} {'drift':>8}")
        for name in runs[0]:
            kept, after, drift = (torch.cat([run[name][i] for run in runs]).median().item() for i in range(3))
            print(f"{name:<16} {kept:8.3f} {after:8.3f} {drift:8.2f}")


if __name__ == "__main__":
    main()

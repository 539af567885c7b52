"""One epoch of training and one evaluation pass: SGD, a stateless per-step learning rate,
optional bfloat16 autocast (devices.resolve_precision), the pruner stepped after every optimizer step."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class EpochResult:
    loss: float
    accuracy: float        # percent
    seconds: float
    images: int
    pruning_seconds: float = 0.0  # in after_step (the pruner); host time, so on CUDA its launches only


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each phase as a pure function of the step (so resuming needs no
    scheduler state). The baseline warms up from ``warmup_start * peak`` over its first
    ``warmup_fraction`` of steps, then decays linearly to zero; the attenuation phase holds
    ``pruning_fraction * peak`` so filters can still regrow; recovery decays linearly from that
    rate, fine-tuning from ``finetune_fraction * peak``. The values come from RunConfig."""
    peak: float
    warmup_fraction: float
    warmup_start: float
    pruning_fraction: float
    finetune_fraction: float

    def at(self, phase: str, step: int, total: int) -> float:
        progress = step / max(total, 1)
        peak, warm = self.peak, self.warmup_fraction
        if phase == "baseline":
            if progress < warm:
                return peak * (self.warmup_start + (1 - self.warmup_start) * progress / warm)
            return peak * (1 - progress) / (1 - warm)
        if phase == "attenuation":
            return self.pruning_fraction * peak
        if phase == "recovery":
            return self.pruning_fraction * peak * (1 - progress)
        if phase == "finetune":
            return self.finetune_fraction * peak * (1 - progress)
        raise ValueError(f"unknown phase {phase!r}")


def autocast_for(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``; None: none (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, *,
                lr: Callable[[int], float], first_step: int, label_smoothing: float = 0.0,
                after_step: Optional[Callable[[], Optional[nn.Module]]] = None,
                progress: Optional[str] = None, live_fraction: Callable[[], float] = lambda: 1.0,
                autocast_dtype: Optional[torch.dtype] = None) -> EpochResult:
    """Train one epoch. ``lr(step)`` gives the rate of each global step of the phase, starting at
    ``first_step``; ``after_step`` runs after every optimizer step (the pruner) and may return a
    model to train from the next step on (a compacted one, with ``optimizer`` switched to it); the
    forward pass and the loss run under autocast to ``autocast_dtype`` (None: float32)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    images = 0
    pruning_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(loader, desc=progress, leave=False, dynamic_ncols=True, disable=progress is None)
    for i, (x, y) in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr(first_step + i)
        with autocast_for(device, autocast_dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            pruning_started = time.perf_counter()
            model = after_step() or model
            pruning_seconds += time.perf_counter() - pruning_started
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        images += y.shape[0]
        if i % 20 == 0 and progress is not None:  # a host read every 20 steps, not every step
            bar.set_postfix(loss=f"{loss_sum.item() / images:.3f}",
                            acc=f"{100 * correct.item() / images:.1f}", live=f"{live_fraction():.2f}")
    bar.close()
    return EpochResult(loss_sum.item() / max(images, 1), 100.0 * correct.item() / max(images, 1),
                       time.perf_counter() - start, images, pruning_seconds)


@torch.no_grad()
def evaluate(model: nn.Module, loader, autocast_dtype: Optional[torch.dtype] = None) -> tuple[float, float]:
    """(loss, accuracy in percent) over the loader, in eval mode, under autocast to
    ``autocast_dtype`` (None: float32)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    images = 0
    for x, y in loader:
        with autocast_for(device, autocast_dtype):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        images += y.shape[0]
    return loss_sum.item() / max(images, 1), 100.0 * correct.item() / max(images, 1)

"""Model cost: parameter count, multiply-accumulates per image, measured latency, and forward and
training-step times of several models measured in turns."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .train import autocast_for

__all__ = ["count_parameters", "count_macs", "measure_latency", "time_in_turns"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the model's first tensor and dtype of its first floating tensor
    (CPU / float32 for a model that has none)."""
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return device, dtype


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Put every submodule in eval mode; restore each one's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_sizes(name: str, sizes) -> tuple[int, ...]:
    sizes = tuple(sizes)
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                            for s in sizes):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {sizes!r}")
    return sizes


def _live_count(module: nn.Module, attr: str, size: int) -> int | None:
    """Number of True entries of the bool mask `module.<attr>` (None when absent)."""
    mask = getattr(module, attr, None)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (size,):
        raise ValueError(f"{type(module).__name__}.{attr} must be a bool tensor of shape "
                         f"({size},), got {mask!r}")
    return int(mask.sum())


def count_macs(model: nn.Module, input_size=(1, 3, 32, 32), live_only: bool = False) -> int:
    """Multiply-accumulates per image of every Conv2d (subclasses included) and Linear,
    measured on one forward pass of a zero input of shape `input_size`.

    With `live_only`, a conv carrying bool masks `live_out` ([out_channels]) and
    optionally `live_in` ([in_channels]) is charged only for its live channels: the
    cost of the project's masked convolution. Linear layers are always counted in full.
    """
    input_size = _check_sizes("input_size", input_size)
    batch = input_size[0]
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        nonlocal total
        c_out, c_in = module.out_channels, module.in_channels
        positions = output.numel() // (batch * c_out)
        if live_only:
            live_out = _live_count(module, "live_out", module.out_channels)
            if live_out is not None:
                c_out = live_out
                live_in = _live_count(module, "live_in", module.in_channels)
                c_in = c_in if live_in is None else live_in
        kh, kw = module.kernel_size
        total += positions * c_out * c_in * kh * kw // module.groups

    def linear_hook(module: nn.Linear, inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() // batch * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    device, dtype = _device_and_dtype(model)
    try:
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return total


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when the index is left out.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _timed_ms(fn, device: torch.device) -> float:
    """Wall-clock milliseconds of ``fn()``, with a CUDA device synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure_latency(model: nn.Module, batch_size: int = 256, input_size=(3, 32, 32),
                    device=None, warmup: int = 3, repeats: int = 10,
                    channels_last: bool = False, autocast_dtype: torch.dtype | None = None
                    ) -> dict:
    """Wall-clock time of one eval-mode forward pass of a random batch.

    `device` defaults to the model's device; the model must already be there.
    With `channels_last`, a channels-last copy of the model is timed (the model
    itself is left untouched). Returns {"median_ms", "min_ms", "batch_size", "device"}.
    """
    input_size = _check_sizes("input_size", input_size)
    _check_sizes("batch_size", (batch_size,))
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    model_device, dtype = _device_and_dtype(model)
    device = model_device if device is None else torch.device(device)
    if not _same_device(device, model_device):
        raise ValueError(f"model is on {model_device} but latency was asked on {device}; "
                         f"move the model first")

    x = torch.randn((batch_size, *input_size), device=device, dtype=dtype)
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    times_ms = []
    with _eval_mode(model), torch.no_grad(), autocast_for(device, autocast_dtype):
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            times_ms.append(_timed_ms(lambda: model(x), device))
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "batch_size": batch_size, "device": str(device)}


def time_in_turns(models: dict[str, nn.Module], batch_size: int = 256, input_size=(3, 32, 32),
                  warmup: int = 2, repeats: int = 10, channels_last: bool = False,
                  autocast_dtype: torch.dtype | None = None, seed: int = 0) -> dict[str, dict]:
    """Per model, the median time of an eval-mode forward pass and of one training step (forward,
    cross-entropy on random labels, backward, an SGD step with Nesterov momentum and weight decay)
    on a random batch, in milliseconds: ``{name: {"forward_ms", "train_step_ms"}}``.

    The models take turns (a, b, a, b, ...), so that a change of the machine's speed during the
    measurement falls on all of them alike and their ratios stay honest; a shared machine's speed
    can drift by tens of percent within minutes. Copies are timed: the models, their BatchNorm
    statistics and the global random state are left as they were. All must be on one device and
    map a batch of ``input_size`` to class scores."""
    if not models:
        raise ValueError("time_in_turns needs at least one model")
    input_size = _check_sizes("input_size", input_size)
    _check_sizes("batch_size", (batch_size,))
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    placed = {name: _device_and_dtype(model) for name, model in models.items()}
    device, dtype = next(iter(placed.values()))
    others = [name for name, (d, _) in placed.items() if not _same_device(d, device)]
    if others:
        raise ValueError(f"time_in_turns needs the models on one device: {', '.join(others)} not on {device}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_size), generator=generator, dtype=dtype).to(device)
    memory_format = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    copies = {name: copy.deepcopy(model).to(memory_format=memory_format) for name, model in models.items()}

    def forward(model: nn.Module) -> None:
        model.eval()
        with torch.no_grad(), autocast_for(device, autocast_dtype):
            model(x)

    with torch.no_grad(), autocast_for(device, autocast_dtype):
        classes = copies[next(iter(copies))].eval()(x).shape[1]
    y = torch.randint(0, classes, (batch_size,), generator=generator).to(device)
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                                        weight_decay=5e-4) for name, model in copies.items()}

    def train_step(name: str) -> None:
        model = copies[name]
        model.train()
        with autocast_for(device, autocast_dtype):
            loss = F.cross_entropy(model(x), y)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    times = {name: {"forward_ms": [], "train_step_ms": []} for name in copies}
    # dropout draws from the global generators: their state is restored afterwards
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for turn in range(warmup + repeats):
            for name, model in copies.items():
                forward_ms = _timed_ms(lambda: forward(model), device)
                step_ms = _timed_ms(lambda: train_step(name), device)
                if turn >= warmup:
                    times[name]["forward_ms"].append(forward_ms)
                    times[name]["train_step_ms"].append(step_ms)
    return {name: {key: statistics.median(values) for key, values in kinds.items()}
            for name, kinds in times.items()}

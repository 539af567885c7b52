"""The workload every measured section shares: a CIFAR VGG-16 at a size made for the device, the
training step that ``attenuation run`` takes, and pruning masks chosen by the project's pruner."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation import ops
from attenuation.channels_last import as_channels_last
from attenuation.methods import method_config
from attenuation.models import vgg
from attenuation.ops.backends import default_backend
from attenuation.pruner import Pruner
from attenuation.config import RunConfig
from attenuation.devices import resolve_precision
from attenuation.train import autocast_for

RATIOS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one suite run. On a CPU the model is the quick preset's (VGG-16 at
    quarter width, batch 256); on a GPU the paper preset's (full width, batch 128)."""
    depth: int
    width: float
    train_batch: int
    latency_batches: tuple[int, ...]
    ratios: tuple[float, ...]
    warmup: int
    repeats: int
    quick: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def model_name(self) -> str:
        return f"VGG-{self.depth} x{self.width:g}"


def settings_for(device: torch.device, quick: bool) -> Settings:
    """``quick`` is a check of the suite itself: tiny sizes, a few repetitions, figures not for
    publishing."""
    if quick:
        return Settings(16, 0.125, 16, (1, 16), RATIOS, warmup=1, repeats=3, quick=True)
    if device.type == "cuda":
        return Settings(16, 1.0, 128, (1, 256), RATIOS, warmup=5, repeats=20)
    return Settings(16, 0.25, 256, (1, 256), RATIOS, warmup=2, repeats=10)


def vgg_model(settings: Settings, device: torch.device, seed: int = 0) -> nn.Module:
    """A freshly initialised VGG (plain nn.Conv2d) on ``device``, as runs keep every network
    (as_channels_last; also after removal, whose sliced weights come out in the default layout)."""
    torch.manual_seed(seed)
    return as_channels_last(vgg(settings.depth, settings.width).to(device))


def cifar_batch(batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped images (channels-last) and labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)


def run_autocast(device: torch.device):
    """The autocast of a run with the default precision on ``device`` (bfloat16 where the device
    computes it natively)."""
    return autocast_for(device, resolve_precision(RunConfig.precision, device))


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               after_step: Optional[Callable[[], None]] = None) -> Callable[[], None]:
    """One optimizer step as ``attenuation run`` takes it (SGD with Nesterov momentum and weight
    decay, in the default precision: :func:`run_autocast`), then ``after_step`` (the pruner's step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    model.train()

    def step() -> None:
        with run_autocast(x.device):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
    return step


def inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One eval-mode forward pass as the runs measure latency (in the default precision)."""
    model.eval()

    def forward() -> None:
        with torch.no_grad(), run_autocast(x.device):
            model(x)
    return forward


def hard_pruner(model: nn.Module, ratio: float, backend: Optional[str] = None) -> Pruner:
    """The project's pruner on ``model`` (converted in place), set for one-shot pruning at
    ``ratio`` by L1 norm, started: its next ``attenuation_step()`` prunes."""
    pruner = Pruner(model, method_config("hard", criterion="l1", ratio=ratio), backend=backend)
    pruner.start(1)
    return pruner


def prune_hard(model: nn.Module, ratio: float, backend: Optional[str] = None) -> Pruner:
    """Prune ``model`` in place with the project's pruner, one-shot: in every layer the
    floor(ratio * n) filters of lowest L1 norm are removed (zeroed, gradients masked). Returns the
    pruner, finished, whose ``step()`` only keeps the removed filters at zero."""
    pruner = hard_pruner(model, ratio, backend)
    pruner.attenuation_step()
    pruner.finish()
    return pruner


def keep_masks(model: nn.Module, ratio: float) -> list[torch.Tensor]:
    """The filters the project's pruner keeps at ``ratio`` (one bool mask per conv), chosen on a
    copy: ``model`` is left untouched."""
    pruner = prune_hard(copy.deepcopy(model), ratio)
    return [mask.clone() for mask in pruner.keep_masks()]


def _runs_on(backend: str, device: torch.device) -> bool:
    x = torch.randn(1, 2, 4, 4, device=device)
    weight = torch.randn(2, 2, 3, 3, device=device)
    index = torch.tensor([0], device=device)
    try:
        ops.masked_conv2d(x, weight, None, index, index, None, 1, 1, 1, backend=backend)
    except Exception:
        return False
    return True


def backends_for(device: torch.device) -> list[str]:
    """The ops backends that run on ``device`` in this process, the device's default first.

    Probed with a tiny masked convolution: a backend can be registered yet unable to run on a
    device (triton on a CPU outside Triton's interpreter raises)."""
    default = default_backend(device)
    names = [default] + [b for b in ops.available_backends() if b != default]
    return [name for name in names if _runs_on(name, device)]

"""Micro-benchmarks of the ops against what a user would otherwise write (pytest-benchmark).

    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-columns=median,ops

Shapes are VGG-16 CIFAR layers at the quick preset's width (x0.25) on the CPU, full width on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from attenuation import ops
from attenuation.methods import method_config
from attenuation.models import vgg
from attenuation.pruner import Pruner

LIVE_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _layer(device):
    """A middle VGG-16 layer: (batch, channels, spatial)."""
    return (128, 64, 16) if device.type == "cpu" else (128, 256, 8)


def _triton_or_skip(device) -> str:
    if device.type != "cuda":
        pytest.skip("the triton backend is benchmarked on CUDA only (on the CPU it exists only "
                    "under Triton's interpreter, which is a test harness, not a speed)")
    if "triton" not in ops.available_backends():
        pytest.skip("no triton backend: triton or attenuation_triton cannot be imported")
    return "triton"


@pytest.mark.parametrize("live", LIVE_FRACTIONS)
@pytest.mark.parametrize("impl", ["masked_conv2d", "masked_conv2d_triton", "dense_zero_masked"])
def test_masked_conv_forward_backward(benchmark, device, live, impl):
    """Masked conv (reference backend, and the Triton kernel on a GPU) vs cuDNN/oneDNN on the full,
    zero-masked weight."""
    backend = _triton_or_skip(device) if impl == "masked_conv2d_triton" else "reference"
    torch.manual_seed(0)
    n, c, hw = _layer(device)
    x = torch.randn(n, c, hw, hw, device=device).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(c, c, 3, 3, device=device, requires_grad=True)
    index = torch.randperm(c, device=device)[:max(1, int(c * live))].sort().values
    mask = torch.zeros(c, device=device).index_fill_(0, index, 1)

    def step():
        if impl.startswith("masked_conv2d"):
            y = ops.masked_conv2d(x, w, None, index, index, None, 1, 1, 1, backend=backend)
        else:
            y = F.conv2d(x, w * mask.view(-1, 1, 1, 1) * mask.view(1, -1, 1, 1), None, 1, 1)
        y.sum().backward()
        _sync(device)

    benchmark.extra_info.update(live_fraction=live, shape=[n, c, hw, hw], device=str(device))
    benchmark(step)


@pytest.mark.parametrize("impl", ["pruner", "pruner_triton", "eager_per_layer"])
def test_attenuation_step(benchmark, device, impl):
    """The whole attenuation step (norms, select, attenuate) of VGG-16 against a per-layer eager
    PyTorch loop that a user would write. ``pruner`` runs on the device's default backend,
    ``pruner_triton`` on the Triton kernels (one launch per op over the whole model)."""
    backend = _triton_or_skip(device) if impl == "pruner_triton" else None
    torch.manual_seed(0)
    model = vgg(16, width=1.0 if device.type == "cuda" else 0.25).to(device)
    pruner = Pruner(model, method_config("attenuation", ratio=0.5, interval=1), backend=backend)
    pruner.start(10 ** 9)
    convs = [layer.conv for layer in pruner.layers]
    bns = [layer.bn for layer in pruner.layers]

    def eager():
        with torch.no_grad():
            for conv, bn in zip(convs, bns):
                norms = conv.weight.abs().flatten(1).sum(1)
                weak = norms.argsort()[: conv.out_channels // 2]
                for t in (conv.weight, bn.weight, bn.bias):
                    t[weak] *= 0.7
        _sync(device)

    def ours():
        pruner.attenuation_step()
        _sync(device)

    benchmark.extra_info.update(backend=backend or "default", device=str(device))
    benchmark(eager if impl == "eager_per_layer" else ours)

"""Micro-benchmarks of the ops, every backend, against what a user would otherwise write
(pytest-benchmark). Not part of the test suite (`python -m pytest` collects tests/ only):

    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-json=OUT.json

Backends: ``reference`` (pure PyTorch), ``native`` (the C++ extension; CPU, and CUDA when compiled
in), ``triton`` (GPU only: on a CPU it exists only under Triton's interpreter, a test harness).
A backend that is not available skips with the reason. Each benchmark's ``extra_info`` carries the
work it does (``flop``: useful floating-point operations; ``bytes``: the bytes a perfect kernel
moves), so achieved TFLOP/s and GB/s follow from the median time.
"""
import pytest
import torch
import torch.nn.functional as F

from attenuation import ops
from attenuation.ops import reference
from attenuation.methods import method_config
from attenuation.models import vgg
from attenuation.pruner import Pruner
from attenuation.schedule import weak_count

LIVE_FRACTIONS = (1.0, 0.75, 0.5, 0.25)

# VGG-16 CIFAR conv layers, (channels, spatial size): full width, and one of the quick preset's
# quarter-width network. The CPU runs batch 128 only (each full-width layer is ~5 GMAC a pass there).
VGG16_LAYERS = {"c128x16": (128, 16), "c256x8": (256, 8), "c512x4": (512, 4), "q64x8": (64, 8)}
GPU_ONLY_LAYERS = {"c64x32": (64, 32), "c512x2": (512, 2)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _backend_or_skip(name: str, device: torch.device) -> str:
    if name == "triton" and device.type != "cuda":
        pytest.skip("the triton backend is benchmarked on CUDA only (on the CPU it exists only "
                    "under Triton's interpreter, which is a test harness, not a speed)")
    if name not in ops.available_backends():
        pytest.skip(f"no {name} backend in this build")
    if name == "native" and device.type == "cuda":
        from attenuation.ops import native
        if not native.has_kernel("cuda"):
            pytest.skip("the native extension was built without CUDA")
    return name


def _layers(device):
    return {**VGG16_LAYERS, **(GPU_ONLY_LAYERS if device.type == "cuda" else {})}


def _batches(device):
    return (128, 256) if device.type == "cuda" else (128,)


@pytest.mark.parametrize("live", LIVE_FRACTIONS)
@pytest.mark.parametrize("layer", list(VGG16_LAYERS) + list(GPU_ONLY_LAYERS))
@pytest.mark.parametrize("batch", [128, 256])
@pytest.mark.parametrize("impl", ["native", "triton", "reference", "gather_conv_scatter", "dense_zero_masked"])
def test_masked_conv_forward_backward(benchmark, device, impl, batch, layer, live):
    """Masked conv2d forward + backward (live fraction on input and output channels) against the
    library's dense convolution (cuDNN / oneDNN) on the full, zero-masked weight, and against the
    plain gather, compact convolution, scatter (the reference's strategy below 30% of the MACs,
    forced here at every fraction)."""
    if layer not in _layers(device) or batch not in _batches(device):
        pytest.skip(f"{layer} at batch {batch} is benchmarked on a GPU only")
    backend = impl if impl in ("dense_zero_masked", "gather_conv_scatter") else _backend_or_skip(impl, device)
    channels, size = _layers(device)[layer]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device).requires_grad_()
    grad = torch.randn(batch, channels, size, size, generator=g).to(device, memory_format=torch.channels_last)
    live_count = max(1, round(channels * live))
    index = torch.randperm(channels, generator=g)[:live_count].sort().values.to(device)
    mask = torch.zeros(channels, device=device).index_fill_(0, index, 1)

    def step():
        if impl == "dense_zero_masked":
            y = F.conv2d(x, w * mask.view(-1, 1, 1, 1) * mask.view(1, -1, 1, 1), None, 1, 1)
        elif impl == "gather_conv_scatter":
            y = reference.gathered_conv2d(x, w, None, index, index, None, 1, 1, 1)
        else:
            y = ops.masked_conv2d(x, w, None, index, index, None, 1, 1, 1, backend=backend)
        y.backward(grad)
        _sync(device)

    useful_macs = batch * size * size * live_count * live_count * 9
    benchmark.extra_info.update(live_fraction=live, layer=layer, batch=batch, channels=channels, size=size,
                                device=str(device), flop=3 * 2 * useful_macs)  # forward, grad input, grad weight
    benchmark(step)


def _pruned_vgg16(device, width: float):
    torch.manual_seed(0)
    model = vgg(16, width=width).to(device)
    pruner = Pruner(model, method_config("attenuation", ratio=0.5, interval=1), backend="reference")
    pruner.start(10 ** 9)
    return model, pruner


def _vgg16_widths(device):
    return (1.0,) if device.type == "cuda" else (1.0, 0.25)


@pytest.mark.parametrize("width", [1.0, 0.25])
@pytest.mark.parametrize("impl", ["native", "triton", "reference", "eager_per_layer"])
def test_attenuation_step_ops(benchmark, device, impl, width):
    """The three ops of one attenuation step over VGG-16 (L1 norms of every filter, per-layer
    selection of the 50% weakest, attenuation of weight, gamma, beta and BN statistics) on one
    backend, against the per-layer eager PyTorch loop a user would write."""
    if width not in _vgg16_widths(device):
        pytest.skip(f"VGG-16 x{width} is benchmarked on the CPU only")
    backend = None if impl == "eager_per_layer" else _backend_or_skip(impl, device)
    model, pruner = _pruned_vgg16(device, width)
    weights, biases, gammas, betas = pruner._filter_tensors()
    means = [layer.bn.running_mean for layer in pruner.layers]
    variances = [layer.bn.running_var for layer in pruner.layers]
    ks = torch.tensor([weak_count(0.5, n) for n in pruner.counts], device=device)
    removed = torch.zeros_like(pruner.status, dtype=torch.bool)

    def fused():
        scores = ops.filter_norms(weights, "l1", backend=backend)
        weak = ops.select_weak(scores, removed, pruner.counts, ks, backend=backend)
        ops.attenuate_(weights, biases, gammas, betas, weak, pruner.status, pruner.multiplier, 0.99, 0.0,
                       running_means=means, running_vars=variances, backend=backend)
        _sync(device)

    def eager():
        with torch.no_grad():
            for w, gamma, beta, mean, var, k in zip(weights, gammas, betas, means, variances, ks.tolist()):
                weak = w.abs().flatten(1).sum(1).argsort()[:k]
                for t in (w, gamma, beta, mean):
                    t[weak] *= 0.99
                var[weak] *= 0.99 ** 2
        _sync(device)

    parameters = sum(w.numel() * w.element_size() for w in weights)
    benchmark.extra_info.update(backend=impl, width=width, device=str(device), filters=sum(pruner.counts),
                                bytes=parameters)  # the norm pass reads every weight once
    benchmark(eager if impl == "eager_per_layer" else fused)


@pytest.mark.parametrize("impl", ["native", "triton", "reference", "eager_per_layer"])
def test_filter_norms(benchmark, device, impl):
    """The L1 norm of every filter of a conv model: the memory-bound pass (GB/s against the copy
    bandwidth). VGG-16 on the CPU; a ~100M-parameter stack of VGG-16-shaped weights on a GPU."""
    backend = None if impl == "eager_per_layer" else _backend_or_skip(impl, device)
    model, pruner = _pruned_vgg16(device, 1.0)
    weights = [w.detach() for w in pruner._filter_tensors()[0]]
    if device.type == "cuda":
        weights = weights * 7  # 7 x 14.7M = 103M parameters
    def eager():
        torch.cat([w.abs().flatten(1).sum(1) for w in weights])
        _sync(device)

    def fused():
        ops.filter_norms(weights, "l1", backend=backend)
        _sync(device)

    benchmark.extra_info.update(backend=impl, device=str(device),
                                bytes=sum(w.numel() * w.element_size() for w in weights))
    benchmark(eager if impl == "eager_per_layer" else fused)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("impl", ["native", "triton", "reference"])
def test_pruner_attenuation_step(benchmark, device, impl, scope):
    """The engine's whole attenuation step (criterion, ramp, select per layer or over the model,
    attenuate, bookkeeping, live masks) of VGG-16 on one backend."""
    backend = _backend_or_skip(impl, device)
    torch.manual_seed(0)
    model = vgg(16, width=1.0 if device.type == "cuda" else 0.25).to(device)
    pruner = Pruner(model, method_config("attenuation", ratio=0.5, interval=1, factor=0.99, scope=scope),
                    backend=backend)
    pruner.start(10 ** 9)

    def step():
        pruner.attenuation_step()
        pruner.sync_live()  # the live masks, which a training run gives the convs at the next step
        _sync(device)

    benchmark.extra_info.update(backend=impl, device=str(device))
    benchmark(step)


# The quick preset's BatchNorm shapes (channels, spatial size): the unpruned VGG-16 x0.25 and the
# same network with 35% of every layer's filters removed (its default ratio), at batch 256.
BATCH_NORM_LAYERS = {"q16x32": (16, 32), "q32x16": (32, 16), "q64x8": (64, 8), "q128x4": (128, 4),
                     "p10x32": (10, 32), "p21x16": (21, 16), "p42x8": (42, 8), "p83x4": (83, 4)}


def _cpu_layer_or_skip(device, impl: str, native: bool, what: str) -> None:
    if device.type != "cpu":
        pytest.skip(f"the native {what} is a CPU op (cuDNN's is fast for any channel count)")
    if impl == "native" and not native:
        pytest.skip(f"the native extension was built without the {what} ops")


def _channels_last_batch(layer: str, dtype: str, g: torch.Generator, grad_size: int) -> tuple:
    """A channels-last activation of ``layer`` at batch 256 (requiring grad) and a gradient of its
    channels at ``grad_size`` x ``grad_size``."""
    channels, size = BATCH_NORM_LAYERS[layer]
    x = torch.randn(256, channels, size, size, generator=g).to(getattr(torch, dtype))
    grad = torch.randn(256, channels, grad_size, grad_size, generator=g).to(x.dtype)
    return (x.contiguous(memory_format=torch.channels_last).requires_grad_(),
            grad.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layer", list(BATCH_NORM_LAYERS))
@pytest.mark.parametrize("impl", ["native", "torch_batch_norm"])
def test_batch_norm_forward_backward(benchmark, device, impl, layer, dtype):
    """A training BatchNorm on channels-last activations, forward + backward: the native ops
    (attenuation.batch_norm, CPU) against PyTorch's kernel, whose channels-last path vectorises
    along the channels (slow for counts that are not a multiple of 16). ``bytes``: one read of x
    for the statistics, one read and a write for the output, two reads of x and of the gradient
    and a write for the backward."""
    from attenuation.batch_norm import NATIVE
    _cpu_layer_or_skip(device, impl, NATIVE, "BatchNorm")
    channels, size = BATCH_NORM_LAYERS[layer]
    g = torch.Generator().manual_seed(0)
    x, grad = _channels_last_batch(layer, dtype, g, size)
    weight, bias = torch.rand(channels, generator=g).add(0.5), torch.randn(channels, generator=g)
    weight.requires_grad_(), bias.requires_grad_()
    _ops = torch.ops.attenuation

    def step():
        if impl == "native":
            y = _ops.batch_norm_train(x, weight, bias, 1e-5)[0]
        else:
            y = F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
        torch.autograd.grad(y, (x, weight, bias), grad)

    benchmark.extra_info.update(impl=impl, layer=layer, channels=channels, size=size, dtype=dtype,
                                device=str(device), bytes=8 * x.numel() * x.element_size())
    benchmark(step)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layer", list(BATCH_NORM_LAYERS))
@pytest.mark.parametrize("impl", ["native", "torch_max_pool2d"])
def test_max_pool_forward_backward(benchmark, device, impl, layer, dtype):
    """The 2x2 max pool with stride 2 on channels-last activations, forward + backward: the native
    ops (attenuation.max_pool, CPU) against PyTorch's kernel, at the BatchNorm benchmark's shapes.
    ``bytes``: a read of x and a write of the output and its window codes, a read of the gradient
    and the codes and a write of the input's gradient."""
    from attenuation.max_pool import NATIVE
    _cpu_layer_or_skip(device, impl, NATIVE, "max pool")
    channels, size = BATCH_NORM_LAYERS[layer]
    x, grad = _channels_last_batch(layer, dtype, torch.Generator().manual_seed(0), size // 2)
    _ops = torch.ops.attenuation

    def step():
        y = _ops.max_pool2x2(x)[0] if impl == "native" else F.max_pool2d(x, 2)
        torch.autograd.grad(y, x, grad)

    size_bytes = x.numel() * x.element_size()
    benchmark.extra_info.update(impl=impl, layer=layer, channels=channels, size=size, dtype=dtype,
                                device=str(device), bytes=2 * size_bytes + size_bytes // 2 + x.numel() // 2)
    benchmark(step)

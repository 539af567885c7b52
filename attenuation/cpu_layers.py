"""What the drop-in CPU layers (batch_norm.py, max_pool.py) share: whether the native extension has
their ops, and which inputs they take. PyTorch's channels-last CPU kernels (BatchNorm, max pool)
vectorise along the channels; where the count is a multiple of 16 they are as fast as the native
ops or faster, so the drop-ins leave those counts to them (measured on the AMD EPYC, bfloat16 and
float32, 8 to 128 channels: bench/RESULTS.md)."""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from attenuation import _C  # noqa: F401  (loading it registers the ops)
except ImportError:  # not built
    _C = None

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TORCH_VECTOR_CHANNELS = 16


def has_cpu_kernel(op: str) -> bool:
    """Has the extension a CPU kernel of ``attenuation::<op>``? False without the extension, or with
    one built from sources before the op."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"attenuation::{op}", "CPU")
    except RuntimeError:
        return False


def native_input(x: Tensor) -> bool:
    """A tensor the native layer ops take, and where PyTorch's kernel is the slow one: 4-D,
    channels-last, on the CPU, of a floating dtype, not empty, with a channel count that is not a
    multiple of 16."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in DTYPES and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last) and bool(x.shape[1] % TORCH_VECTOR_CHANNELS))

"""What the launchers need to know of how Triton runs the kernels: interpreted or compiled, and
the element types the kernels are written for."""
import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


INTERPRET = not isinstance(_probe, triton.runtime.jit.JITFunction)
"""True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1 when they were decorated):
``triton.jit`` then returns an interpreted function instead of a JITFunction."""

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
"""The torch dtypes the kernels read and write, and their Triton element types."""

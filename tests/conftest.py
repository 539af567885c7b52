import os

import torch

# Without a GPU the Triton kernels are tested through Triton's interpreter, on CPU tensors. The
# variable must be set before triton is first imported (torch does not import it; attenuation does,
# through the triton backend's registration), so it is set here, before any test module imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield

"""The filter status codes: one Python definition (attenuation.ops.status), which the C++ copy in
csrc/include/attenuation/filter_rule.h and the native backend's outputs must equal."""
import pathlib
import re

import pytest
import torch

from attenuation import ops
from attenuation.ops import reference, status

HEADER = pathlib.Path(__file__).resolve().parents[1] / "csrc/include/attenuation/filter_rule.h"


def test_one_python_definition():
    assert (status.ACTIVE, status.WEAK, status.REMOVED) == (0, 1, 2)
    assert len({status.ACTIVE, status.WEAK, status.REMOVED}) == 3
    for module in (ops, reference):
        assert (module.ACTIVE, module.WEAK, module.REMOVED) == (status.ACTIVE, status.WEAK, status.REMOVED)


def test_the_cpp_header_declares_the_same_codes():
    text = HEADER.read_text()
    declared = {name: int(value) for name, value in
                re.findall(r"constexpr\s+uint8_t\s+k(Active|Weak|Removed)\s*=\s*(\d+)\s*;", text)}
    assert declared == {"Active": status.ACTIVE, "Weak": status.WEAK, "Removed": status.REMOVED}


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_backend_writes_and_reads_the_python_codes(backend):
    """Every transition of the rule: stays active, becomes weak, weak again, returns, removed now,
    stays removed. The codes in and out are the Python constants."""
    if backend not in ops.available_backends():
        pytest.skip(f"no {backend} backend in this environment")
    A, W, R = status.ACTIVE, status.WEAK, status.REMOVED
    weight = torch.randn(6, 3, 3, 3)
    state = torch.tensor([A, A, W, W, W, R], dtype=torch.uint8)
    multiplier = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.02, 0.0])
    weak = torch.tensor([False, True, True, False, True, True])
    returned, newly_removed = ops.attenuate_([weight], [None], [None], [None], weak, state, multiplier,
                                             0.4, 0.01, backend=backend)
    assert state.tolist() == [A, W, W, A, R, R]
    assert returned.tolist() == [False, False, False, True, False, False]
    assert newly_removed.tolist() == [False, False, False, False, True, False]

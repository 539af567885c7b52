"""The Triton ``select_weak_global`` (kernels/select_weak_global.py) against the reference backend.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). Blocks are shrunk so that the layers cross block boundaries, and the fresh
output is poisoned so that an element no program writes is caught. Scores are mostly integers:
the layer means are then exact sums, which every backend rounds alike (see the reference).
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attenuation import ops
from attenuation.ops import reference
from test_triton_backend import _SKIP, DEVICE, H, _assert_mask, poison

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

COUNTS = [1, 7, 13, 4, 0, 9, 2]      # odd sizes, crossing blocks of 4 (BLOCK_I) and 8 (BLOCK_J)


@pytest.fixture(autouse=True)
def _small_blocks_poisoned_output(monkeypatch):
    if H is None:
        return
    monkeypatch.setitem(H.TUNING, "select_block_i", 4)
    monkeypatch.setitem(H.TUNING, "select_block_j", 8)
    monkeypatch.setattr(H, "_empty", poison)


def _check(scores, removed, counts, n_weak):
    scores, removed = scores.to(DEVICE), removed.to(DEVICE)
    got = ops.select_weak_global(scores, removed, counts, n_weak, backend="triton")
    _assert_mask(got, reference.select_weak_global(scores, removed, counts, n_weak))


def _problem(seed):
    """Small integers (ties within and across layers) on a scale of its own per layer (a power of
    two: the sums stay exact), so that only the right means make the layers comparable."""
    g = torch.Generator().manual_seed(seed)
    total = sum(COUNTS)
    scales = torch.tensor([2.0 ** int(torch.randint(0, 6, (), generator=g)) for _ in COUNTS])
    scores = torch.randint(0, 5, (total,), generator=g).float()
    scores *= scales.repeat_interleave(torch.tensor(COUNTS))
    return scores, torch.rand(total, generator=g) < 0.25


def test_layer_means_are_clamped_at_the_mean_the_kernel_is_given(monkeypatch):
    """The kernel clamps at the value it is launched with (the reference's MIN_LAYER_MEAN): raised
    to 4, it changes which filters of the layers with smaller means are chosen, as in the reference."""
    scores = torch.tensor([0.5, 1.0, 1.5, 2.0, 8.0, 6.0, 9.0, 7.0, 0.25, 0.75, 0.5])
    removed = torch.zeros(11, dtype=torch.bool)
    counts = [4, 4, 3]
    unclamped = reference.select_weak_global(scores, removed, counts, 4)
    monkeypatch.setattr(reference, "MIN_LAYER_MEAN", 4.0)
    monkeypatch.setattr(H, "MIN_LAYER_MEAN", 4.0)
    assert not torch.equal(reference.select_weak_global(scores, removed, counts, 4), unclamped)
    _check(scores, removed, counts, 4)


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference(seed):
    scores, removed = _problem(seed)
    _check(scores, removed, COUNTS, [5, 12, 18, 23][seed])


@pytest.mark.parametrize("n_weak", [0, sum(COUNTS), sum(COUNTS) + 5])
def test_n_weak_bounds(n_weak):
    """None selected, or every layer all but its last filter in its order."""
    scores, removed = _problem(3)
    _check(scores, removed, COUNTS, n_weak)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")   # inf / inf
def test_removed_layers_signed_zeros_infinities_and_nans():
    counts = [6, 5, 3]
    scores = torch.tensor([0.0, -0.0, math.nan, 1.0, math.inf, 0.0,    # a NaN: the layer normalises to NaN
                           2.0, -0.0, math.inf, 2.0, 0.0,              # inf: mean inf, inf / inf = NaN
                           7.0, math.nan, 1.0])                        # every filter removed
    removed = torch.zeros(14, dtype=torch.bool)
    removed[[3, 10, 11, 12, 13]] = True
    for n_weak in (2, 6, 11):
        _check(scores, removed, counts, n_weak)


def test_an_all_zero_layer_and_real_valued_scores():
    """Means clamped at MIN_LAYER_MEAN; non-integer scores (their sums agree here, as they do
    unless normalised scores of different layers lie within a rounding of each other)."""
    g = torch.Generator().manual_seed(9)
    counts = [9, 4, 11]
    scores = torch.rand(24, generator=g) * 3
    scores[9:13] = 0.0
    removed = torch.rand(24, generator=g) < 0.2
    _check(scores, removed, counts, 10)


@pytest.mark.slow
def test_kernel_compiles_for_a_gpu_target(tmp_path):
    """The interpreter is more lenient than the compiler: compile for sm_90 (no GPU needed) and
    check that the divisions round to nearest as torch's do (not Triton's approximate ``/``)."""
    code = textwrap.dedent("""
        import triton
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        from attenuation_triton import select_weak_global as sg
        signature = {"layers_ptr": "*i64", "blocks_ptr": "*i64", "n_layers": "i32", "scores_ptr": "*fp32",
                     "removed_ptr": "*u8", "n_weak": "i32", "out_ptr": "*u8",
                     "MIN_MEAN": "constexpr", "NCOL": "constexpr", "BLOCK_I": "constexpr",
                     "BLOCK_J": "constexpr"}
        compiled = triton.compile(ASTSource(sg.select_weak_global_kernel, signature,
                                            dict(MIN_MEAN=1e-12, NCOL=sg.NCOL, BLOCK_I=64, BLOCK_J=64)),
                                  target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm
        assert "div.rn.f32" in compiled.asm["ptx"] and "div.full" not in compiled.asm["ptx"]
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=300)
    if result.returncode != 0 and ("No module named 'triton.backends" in result.stderr
                                   or "ptxas" in result.stderr and "not found" in result.stderr):
        pytest.skip(f"this triton cannot compile for CUDA here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]

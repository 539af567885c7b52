"""kernels/ (the package ``attenuation_triton``) stands alone: it imports nothing of ``attenuation``
and keeps no copy of its facts (the status codes come in as launch arguments), and its kernels
import and run with ``attenuation`` made unimportable."""
import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels"


def _imported_modules(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


def _assigned_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in ast.walk(node) if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store)}


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_kernel_files_import_only_torch_triton_and_each_other(path):
    for name in _imported_modules(path):
        root = name.split(".")[0]
        assert root not in ("attenuation", "attenuation_triton"), f"{path.name} imports {name}"
    assert not {"ACTIVE", "WEAK", "REMOVED"} & _assigned_names(path), f"{path.name} defines status codes"


_SCRIPT = textwrap.dedent("""
    import importlib, pkgutil, sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "attenuation" or name.startswith("attenuation."):
                raise ImportError(f"{name} is blocked for this test")

    sys.meta_path.insert(0, Blocker())
    import torch
    import torch.nn.functional as F
    import attenuation_triton
    for module in pkgutil.iter_modules(attenuation_triton.__path__):
        importlib.import_module(f"attenuation_triton.{module.name}")
    from attenuation_triton import attenuate, filter_norms, masked_conv2d
    from attenuation_triton.runtime import INTERPRET
    assert INTERPRET

    def table(*values):
        return torch.tensor(values, dtype=torch.int64)

    # filter_norms: one layer of 5 filters of 27 elements, two programs of 4 filters, two K blocks
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 3, 3, generator=g)
    out = torch.full((5,), float("nan"))
    filter_norms.launch(table(0, 5, 27, w.data_ptr(), 27), table(0, 0, 0, 4), out, 2, torch.float32, "l2", 4, 16)
    torch.testing.assert_close(out, w.flatten(1).norm(dim=1))

    # zero_only attenuate with the caller's status codes (5, 6, 7): only code 7 means removed
    w = torch.randn(4, 6, generator=g)
    status = torch.tensor([7, 2, 5, 7], dtype=torch.uint8)
    row = [0, 4, 6, w.data_ptr(), 6] + [status.data_ptr(), 0, 0] * 5
    attenuate.launch(table(*row), table(0, 0), status, status, status, status, status, 1, 1.0, 0.0,
                     (torch.float32,) * 6, (5, 6, 7), True, False, 4, 8)
    removed = status == 7
    assert not w[removed].any() and w[~removed].all()

    # the masked convolution's forward launcher against F.conv2d
    x, weight = torch.randn(2, 3, 5, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    live = torch.tensor([0, 2])
    y = masked_conv2d.conv_forward(x, weight, None, None, live, None, (1, 1), (1, 1), (1, 1), tf32=False)
    expected = F.conv2d(x, weight, padding=1)
    expected[:, [1, 3]] = 0
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert not any(name == "attenuation" or name.startswith("attenuation.") for name in sys.modules)
    print("ok")
""")


def test_kernels_import_and_run_without_the_attenuation_package():
    pytest.importorskip("triton", reason="triton cannot be imported")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]

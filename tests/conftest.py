import os

import torch

# Without a GPU the Triton kernels are tested through Triton's interpreter, on CPU tensors. The
# variable must be set before triton is first imported (torch does not import it; attenuation does,
# through the triton backend's registration), so it is set here, before any test module imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """A small CIFAR-shaped npz (320 training, 100 test images) with class-dependent colours, so
    that something is learnable: the data of the end-to-end run, CLI and sweep tests."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "cifar10.npz"
    y_train, y_test = np.arange(320) % 10, np.arange(100) % 10
    x_train = (rng.integers(0, 128, (320, 32, 32, 3)) + 12 * y_train[:, None, None, None]).astype(np.uint8)
    x_test = (rng.integers(0, 128, (100, 32, 32, 3)) + 12 * y_test[:, None, None, None]).astype(np.uint8)
    np.savez(path, x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test, y_test=y_test.astype(np.uint8))
    return path


@pytest.fixture
def no_defaults(tmp_path, monkeypatch):
    """No CIFAR-10 anywhere by default: an empty cwd, HOME and repo root, and no $ATTENUATION_DATA."""
    from attenuation import data

    for name in ("cwd", "home", "repo"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    return tmp_path

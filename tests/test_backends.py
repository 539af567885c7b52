"""The backend interface (attenuation.ops.backends.Backend) and the registry that checks it."""
from types import SimpleNamespace

import pytest
import torch

from attenuation.ops import backends, reference


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    monkeypatch.setattr(backends, "_PREFERENCE", {k: list(v) for k, v in backends._PREFERENCE.items()})
    return backends


def _ops_of(module, names):
    return SimpleNamespace(**{name: getattr(module, name) for name in names})


def test_the_interface_lists_the_five_required_ops_and_the_record_holds_every_op():
    assert set(backends.REQUIRED_OPS) == {"filter_norms", "select_weak", "attenuate_", "zero_removed_",
                                          "masked_conv2d"}
    fields = set(backends.Registered.__dataclass_fields__) - {"name"}
    assert fields == set(backends.REQUIRED_OPS) | set(backends.OPTIONAL_OPS)


@pytest.mark.parametrize("name", backends.available_backends())
def test_every_registered_backend_conforms(name):
    registered = backends._BACKENDS[name]
    for op in (*backends.REQUIRED_OPS, *backends.OPTIONAL_OPS):
        assert callable(getattr(registered, op)), op


@pytest.mark.parametrize("missing", backends.REQUIRED_OPS)
def test_registering_a_backend_without_a_required_op_names_it(registry, missing):
    incomplete = _ops_of(reference, [op for op in registry.REQUIRED_OPS if op != missing])
    with pytest.raises(TypeError, match=f"does not provide the op\\(s\\) {missing} "):
        registry.register_backend("incomplete", incomplete, device_types=("cpu",))
    assert "incomplete" not in registry.available_backends()
    assert "incomplete" not in registry._PREFERENCE["cpu"]


def test_a_backend_without_an_optional_op_gets_the_reference_one(registry):
    registry.register_backend("bare", _ops_of(reference, registry.REQUIRED_OPS), device_types=())
    cpu = torch.device("cpu")
    assert registry.get_op("bare", cpu, "select_weak_global") is reference.select_weak_global
    assert registry.get_op("bare", cpu, "filter_norms") is reference.filter_norms


def test_a_backend_s_own_optional_op_is_used(registry):
    own = _ops_of(reference, registry.REQUIRED_OPS)
    own.select_weak_global = lambda *args: "own"
    registry.register_backend("own", own, device_types=())
    assert registry.get_op("own", torch.device("cpu"), "select_weak_global")() == "own"


def test_get_op_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'filter_norm'"):
        backends.get_op("reference", torch.device("cpu"), "filter_norm")

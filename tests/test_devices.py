"""The precision a run computes in: ``auto`` follows whether the device computes bfloat16 natively."""
import pytest
import torch

from attenuation.config import preset_config
from attenuation.devices import describe_device, native_bfloat16, resolve_precision
from attenuation.models import vgg
from attenuation.train import autocast_for, evaluate

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)])
def test_auto_is_bfloat16_exactly_where_the_cpu_computes_it_natively(monkeypatch, avx512_bf16, amx):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    native = avx512_bf16 or amx
    assert native_bfloat16(CPU) == native
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if native else None)
    assert resolve_precision("float32", CPU) is None  # whatever the processor
    assert resolve_precision("bfloat16", CPU) == torch.bfloat16


def test_unknown_precisions_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown precision 'fp16'.*auto, float32, bfloat16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        preset_config("smoke", precision="half")


def test_reports_name_the_precision():
    assert describe_device(CPU).endswith("float32)")
    assert describe_device(CPU, torch.bfloat16).endswith("bfloat16 autocast)")


def test_evaluation_runs_in_the_precision_asked():
    """bfloat16 autocast changes the logits (rounding) but not what they say; float32 is exact."""
    torch.manual_seed(0)
    model = vgg(11, 0.125).eval()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad():
        exact = model(x)
        with autocast_for(CPU, torch.bfloat16):
            rounded = model(x)
        with autocast_for(CPU, None):
            plain = model(x)
    assert rounded.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.equal(plain, exact) and not torch.equal(rounded.float(), exact)
    torch.testing.assert_close(rounded.float(), exact, rtol=0.05, atol=0.05)
    loss, _ = evaluate(model, [(x, y)], torch.bfloat16)
    reference = torch.nn.functional.cross_entropy(rounded.float(), y).item()
    assert loss == pytest.approx(reference, rel=1e-5)

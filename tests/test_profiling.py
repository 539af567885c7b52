import pytest
import torch
from torch import nn

from attenuation.models import vgg
from attenuation.profiling import count_macs, count_parameters, measure_latency, time_in_turns


class LiveConv(nn.Conv2d):
    """Stand-in for the project's masked conv: a Conv2d carrying live masks."""

    def __init__(self, *args, live_out, live_in=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("live_out", live_out)
        self.register_buffer("live_in", live_in)


def test_vgg16_full_width_cost():
    model = vgg(16)
    assert count_parameters(model) == pytest.approx(14.7e6, rel=0.01)
    assert count_macs(model) == pytest.approx(313e6, rel=0.01)


def test_count_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 6, bias=False))
    assert count_parameters(model) == 4 * 3 * 9 + 4 + 5 * 6
    shared = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(shared, shared)) == 12


def test_conv_and_linear_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, stride=2, groups=4),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    expected = 8 * 8 * 8 * 3 * 9 + 3 * 3 * 4 * 2 * 9 + 36 * 5
    assert count_macs(model, (1, 3, 8, 8)) == expected
    assert count_macs(model, (4, 3, 8, 8)) == expected  # per image


def test_linear_leading_dims():
    assert count_macs(nn.Linear(4, 5), input_size=(2, 3, 4)) == 3 * 4 * 5


def test_live_only():
    live_out = torch.tensor([True, False, True, True, False, False, True, False])
    live_in = torch.tensor([True, False, True])
    full = 8 * 8 * 8 * 3 * 9
    model = nn.Sequential(LiveConv(3, 8, 3, padding=1, live_out=live_out, live_in=live_in))
    assert count_macs(model, (1, 3, 8, 8)) == full
    assert count_macs(model, (1, 3, 8, 8), live_only=True) == 8 * 8 * 4 * 2 * 9
    model = nn.Sequential(LiveConv(3, 8, 3, padding=1, live_out=live_out))  # live_in None
    assert count_macs(model, (1, 3, 8, 8), live_only=True) == 8 * 8 * 4 * 3 * 9


def test_live_only_ignores_linear_masks():
    linear = nn.Linear(4, 5)
    linear.live_out = torch.zeros(5, dtype=torch.bool)
    assert count_macs(linear, (1, 4), live_only=True) == 20


def test_bad_live_mask():
    model = LiveConv(3, 8, 3, live_out=torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="live_out"):
        count_macs(model, (1, 3, 8, 8), live_only=True)


def test_count_macs_keeps_modes_dtype_and_hooks():
    model = vgg(11, width=0.125).double()
    model.train()
    model.features[1].eval()
    stats = model.features[1].running_mean.clone()
    count_macs(model)
    assert model.training and not model.features[1].training and model.features[4].training
    assert torch.equal(model.features[1].running_mean, stats)
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        count_macs(nn.Linear(2, 2), input_size=(0, 2))


def test_measure_latency():
    model = vgg(11, width=0.125)
    model.train()
    result = measure_latency(model, batch_size=2, warmup=1, repeats=3)
    assert set(result) == {"median_ms", "min_ms", "batch_size", "device"}
    assert 0 < result["min_ms"] <= result["median_ms"]
    assert result["batch_size"] == 2 and result["device"] == "cpu"
    assert model.training


def test_measure_latency_channels_last_and_autocast():
    model = vgg(11, width=0.125)
    result = measure_latency(model, batch_size=2, warmup=0, repeats=1, channels_last=True,
                             autocast_dtype=torch.bfloat16)
    assert result["median_ms"] > 0
    assert model.features[0].weight.is_contiguous()  # the model itself is untouched


@pytest.mark.parametrize("kwargs, match", [
    ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"batch_size": 0}, "batch_size"),
    ({"device": "cuda"}, "move the model"),
])
def test_measure_latency_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_latency(nn.Linear(3, 3), input_size=(3,), **kwargs)


def test_time_in_turns_times_copies_and_leaves_everything_as_it_was():
    torch.manual_seed(0)
    big, small = vgg(11, width=0.125), vgg(11, width=0.0625)
    small.eval()
    before = {name: [t.clone() for t in m.state_dict().values()] for name, m in (("big", big), ("small", small))}
    rng = torch.random.get_rng_state()
    times = time_in_turns({"big": big, "small": small}, batch_size=4, warmup=1, repeats=2,
                          channels_last=True, autocast_dtype=torch.bfloat16)
    assert list(times) == ["big", "small"]
    for kinds in times.values():
        assert set(kinds) == {"forward_ms", "train_step_ms"}
        assert all(value > 0 for value in kinds.values())
    # the models' weights, BatchNorm statistics and modes, and the global generator are untouched
    for name, model in (("big", big), ("small", small)):
        assert all(torch.equal(a, b) for a, b in zip(before[name], model.state_dict().values()))
    assert big.training and not small.training
    assert big.features[0].weight.is_contiguous()
    assert torch.equal(rng, torch.random.get_rng_state())


@pytest.mark.parametrize("kwargs, match", [
    ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"batch_size": 0}, "batch_size"),
    ({"models": {}}, "at least one model"),
    ({"models": {"a": nn.Linear(3, 3), "b": nn.Linear(3, 3).to("meta")}}, "one device: b"),
])
def test_time_in_turns_errors(kwargs, match):
    models = kwargs.pop("models", {"a": nn.Linear(3, 3)})
    with pytest.raises(ValueError, match=match):
        time_in_turns(models, input_size=(3,), **kwargs)

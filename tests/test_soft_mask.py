"""attenuate="output", the straight-through soft mask (docs/METHOD.md, "The straight-through soft
mask"), against a literal statement of its rule on fresh random inputs."""
import copy

import pytest
import torch
import torch.nn as nn

from attenuation import ops
from attenuation import Pruner, PruningConfig
from attenuation.surgery import remove_filters

ACTIVE, WEAK, REMOVED = ops.ACTIVE, ops.WEAK, ops.REMOVED


def _net(width=6, bn=True):
    norm = nn.BatchNorm2d if bn else (lambda n: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 4)).double()


def _config(**kwargs):
    return PruningConfig(attenuate="output", ratio=0.5, ramp="constant", interval=1, **kwargs)


def _parameters(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("live_out")}


@pytest.mark.parametrize("bn", [True, False])
def test_a_step_scales_only_the_outputs_of_weak_channels(bn):
    torch.manual_seed(0)
    model = _net(bn=bn)
    pruner = Pruner(model, _config(factor=0.5))
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    model.eval()
    before = _parameters(model)
    first = (model[1] if bn else model[0])(model[0](x)) if bn else model[0](x)
    pruner.start(10)
    pruner.step()
    assert all(torch.equal(before[k], v) for k, v in _parameters(model).items())  # no parameter scaled
    weak = pruner.status[:6] == WEAK
    assert int(weak.sum()) == 3
    after = model[1](model[0](x)) if bn else model[0](x)
    expected = first * torch.where(weak, 0.5, 1.0).double().view(1, -1, 1, 1)
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-12)


def test_the_backward_pass_goes_straight_through():
    """The parameters' gradients are those of the unmasked channels' outputs receiving the
    gradient that reaches the masked outputs: d loss / d z := d loss / d (m z)."""
    torch.manual_seed(1)
    model = _net()
    pruner = Pruner(model, _config(factor=0.3))
    pruner.start(10)
    pruner.step()
    pruner.step()  # m = 0.09 for the weak channels
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model.zero_grad()
    model(x).square().sum().backward()
    got = model[0].weight.grad.clone()

    plain = copy.deepcopy(model)
    plain[1]._forward_hooks.clear()  # the first layer's mask, written out below; the second's stays
    m = pruner._filter_multiplier[:6].double().view(1, -1, 1, 1)
    z = plain[1](plain[0](x))
    masked = (z * m).detach().requires_grad_()
    loss = plain[2:](masked).square().sum()
    (upstream,) = torch.autograd.grad(loss, masked)
    plain.zero_grad()
    z.backward(upstream)
    torch.testing.assert_close(got, plain[0].weight.grad, rtol=1e-10, atol=1e-12)
    assert (m < 1).any()


def test_return_gives_the_full_output_back_and_removal_zeroes_the_filter():
    torch.manual_seed(2)
    model = _net()
    pruner = Pruner(model, _config(factor=0.5, eps=0.2))
    pruner.start(10)
    with torch.no_grad():
        model[0].weight[:3] *= 0.01  # filters 0-2 the weakest
    pruner.step()
    assert (pruner.status[:3] == WEAK).all()
    with torch.no_grad():  # filter 0 grows strong, filter 5 falls: the selection swaps them
        model[0].weight[0] *= 1000
        model[0].weight[5] *= 0.001
    pruner.step()
    assert pruner.status[0] == ACTIVE and pruner.multiplier[0] == 1.0 and pruner.returns[0] == 1
    pruner.step()  # 0.5^3 < 0.2: filters 1 and 2 are removed
    assert (pruner.status[1:3] == REMOVED).all()
    assert model[0].weight[1:3].abs().sum() == 0 and model[1].weight[1:3].abs().sum() == 0
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    model.eval()
    out = model[1](model[0](x))
    assert out[:, 1:3].abs().max() == 0


def test_the_removed_network_computes_what_the_masked_one_does():
    torch.manual_seed(3)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(model, _config(factor=0.7, eps=0.3))
    pruner.start(8)
    for _ in range(8):
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8, dtype=torch.float64)).logsumexp(1).sum().backward()
        opt.step()
        pruner.step()
    pruner.finish()
    assert pruner.n_removed == 9 and set(pruner.multiplier.tolist()) <= {0.0, 1.0}
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    model.eval()
    masked = model(x)
    pruner.remove_hooks()
    removed = remove_filters(model, pruner.keep_masks()).eval()
    torch.testing.assert_close(removed(x), masked, rtol=1e-10, atol=1e-12)


def test_a_state_round_trip_keeps_the_masks():
    torch.manual_seed(4)
    model = _net()
    pruner = Pruner(model, _config(factor=0.5))
    pruner.start(10)
    pruner.step()
    state = copy.deepcopy(pruner.state_dict())
    weights = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.eval()
    expected = model(x)
    fresh = _net()
    again = Pruner(fresh, _config(factor=0.5))
    fresh.load_state_dict(weights)
    again.load_state_dict(state)
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("field", ["reversible", "unattenuated_scores"])
def test_score_options_that_undo_a_parameter_scaling_are_refused(field):
    with pytest.raises(ValueError, match="scales no parameter"):
        _config(**{field: True})

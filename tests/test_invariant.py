"""The invariant (docs/METHOD.md, "The invariant"), through the engine: the pruned (masked,
zeroed) VGG computes exactly what its physically removed version computes, in train and in eval
mode."""
import copy

import pytest
import torch
import torch.nn.functional as F

from attenuation.methods import method_config
from attenuation.models import vgg
from attenuation.pruner import Pruner
from attenuation.surgery import remove_filters


@pytest.mark.parametrize("method", ["attenuation", "hard", "sfp"])
@pytest.mark.parametrize("round_to", [1, 8])
def test_pruned_model_equals_removed_model(method, round_to):
    torch.manual_seed(0)
    model = vgg(11, width=0.125).double()
    pruner = Pruner(model, method_config(method, ratio=0.5, interval=1, criterion="random"))
    pruner.start(6, steps_per_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(6):
        x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
    pruner.finish()
    assert any(not bool(layer.conv.live_out.all()) for layer in pruner.layers)
    removed = remove_filters(copy.deepcopy(model), pruner.keep_masks(), round_to=round_to)
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        removed.train(train)
        torch.testing.assert_close(removed(x), model(x), rtol=1e-9, atol=1e-9)
    for conv in (m for m in removed.modules() if isinstance(m, torch.nn.Conv2d)):
        assert conv.out_channels % round_to == 0 or conv.out_channels == 1 or round_to == 1

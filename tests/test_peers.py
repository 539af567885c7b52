"""The peer tools of the benchmark suite (bench/peers.py), given the filters that the project's
pruner removes, build networks that agree with ``surgery.remove_filters``: torch.nn.utils.prune
computes the same function at the full size, Torch-Pruning the same function at the same size."""
import copy

import pytest
import torch

from attenuation.models import vgg
from attenuation.profiling import count_macs, count_parameters
from attenuation.surgery import remove_filters
from bench.peers import (apply_torch_prune, conv_bn_pairs, remove_torch_prune, torch_pruning_graph,
                         torch_pruning_remove)
from bench.workload import prune_hard

RATIO = 0.5


@pytest.fixture
def job():
    """(unpruned VGG-11 x0.125, the project's keep masks at RATIO, its removed network, a batch)."""
    torch.manual_seed(0)
    original = vgg(11, width=0.125)
    ours = copy.deepcopy(original)
    pruner = prune_hard(ours, RATIO)
    keep = [mask.clone() for mask in pruner.keep_masks()]
    pruner.remove_hooks()
    removed = remove_filters(ours, keep).eval()
    return original, keep, removed, torch.randn(4, 3, 32, 32)


def test_ln_structured_chooses_our_filters_and_computes_the_removed_network(job):
    original, keep, removed, x = job
    model = copy.deepcopy(original)
    assert apply_torch_prune(model, keep)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), removed(x))
    remove_torch_prune(model)
    # made permanent, but not smaller: the dropped filters are rows of zeros
    assert count_parameters(model) == count_parameters(original)
    assert count_macs(model) == count_macs(original)
    for (conv, _), mask in zip(conv_bn_pairs(model), keep):
        assert torch.equal(conv.weight.flatten(1).ne(0).any(1), mask)
    with torch.no_grad():
        torch.testing.assert_close(model(x), removed(x))


def test_torch_pruning_removes_to_our_network(job):
    pytest.importorskip("torch_pruning")
    original, keep, removed, x = job
    model = copy.deepcopy(original)
    torch_pruning_remove(model, torch_pruning_graph(model, x[:1]), keep)
    model.eval()
    assert count_parameters(model) == count_parameters(removed)
    assert count_macs(model) == count_macs(removed)
    assert [c.weight.shape for c, _ in conv_bn_pairs(model)] == \
        [c.weight.shape for c, _ in conv_bn_pairs(removed)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), removed(x))

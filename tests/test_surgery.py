import copy
import os

import pytest
import torch
from torch import nn

from attenuation.models import VGG, vgg
from attenuation.surgery import PRUNED_FORMAT, load_pruned, remove_filters, save_pruned

TOL = dict(rtol=1e-9, atol=1e-9)


def convs_and_bns(model):
    feats = list(model.features)
    return [(m, feats[i + 1]) for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]


def zero_filters(model, keep):
    """Zero the dropped filters (weight row, bias, gamma, beta) of every conv."""
    with torch.no_grad():
        for (conv, bn), k in zip(convs_and_bns(model), keep):
            conv.weight[~k] = 0
            if conv.bias is not None:
                conv.bias[~k] = 0
            bn.weight[~k] = 0
            bn.bias[~k] = 0


def random_keep(model, generator, frac=0.4):
    keep = []
    for conv, _ in convs_and_bns(model):
        k = torch.rand(conv.out_channels, generator=generator) > frac
        k[torch.randint(conv.out_channels, (1,), generator=generator)] = True  # never empty
        keep.append(k)
    return keep


def zeroed_vgg(seed=0, config=None):
    """A float64 VGG with random filters zeroed and non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = (vgg(11, width=0.125) if config is None else VGG(config)).double()
    with torch.no_grad():
        for _, bn in convs_and_bns(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    keep = random_keep(model, torch.Generator().manual_seed(seed))
    zero_filters(model, keep)
    model.train()
    model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    return model, keep


def kept_slices(model, keep):
    """The parameters of `model` restricted to the kept filters, in parameter order."""
    out, prev = [], None
    for (conv, bn), k in zip(convs_and_bns(model), keep):
        w = conv.weight[k]
        out += [w if prev is None else w[:, prev], bn.weight[k], bn.bias[k]]
        prev = k
    return out + [model.classifier.weight[:, prev], model.classifier.bias]


def assert_same_function(model, small, keep):
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model.train(), small.train()
    torch.testing.assert_close(small(x), model(x), **TOL)
    for (conv, bn), k, (_, small_bn) in zip(convs_and_bns(model), keep, convs_and_bns(small)):
        # A conv bias is folded into the running mean (it only shifts the batch mean).
        shift = 0 if conv.bias is None else conv.bias[k]
        torch.testing.assert_close(small_bn.running_mean, bn.running_mean[k] - shift, **TOL)
        torch.testing.assert_close(small_bn.running_var, bn.running_var[k], **TOL)
        assert torch.equal(small_bn.num_batches_tracked, bn.num_batches_tracked)
    model.eval(), small.eval()
    torch.testing.assert_close(small(x), model(x), **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_removal_invariant(seed):
    model, keep = zeroed_vgg(seed)
    small = remove_filters(model)
    assert type(small) is VGG and small.training
    assert [c.out_channels for c, _ in convs_and_bns(small)] == [int(k.sum()) for k in keep]
    assert all(type(c) is nn.Conv2d for c, _ in convs_and_bns(small))
    assert all(p.dtype == torch.float64 for p in small.state_dict().values()
               if p.is_floating_point())
    assert_same_function(model, small, keep)


def test_explicit_keep_and_eval_mode_kept():
    model, keep = zeroed_vgg(2)
    model.eval()
    small = remove_filters(model, keep=keep)
    assert not small.training
    assert_same_function(model, small, keep)


def test_result_is_independent_of_original():
    model, keep = zeroed_vgg(3)
    small = remove_filters(model)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    small(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_partly_zeroed_filter_is_kept():
    model = vgg(11, width=0.125)
    with torch.no_grad():
        model.features[0].weight[0] = 0  # gamma and beta still non-zero
        model.features[1].weight[1] = 0
        model.features[1].bias[1] = 0  # weight row still non-zero
    assert remove_filters(model).features[0].out_channels == 8


def test_round_to():
    config = [12, "M", 20, "M", 16, "M", 9, "M", 8, "M"]
    model, keep = zeroed_vgg(4, config)
    small = remove_filters(model, round_to=8)
    counts = [c.out_channels for c, _ in convs_and_bns(small)]
    for count, k, size in zip(counts, keep, [12, 20, 16, 9, 8]):
        assert count % 8 == 0 or count == size
        assert int(k.sum()) <= count < int(k.sum()) + 8
    # The extra filters are the lowest-index dropped (zero) ones.
    rounded = []
    for k, count in zip(keep, counts):
        k = k.clone()
        k[(~k).nonzero().flatten()[:count - int(k.sum())]] = True
        rounded.append(k)
    assert_same_function(model, small, rounded)


def test_conv_subclass_with_bias_is_folded():
    class MaskedConv(nn.Conv2d):
        def __init__(self, conv):
            super().__init__(conv.in_channels, conv.out_channels, 3, padding=1, bias=True)
            self.register_buffer("live_out", torch.ones(conv.out_channels, dtype=torch.bool))

    model, keep = zeroed_vgg(5)
    for i, m in enumerate(model.features):
        if isinstance(m, nn.Conv2d):
            new = MaskedConv(m).double()
            with torch.no_grad():
                new.weight.copy_(m.weight)
                new.bias.uniform_(-1, 1)
            model.features[i] = new
    zero_filters(model, keep)
    for _ in range(2):
        model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    small = remove_filters(model, optimizer=opt)
    assert opt.param_groups[0]["params"] == list(small.parameters())
    assert_same_function(model, small, keep)


def sgd_step(model, opt, x, y, keep=None):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if keep is not None:
        zero_filters(model, keep)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
], ids=["sgd", "adam", "adamw-amsgrad"])
def test_optimizer_state_is_sliced(make_opt):
    model, keep = zeroed_vgg(6)
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = make_opt([{"params": list(model.parameters())}, {"params": [extra]}])
    batches = [(torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(10, (4,)))
               for _ in range(4)]
    for x, y in batches[:3]:
        extra.grad = torch.ones_like(extra)
        sgd_step(model, opt, x, y, keep)

    ref = copy.deepcopy(model)
    ref_opt = make_opt([{"params": list(ref.parameters())}, {"params": [extra.detach().clone()]}])
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # not sharing `step`
    extra_state = {k: v.clone() for k, v in opt.state[extra].items()}

    small = remove_filters(model, optimizer=opt)
    assert opt.param_groups[0]["params"] == list(small.parameters())
    assert opt.param_groups[1]["params"] == [extra]
    assert all(torch.equal(opt.state[extra][k], v) for k, v in extra_state.items())
    assert not any(p in opt.state for p in model.parameters())

    x, y = batches[3]
    sgd_step(ref, ref_opt, x, y)
    sgd_step(small, opt, x, y)
    for got, want in zip(small.parameters(), kept_slices(ref, keep)):
        torch.testing.assert_close(got, want, **TOL)


def test_save_load_round_trip(tmp_path):
    model, _ = zeroed_vgg(7)
    small = remove_filters(model)
    path = tmp_path / "pruned.pt"
    save_pruned(small, path)
    assert os.listdir(tmp_path) == ["pruned.pt"]  # no temp file left behind
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == PRUNED_FORMAT and checkpoint["spec"] == small.spec()
    del model
    loaded = load_pruned(path)
    assert isinstance(loaded, VGG) and loaded.spec() == small.spec()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    small.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.parameters())
    save_pruned(loaded, path)  # overwriting is fine
    assert load_pruned(str(path)).spec() == small.spec()


def test_save_writes_a_plain_file_atomically(tmp_path, monkeypatch):
    small = remove_filters(zeroed_vgg(3)[0])
    saved = os.umask(0o022)
    try:
        save_pruned(small, tmp_path / "pruned.pt")
    finally:
        os.umask(saved)
    assert os.stat(tmp_path / "pruned.pt").st_mode & 0o777 == 0o644  # as open() makes it
    before = (tmp_path / "pruned.pt").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(vgg(11, width=0.125), tmp_path / "pruned.pt")
    assert (tmp_path / "pruned.pt").read_bytes() == before and os.listdir(tmp_path) == ["pruned.pt"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pruned(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_pruned(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not an"):
        load_pruned(other)
    model = vgg(11, width=0.125)
    mismatched = tmp_path / "mismatched.pt"
    save_pruned(model, mismatched)
    checkpoint = torch.load(mismatched, weights_only=True)
    checkpoint["spec"]["config"][0] = 5
    torch.save(checkpoint, mismatched)
    with pytest.raises(ValueError, match="does not match"):
        load_pruned(mismatched)


def test_save_needs_spec(tmp_path):
    with pytest.raises(TypeError, match="spec"):
        save_pruned(nn.Linear(2, 2), tmp_path / "x.pt")


def test_keep_errors():
    model = vgg(11, width=0.125)
    keep = [torch.ones(c.out_channels, dtype=torch.bool) for c, _ in convs_and_bns(model)]
    with pytest.raises(ValueError, match="7 masks but the model has 8"):
        remove_filters(model, keep=keep[:-1])
    with pytest.raises(TypeError, match="bool"):
        remove_filters(model, keep=[k.float() for k in keep])
    with pytest.raises(ValueError, match="shape"):
        remove_filters(model, keep=[keep[0][:-1]] + keep[1:])
    with pytest.raises(TypeError, match="list"):
        remove_filters(model, keep=keep[0])
    with pytest.raises(ValueError, match="round_to"):
        remove_filters(model, round_to=0)
    keep[1] = torch.zeros_like(keep[1])
    with pytest.raises(ValueError, match=r"features\.4 .*no filter"):
        remove_filters(model, keep=keep)


def test_all_zero_layer_is_an_error():
    model = vgg(11, width=0.125)
    zero_filters(model, [torch.zeros(c.out_channels, dtype=torch.bool) if i == 0 else
                         torch.ones(c.out_channels, dtype=torch.bool)
                         for i, (c, _) in enumerate(convs_and_bns(model))])
    with pytest.raises(ValueError, match=r"features\.0"):
        remove_filters(model)


class TinyResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Linear(4, 10)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)),
                                   TinyResNetish()], ids=["sequential", "1x1-conv"])
def test_non_vgg_is_not_implemented(model):
    with pytest.raises(NotImplementedError, match="VGG-only"):
        remove_filters(model)

"""Compaction (Pruner.compact, RunConfig.compact): the removed channels cut out of the training
network while it trains. A compacting run equals a non-compacting one up to rounding (float64
here): the final network, every channel's fate, the status history and the keep masks, in the
original numbering."""
import copy
import functools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attenuation import run as run_module
from attenuation.config import preset_config
from attenuation.data import DeviceLoader
from attenuation.methods import method_config
from attenuation.models import create_model
from attenuation.modules import AttenuatedConv2d
from attenuation.profiling import count_parameters
from attenuation.pruner import Pruner
from attenuation.run import Run, run
from attenuation.surgery import build_pruned, pruned_architecture, remove_filters


class Inverted(nn.Module):
    """A stem, an inverted residual block (expand, depthwise, project, added to the stem) and a
    concat of the block's output with the stem's, read by a conv: adds, a depthwise conv and a
    concat in the groups."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.project, self.bn3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head, self.bn4 = nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        y = self.bn3(self.project(y)) + x
        z = F.relu(self.bn4(self.head(torch.cat([y, x], 1))))
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = Inverted() if name == "inverted" else create_model(name, 0.125 if name.startswith("vgg") else 0.25)
    return model.double()


# (method, overrides): every preset; removals during the phase (attenuation with a = 0.5, eps =
# 0.2: three weak steps), the global scope, hysteresis, returns (reversible, random scores), the
# criteria that read weights (fpgm), gradients (taylor) and BatchNorms (bn_taylor), and the
# straight-through soft mask (its output masks are forward hooks on the modules)
CASES = {
    "attenuation": ("attenuation", dict(factor=0.5, eps=0.2)),
    "iterative": ("iterative", {}),
    "hard": ("hard", {}),
    "sfp": ("sfp", {}),
    "global": ("iterative", dict(scope="global")),
    "hysteresis": ("attenuation", dict(factor=0.5, eps=0.2, reversible=True, return_after=2,
                                       return_margin=0.05)),
    "random": ("attenuation", dict(criterion="random", factor=0.5, eps=0.2, reversible=True)),
    "fpgm": ("iterative", dict(criterion="fpgm", ramp="linear")),
    "taylor": ("attenuation", dict(criterion="taylor", factor=0.5, eps=0.2)),
    "bn_taylor": ("attenuation", dict(criterion="bn_taylor", factor=0.5, eps=0.2, group_reduce="max")),
    "output": ("attenuation", dict(attenuate="output", factor=0.5, eps=0.2)),
}
EPOCH, PHASE_EPOCHS, RECOVERY_EPOCHS = 6, 4, 1


def _setup(name: str, case: str):
    method, overrides = CASES[case]
    model = _model(name)
    pruner = Pruner(model, method_config(method, **{"criterion": "l1", "ratio": 0.5, "interval": 2,
                                                    **overrides}), seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    pruner.start(PHASE_EPOCHS * EPOCH, EPOCH)
    return model, pruner, optimizer


def _epochs(model, pruner, optimizer, data: torch.Generator, epochs: range, compact: bool, round_to: int = 1):
    """Epochs of the attenuation phase (PHASE_EPOCHS of them) and of recovery on fresh random
    batches; with ``compact``, compaction at every epoch's end (after the phase's end in its last
    epoch), as ``attenuation run`` does. Returns the model and its parameter count after each epoch."""
    sizes = []
    for epoch in epochs:
        for _ in range(EPOCH):
            x = torch.randn(4, 3, 32, 32, generator=data, dtype=torch.float64)
            y = torch.randint(0, 10, (4,), generator=data)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pruner.step()
        if epoch == PHASE_EPOCHS - 1:
            pruner.finish()
        if compact:
            model = pruner.compact(model, optimizer, round_to=round_to)
        sizes.append(sum(p.numel() for p in model.parameters()))
    return model, sizes


def _train(name: str, case: str, compact: bool, round_to: int = 1):
    """The attenuation phase and a recovery epoch: the model, its pruner and the parameter counts."""
    model, pruner, optimizer = _setup(name, case)
    model, sizes = _epochs(model, pruner, optimizer, torch.Generator().manual_seed(1),
                           range(PHASE_EPOCHS + RECOVERY_EPOCHS), compact, round_to)
    return model, pruner, sizes


def _assert_same_run(plain, compacted, round_to: int = 1):
    (model_a, a, _), (model_b, b, _) = plain, compacted
    assert a.fates() == b.fates()
    history_a, history_b = a.status_history(), b.status_history()
    assert history_a.keys() == history_b.keys()
    assert all(torch.equal(history_a[k], history_b[k]) for k in history_a)
    assert a.history_steps == b.history_steps
    assert all(torch.equal(x, y) for x, y in zip(a.keep_masks(), b.keep_masks()))
    assert (a.counts, a.offsets, a.n_removed, a.live_fraction(), a.total_returns()) == \
        (b.counts, b.offsets, b.n_removed, b.live_fraction(), b.total_returns())
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    a.remove_hooks(), b.remove_hooks()  # as the run does before the removal (output masks are module hooks)
    final_a = remove_filters(model_a, a.keep_masks(), round_to=round_to)
    final_b = remove_filters(model_b, b.model_keep_masks(), round_to=round_to)
    state_a, state_b = final_a.state_dict(), final_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-8, atol=1e-10, msg=key)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    final_a.eval(), final_b.eval()
    torch.testing.assert_close(final_b(x), final_a(x), rtol=1e-8, atol=1e-10)


def _matrix():
    """Every case on every model; in the fast suite the presets, the global scope, hysteresis and
    the random criterion on a VGG and a ResNet with shortcut B, and two cases on the ResNet with
    shortcut A (unprunable chains) and the inverted residual."""
    for name in ("vgg11", "resnet20b", "resnet20", "inverted"):
        for case in sorted(CASES):
            fast = case in ("attenuation", "global") or (
                name in ("vgg11", "resnet20b") and case not in ("fpgm", "taylor", "bn_taylor", "output"))
            yield pytest.param(name, case, marks=[] if fast else [pytest.mark.slow])


@pytest.mark.parametrize("name, case", _matrix())
def test_a_compacting_run_equals_a_masked_one(name, case):
    plain, compacted = _train(name, case, compact=False), _train(name, case, compact=True)
    _assert_same_run(plain, compacted)
    sizes = compacted[2]
    assert sizes[-1] < plain[2][-1]  # it did cut
    if case not in ("sfp", "hard"):  # removals during the phase: the training network shrank in it
        assert sizes[1] < sizes[0] or sizes[0] < plain[2][0]
    pruner = compacted[1]
    assert pruner.n_removed > 0 and pruner.original.n_cut == pruner.n_removed  # all cut at the end
    if case == "random":  # returns, some of them of channels removed (and cut) later
        assert any(r > 0 and at >= 0 for fate in pruner.fates() for r, at in zip(fate["returns"], fate["removed_at"]))
    assert all(isinstance(m, AttenuatedConv2d) for m in compacted[0].modules() if isinstance(m, nn.Conv2d))


def test_round_to_keeps_back_what_the_final_removal_rounds_up_with():
    """With the final removal's round_to, compaction leaves each group's round_to - 1 lowest
    removed channels in (masked), so that the rounded network is the one without compaction."""
    plain, compacted = _train("vgg11", "iterative", False), _train("vgg11", "iterative", True, round_to=4)
    _assert_same_run(plain, compacted, round_to=4)
    pruner = compacted[1]
    # every conv of this VGG lost at least 3 filters: 3 of them stay in each, the rest are cut
    assert [int((~mask).sum()) for mask in pruner.model_keep_masks()] == [3] * len(pruner.counts)
    assert pruner.original.n_cut == pruner.n_removed - 3 * len(pruner.counts)


def test_a_compacted_pruner_resumes_exactly_from_its_state():
    """The state of a compacted pruner (with its original numbering), the model rebuilt from its
    architecture and the optimizer's state continue bitwise as the uninterrupted training."""
    model, pruner, optimizer = _setup("resnet20b", "random")
    data = torch.Generator().manual_seed(1)
    model, _ = _epochs(model, pruner, optimizer, data, range(2), compact=True)
    assert pruner.original.n_cut > 0
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), pruner.state_dict(), data.get_state()))
    architecture = pruned_architecture(model)
    model, _ = _epochs(model, pruner, optimizer, data, range(2, PHASE_EPOCHS + 1), compact=True)

    resumed = build_pruned(architecture).double()
    method, overrides = CASES["random"]
    again = Pruner(resumed, method_config(method, **{"ratio": 0.5, "interval": 2, **overrides}))
    resumed.load_state_dict(saved[0])
    again.load_state_dict(saved[2])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.02, momentum=0.9, nesterov=True,
                                        weight_decay=5e-4)
    resumed_optimizer.load_state_dict(saved[1])
    resumed, _ = _epochs(resumed, again, resumed_optimizer, torch.Generator().set_state(saved[3]),
                         range(2, PHASE_EPOCHS + 1), compact=True)
    assert again.fates() == pruner.fates() and again.total_returns() == pruner.total_returns() > 0
    assert all(torch.equal(again.status_history()[k], v) for k, v in pruner.status_history().items())
    a, b = model.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compact_refuses_another_model_and_leaves_an_unpruned_one():
    model, pruner, optimizer = _setup("vgg11", "iterative")
    assert pruner.compact(model, optimizer) is model  # nothing removed yet
    with pytest.raises(ValueError, match="the model this pruner prunes"):
        pruner.compact(_model("vgg11"))
    with pytest.raises(ValueError, match="round_to must be an int >= 1"):
        pruner.compact(model, round_to=0)
    state = _train("vgg11", "iterative", compact=True)[1].state_dict()
    with pytest.raises(ValueError, match="another model \\(or the model compacted otherwise\\)"):
        pruner.load_state_dict(state)


def test_the_results_keep_the_original_numbering():
    """After compaction: counts, the keep masks and the history have the original sizes, the
    working layout and model_keep_masks the compacted model's."""
    model, pruner, _ = _train("resnet20b", "iterative", compact=True)
    built = Pruner(_model("resnet20b"))
    assert pruner.counts == built.counts != pruner.layout.counts
    assert [m.numel() for m in pruner.keep_masks()] == [layer.conv.out_channels for layer in built.layers]
    assert [m.numel() for m in pruner.model_keep_masks()] == [layer.conv.out_channels for layer in pruner.layers]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(any(layer.conv is conv for conv in convs) for layer in pruner.layers)
    assert all(h.shape[1] == n for h, n in zip(pruner.status_history().values(), pruner.counts))
    assert pruner.live_fraction() == 0.5 and pruner.n_removed == sum(pruner.counts) // 2 == pruner.original.n_cut


# ------------------------------------------------------------------ attenuation run

def _run_config(tiny_npz, out, **overrides):
    return preset_config("smoke", **{"data": str(tiny_npz), "out": str(out), "train_subset": None,
                                     "test_subset": None, "batch_size": 32, "latency_batch": 4,
                                     "epochs": {"baseline": 1, "attenuation": 3, "recovery": 1, "finetune": 1},
                                     **overrides})


@pytest.fixture
def float64_runs(monkeypatch):
    """`attenuation run` in float64: the model and the batches."""
    to_device = Run._to_device
    monkeypatch.setattr(Run, "_to_device", lambda self, model: to_device(self, model).double())
    monkeypatch.setattr(run_module, "DeviceLoader", functools.partial(DeviceLoader, dtype=torch.float64))


def _outputs(out):
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    return (torch.load(out / "model.pt", weights_only=True)["state_dict"],
            json.loads((out / "fates.json").read_text()), checkpoint["state"],
            json.loads((out / "summary.json").read_text()))


RUNS = {  # --model, then the pruning options
    "vgg-attenuation": dict(factor=0.5, eps=0.2, interval=2),
    "vgg-global-hysteresis": dict(scope="global", criterion="random", reversible=True, factor=0.5,
                                  eps=0.2, interval=2, return_after=2),
    "vgg-sfp-round_to": dict(method="sfp", round_to=4),
    "resnet-iterative": dict(model="resnet20b", width=0.25, method="iterative", interval=3),
    "resnet-hard": dict(model="resnet20b", width=0.25, method="hard", interval=3),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name == "vgg-attenuation" else [pytest.mark.slow])
                                  for name in RUNS])
def test_a_compacting_run_reports_what_a_masked_run_reports(tiny_npz, tmp_path, float64_runs, name):
    """The same run with and without --compact (float64): the removed network, fates.json, the
    status history, the metrics and phase figures (params, MACs: the masked network's before
    removal) and summary.json, all but the timings."""
    sizes = {}
    for compact in (False, True):
        the_run = Run(_run_config(tiny_npz, tmp_path / str(compact), compact=compact, **RUNS[name]), progress=False)
        sizes[compact] = []
        the_run.on_epoch = lambda row: sizes[compact].append(count_parameters(the_run.model))
        the_run.execute()
    (model_a, fates_a, state_a, summary_a), (model_b, fates_b, state_b, summary_b) = \
        _outputs(tmp_path / "False"), _outputs(tmp_path / "True")
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        torch.testing.assert_close(model_b[key], model_a[key], rtol=1e-8, atol=1e-10, msg=key)
    assert fates_a == fates_b and summary_a["removed_filters"] > 0
    history_a, history_b = state_a["record"]["history"], state_b["record"]["history"]
    assert all(torch.equal(history_a[k], history_b[k]) for k in history_a) and history_a.keys() == history_b.keys()
    timings = ("wall_seconds", "latency_ms", "seconds", "images_per_second", "pruning_seconds", "speed")
    for a, b in [(summary_a, summary_b), *zip(state_a["metrics"], state_b["metrics"]),
                 *zip(state_a["phases"], state_b["phases"])]:
        a, b = _without(a, timings), _without(b, timings)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12) if "loss" in key else a[key] == b[key], key
    # the masked run trained the model built until the removal; the compacting run cut it at the
    # end of the attenuation phase, or earlier where filters were removed during the phase
    assert sizes[False][:5] == [sizes[False][0]] * 5 and sizes[True][-1] == sizes[False][-1]
    assert sizes[True][4] < sizes[False][4]  # recovery
    if name != "vgg-sfp-round_to":
        assert sizes[True][1] < sizes[False][1]


def _without(row: dict, keys) -> dict:
    return {k: (_without(v, keys) if isinstance(v, dict) else v) for k, v in row.items() if k not in keys}


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [2, 4])
def test_resume_across_compactions_is_bitwise_exact(tiny_npz, tmp_path, stop_after):
    """Interrupted inside the attenuation phase after a compaction, and after its end (compacted
    again); the checkpoint holds the compacted network and the pruner's original numbering."""
    config = dict(factor=0.5, eps=0.2, interval=2, criterion="random", reversible=True)
    full = run(_run_config(tiny_npz, tmp_path / "full", **config), progress=False)
    assert run(_run_config(tiny_npz, tmp_path / "cut", **config), progress=False, stop_after_epochs=stop_after) is None
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["model_spec"] is not None and saved["pruner"]["original"] is not None
    resumed = run(_run_config(tiny_npz, tmp_path / "cut", **config), progress=False, resume=True)
    model_a, fates_a, state_a, _ = _outputs(tmp_path / "full")
    model_b, fates_b, state_b, _ = _outputs(tmp_path / "cut")
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert fates_a == fates_b and full["returns"] == resumed["returns"] > 0
    assert [row["train_loss"] for row in state_a["metrics"]] == [row["train_loss"] for row in state_b["metrics"]]


def test_a_run_compacts_right_after_the_attenuation_steps_that_removed_enough(tiny_npz, tmp_path, monkeypatch):
    """The network shrinks inside an epoch, not only at its end: after an attenuation step that
    removed at least COMPACT_FROM of the channels (and never after a step that removed none)."""
    cuts = []  # (optimizer steps of the phase, share of the channels cut) of each compaction
    compact = Pruner.compact

    def recording(pruner, model, optimizer=None, round_to=1):
        share = pruner.cut_fraction(round_to)
        smaller = compact(pruner, model, optimizer, round_to)
        if smaller is not model:
            cuts.append((pruner.steps_done, share))
        return smaller
    monkeypatch.setattr(Pruner, "compact", recording)
    the_run = Run(_run_config(tiny_npz, tmp_path, factor=0.5, eps=0.2, interval=2), progress=False)
    steps = len(the_run.train_loader)
    the_run.execute()
    inside = [(step, share) for step, share in cuts if step % steps]
    assert inside and all(share >= run_module.COMPACT_FROM and step % 2 == 0 for step, share in inside)

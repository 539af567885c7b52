"""The attenuation engine: one rule (docs/METHOD.md, "The rule") that runs filter attenuation, hard
pruning (one-shot or iterative) and Soft Filter Pruning as special cases ("Special cases")."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .compaction import FATES, OriginalNumbering, kept_back, new_fates
from .criteria import NEEDS_AFFINE_BN, CriterionContext, get_criterion, require_affine_bn
from .layers import GroupMember, ModelGroups, find_groups
from .layout import ChannelLayout
from .modules import convert_model
from .pruning_config import PruningConfig, upgrade_config
from .schedule import ramp_ratio, weak_count
from .surgery import remove_filters
from .transfer import HostCopy, to_device

def _bn_gain(bn: nn.BatchNorm2d) -> Tensor:
    """Per channel, the factor eval mode multiplies the conv's output by: gamma / sqrt(var + eps)."""
    gain = bn.weight.detach().float()
    if bn.running_var is not None:
        gain = gain / (bn.running_var.float() + bn.eps).sqrt()
    return gain.to(bn.weight.dtype)


def _require_affine_or_no_bn(layers: Sequence[GroupMember]) -> None:
    """attenuate="gamma" scales the gamma of the BatchNorm after each conv: refuse a BN without one."""
    missing = [layer.name for layer in layers if layer.bn is not None and layer.bn.weight is None]
    if missing:
        raise ValueError("attenuate='gamma' scales the gamma of the BatchNorm after each conv, but "
                         f"these convs are followed by one without (affine=False): {', '.join(missing)}")


@contextlib.contextmanager
def _known_unprunable():
    """Silence find_groups' warning about unprunable convs: it was given when the pruner was built."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="attenuation: .* convs are left unprunable")
        yield


class Pruner:
    """Scores, attenuates and removes the channel groups of ``model`` (docs/METHOD.md, "Channel
    groups"): the unit of the rule is a group channel, one filter of each conv joined through it.

    Usage: ``pruner.start(total_steps)`` at the start of the pruning phase, ``pruner.step()`` after
    every optimizer step (also during recovery: it keeps removed filters at zero), and
    ``pruner.finish()`` at the end of the phase, which removes the channels still weak.

    The per-unit state (``status``, ``multiplier``, ``steps_weak``, ``returns``, ``removed_at``)
    is per group channel of the model pruned, group after group (``layout.counts``: the groups'
    sizes). ``layers`` are its member convs (module order, as
    :func:`~attenuation.layers.find_groups` lists them); the ops work on their filters, which
    always share their group channel's status and multiplier.

    :meth:`compact` cuts the removed channels out of the model while it trains. The results
    (``counts`` and ``offsets``, ``n_removed``, :meth:`live_fraction`, :meth:`keep_masks`,
    :meth:`fates`, :meth:`status_history`, ``history``) are always in the numbering of the model
    the pruner was built on (``original``), removed channels included.

    ``step()`` reads nothing from the device: an attenuation step starts a copy of the status to
    the host, and its live masks reach the convs at the next ``step()`` (see :meth:`sync_live`).
    The readers (``n_removed``, :meth:`live_fraction`, :meth:`live_masks`, :meth:`keep_masks`,
    :meth:`fates`, ...) are always up to date: those that need the host copy wait for it.
    """

    def __init__(self, model: nn.Module, config: Optional[PruningConfig] = None, *,
                 ignored_layers: Sequence[str] = (), backend: Optional[str] = None, seed: int = 0):
        self.config = (config or PruningConfig()).validate()
        self.backend = backend
        self.ignored_layers = tuple(ignored_layers)
        convert_model(model, backend)
        groups = find_groups(model, self.ignored_layers)
        if not groups.members:
            raise ValueError(f"{type(model).__name__} has no conv to prune; left out: "
                             f"{', '.join(groups.unprunable) or 'none'}")
        self._attach(groups)
        device = self.layers[0].conv.weight.device
        self.original = OriginalNumbering.of(self.layout, device)
        total = self.layout.n_channels
        self.status = torch.zeros(total, dtype=torch.uint8, device=device)
        self.multiplier = torch.ones(total, dtype=torch.float32, device=device)
        # the same per member filter: what the ops read and write
        self._filter_status = self.layout.expand(self.status)
        self._filter_multiplier = self.layout.expand(self.multiplier)
        for key, fates in new_fates(total, device).items():  # steps_weak, returns, removed_at
            setattr(self, key, fates)
        # consecutive attenuation steps a weak channel has been left out by the selection (hysteresis)
        self.steps_left_out = torch.zeros(total, dtype=torch.int32, device=device)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_done = 0          # optimizer steps seen since start()
        self.total_steps = 0         # length of the pruning phase in optimizer steps
        self.interval = 1
        self.phase = "idle"          # idle -> pruning -> finished
        self.history: list[Tensor] = []       # status after each attenuation step
        self.history_steps: list[int] = []
        self._n_removed = 0          # host count, as of the last status copy taken in
        # Whether removed filters may exist: set by every attenuation step, made exact when its
        # status copy is taken in. While it is False, step() skips zero_removed_ and the gradient
        # masks pass gradients on (both would multiply by one).
        self._removals_possible = False
        self._pending_status: Optional[HostCopy] = None  # status copy of the last _apply, on its way
        self._removed_for_convs: Optional[Tensor] = None  # taken in, not yet given to the convs
        self._hooks = self._register_hooks()

    def _attach(self, groups: ModelGroups) -> None:
        """Work on the channel groups of a model: its member convs and the layout over them."""
        if self.config.criterion in NEEDS_AFFINE_BN:  # fail now, not at the first step
            require_affine_bn(groups.members, self.config.criterion)
        if self.config.attenuate == "gamma":
            _require_affine_or_no_bn(groups.members)
        self.groups: ModelGroups = groups
        self.layers: list[GroupMember] = groups.members
        device = groups.members[0].conv.weight.device
        self.layout = ChannelLayout(groups, device)
        # per member conv (layout.convs lists the members first), the group channel of each of its
        # input channels (n_channels: outside the groups), for the scores (_dead_inputs)
        self._member_inputs = [None if entry.in_channels is None or layer.conv.groups != 1
                               else entry.in_channels.to(device)
                               for layer, entry in zip(self.layers, self.layout.convs)]
        # Per conv of layout.convs, the removed counts (among its output, its input channels) its
        # live masks were set for: removal is permanent, so equal counts mean equal masks and the
        # conv is left alone.
        self._live_set_for: list = [None] * len(self.layout.convs)
        if self.config.attenuate == "output":
            # attenuate_ scales rows of the per-member tensors it is given: in output mode these
            # scratch rows, never read (the multiplier itself is the mask)
            self._scratch_rows = [torch.ones(layer.n_filters, 1, device=device) for layer in self.layers]

    @property
    def counts(self) -> list[int]:
        """Per group, its channels in the model the pruner was built on (before any compaction)."""
        return self.original.counts

    @property
    def offsets(self) -> list[int]:
        """Where each group's channels start in the results' vectors (``counts`` accumulated)."""
        return self.original.offsets

    # ------------------------------------------------------------------ the phase
    def start(self, total_steps: int, steps_per_epoch: Optional[int] = None) -> None:
        """Begin the pruning phase: ``total_steps`` optimizer steps, the ramp reaching the target
        ratio at its end."""
        if total_steps < 1:
            raise ValueError(f"the pruning phase needs at least one step, got {total_steps}")
        interval = self.config.interval
        if interval == "epoch":
            if not steps_per_epoch:
                raise ValueError("interval 'epoch' needs steps_per_epoch")
            interval = steps_per_epoch
        self.interval = min(int(interval), total_steps)
        self.total_steps = int(total_steps)
        self.steps_done = 0
        self.phase = "pruning"

    @property
    def n_attenuation_steps(self) -> int:
        """Attenuation steps in the phase: one every ``interval`` optimizer steps, and with
        ``step_at_start`` one after the first (unless that is one of them already)."""
        extra = int(self.config.step_at_start and self.interval > 1 and self.total_steps > 0)
        return self._ramp_steps + extra

    @property
    def _ramp_steps(self) -> int:
        """The steps the ramp spreads over: one every ``interval`` optimizer steps."""
        return self.total_steps // self.interval if self.total_steps else 0

    def step(self) -> None:
        """Call after every optimizer step: gives the convs the live masks of the last attenuation
        step, re-zeroes removed filters and attenuates when due."""
        self.sync_live()
        if self._removals_possible:
            ops.zero_removed_(*self._filter_tensors(), self._filter_status, backend=self.backend)
        if self.phase != "pruning":
            return
        self.steps_done += 1
        first = self.config.step_at_start and self.steps_done == 1
        if (self.steps_done % self.interval == 0 or first) and self.steps_done <= self.total_steps:
            self.attenuation_step()

    def ratio_now(self) -> float:
        index = self.steps_done // self.interval
        return ramp_ratio(self.config.ramp, self.config.ratio, index, self._ramp_steps)

    @torch.no_grad()
    def attenuation_step(self) -> None:
        """Score, select the weak set, attenuate (docs/METHOD.md, "The rule"), over group channels."""
        removed = self.status == ops.REMOVED
        scores = self.scores()
        if self.config.divides_weak_scores:
            attenuated = (self.status == ops.WEAK) & (self.multiplier > 0)
            scores = torch.where(attenuated, scores / self.multiplier.clamp_min(1e-30), scores)
        ratio, counts = self.ratio_now(), self.layout.counts
        # The weak set's size is floor(p n) of the original n; the removed channels are its first
        # members, so those that compaction cut out leave their places taken.
        if self.config.scope == "global":
            n_weak = weak_count(ratio, self.original.n_channels) - self.original.n_cut
            weak = ops.select_weak_global(scores, removed, counts, n_weak, backend=self.backend)
            ks = torch.stack([w.sum() for w in weak.split(counts)]) if self.config.hysteresis else None
        else:
            ks = [weak_count(ratio, n) - (n - now) for n, now in zip(self.counts, counts)]
            # uploaded as a tensor: select_weak would upload a list with a stream synchronisation
            ks = to_device(torch.tensor(ks), scores.device)
            weak = ops.select_weak(scores, removed, counts, ks, backend=self.backend)
        if self.config.hysteresis:
            weak = self._hold_returns(scores, removed, weak, ks)
        self._apply(weak, self.config.factor, self.config.eps)

    @torch.no_grad()
    def scores(self) -> Tensor:
        """Per group channel, the criterion's scores of its member filters reduced by
        ``group_reduce`` (float32; not yet divided by the multiplier)."""
        context = CriterionContext(self.layers, self._filter_status == ops.REMOVED, self.generator,
                                   self.backend, self._scored_weights(), self.original.filter_index,
                                   self.original.filter_channel.numel())
        filter_scores = get_criterion(self.config.criterion)(context).float()
        return self.layout.aggregate(filter_scores, self.config.group_reduce)

    def _hold_returns(self, scores: Tensor, removed: Tensor, selected: Tensor, ks: Tensor) -> Tensor:
        """The weak set under hysteresis (docs/METHOD.md, "Hysteresis"): each weak channel that the
        selection left out is held unless its score clears its group's threshold (the highest
        selected live score) by ``return_margin`` (relative to the threshold's magnitude) and it
        has been left out ``return_after`` consecutive steps. Each group's k lowest channels are
        then weak, ordered removed first, then held, then the rest, each by ascending score."""
        counts = self.layout.counts
        left_out = (self.status == ops.WEAK) & ~selected
        self.steps_left_out = torch.where(left_out, self.steps_left_out + 1, 0)
        held = left_out & (self.steps_left_out < self.config.return_after)
        if self.config.return_margin > 0.0:
            live_selected = torch.where(selected & ~removed, scores, -math.inf)
            threshold = torch.cat([part.amax().expand(n) for part, n in zip(live_selected.split(counts), counts)])
            # no live channel selected (threshold -inf): no place to hold one in, all may return
            margin = torch.where(threshold > -math.inf, self.config.return_margin * threshold.abs(), 0.0)
            held |= left_out & ~(scores > threshold + margin)
        # removed and held first, removed (-inf) before held (clamped above -inf); ties by index
        first = torch.where(removed, -math.inf, torch.where(held, scores.clamp_min(torch.finfo(scores.dtype).min),
                                                             scores))
        weak = ops.select_weak(first, removed | held, counts, ks, backend=self.backend)
        self.steps_left_out = torch.where(weak, self.steps_left_out, 0)
        return weak

    @torch.no_grad()
    def finish(self) -> None:
        """End of the pruning phase: every still-weak channel is removed (docs/METHOD.md, "The rule")."""
        # factor 0 makes every multiplier 0, below eps = 1: all of them are removed
        self._apply(self.status == ops.WEAK, 0.0, 1.0, count_weak_step=False)
        self.sync_live()
        self.phase = "finished"

    def _apply(self, weak: Tensor, factor: float, eps: float, count_weak_step: bool = True) -> None:
        """Attenuate the weak group channels: every member filter of each alike."""
        if count_weak_step:
            self.steps_weak += (weak & (self.status != ops.REMOVED)).int()
        tensors, stats = self._attenuated_tensors()
        returned, newly_removed = ops.attenuate_(*tensors, self.layout.expand(weak), self._filter_status,
                                                 self._filter_multiplier, factor, eps,
                                                 restore=self.config.reversible, backend=self.backend,
                                                 **stats)
        if self.config.attenuate != "filter":  # removal always zeroes the whole filter
            ops.zero_removed_(*self._filter_tensors(), self._filter_status, backend=self.backend)
        self.status.copy_(self.layout.of_channels(self._filter_status))
        self.multiplier.copy_(self.layout.of_channels(self._filter_multiplier))
        self.returns += self.layout.of_channels(returned).int()
        self.removed_at = torch.where(self.layout.of_channels(newly_removed), self.steps_done, self.removed_at)
        self.history.append(self.original.to_original(self.status, ops.REMOVED))
        self.history_steps.append(self.steps_done)
        self._removals_possible = True
        self._pending_status = HostCopy(self.status)

    def _attenuated_tensors(self):
        """attenuate_'s per-member tensors (weights, biases, gammas, betas) and its
        ``running_means`` and ``running_vars`` keywords, for the configured ``attenuate``."""
        weights, biases, gammas, betas = self._filter_tensors()
        if self.config.attenuate == "filter":
            stats = dict(running_means=[layer.bn.running_mean if layer.bn is not None else None
                                        for layer in self.layers],
                         running_vars=[layer.bn.running_var if layer.bn is not None else None
                                       for layer in self.layers])
            return (weights, biases, gammas, betas), stats
        none = [None] * len(self.layers)
        if self.config.attenuate == "output":
            return (self._scratch_rows, none, none, none), {}
        # "gamma": a BN's gamma as an (n, 1) "weight" of one-element rows (the op scales rows); the
        # conv's output, hence the BN statistics, do not change
        targets = [w if g is None else g.view(-1, 1) for w, g in zip(weights, gammas)]
        target_biases = [b if g is None else None for b, g in zip(biases, gammas)]
        return (targets, target_biases, none, none), {}

    def _scored_weights(self) -> Optional[list[Tensor]]:
        """The weights the weight criteria (l1, l2, fpgm) score, per member conv; None: the convs'
        own. A conv's weights that read removed channels are zeros here: they multiply zeros and
        are no part of a live filter (physical removal, and compaction, cut them out; docs/METHOD.md,
        "The rule"). With ``attenuate="gamma"`` each conv's BatchNorm is folded in (row f times
        gamma_f / sqrt(running_var_f + eps), the conv that eval mode computes), so that a zeroed
        gamma scores as a zero filter."""
        fold = self.config.attenuate == "gamma"
        dead = self._dead_inputs()
        if not fold and all(d is None for d in dead):
            return None
        scored = []
        for layer, dead_in in zip(self.layers, dead):
            w = layer.conv.weight.detach()
            if fold and layer.bn is not None:
                w = w * _bn_gain(layer.bn).view(-1, *[1] * (w.dim() - 1))
            scored.append(w if dead_in is None else w.masked_fill(dead_in.view(1, -1, *[1] * (w.dim() - 2)), 0))
        return scored

    def _dead_inputs(self) -> list[Optional[Tensor]]:
        """Per member conv, which of its input channels are removed (device bool; None where none
        can be: no removal yet, or an input outside the groups, or a depthwise conv, whose one
        input channel per filter is its own)."""
        if not self._removals_possible:
            return [None] * len(self.layers)
        removed = torch.cat([self.status == ops.REMOVED, self.status.new_zeros(1, dtype=torch.bool)])
        return [None if index is None else removed[index] for index in self._member_inputs]

    # ------------------------------------------------------------------ wiring to the model
    def _filter_tensors(self):
        weights = [layer.conv.weight for layer in self.layers]
        biases = [layer.conv.bias for layer in self.layers]
        gammas = [layer.bn.weight if layer.bn is not None else None for layer in self.layers]
        betas = [layer.bn.bias if layer.bn is not None else None for layer in self.layers]
        return weights, biases, gammas, betas

    def _take_in_status(self) -> None:
        """Take in the status copy started by the last attenuation step, if one is on its way (on
        CUDA this waits for it, normally done by then): the host count and the convs' next masks."""
        if self._pending_status is None:
            return
        removed = self._pending_status.wait() == ops.REMOVED
        self._pending_status = None
        self._n_removed = int(removed.sum())
        self._removals_possible = self._n_removed > 0
        self._removed_for_convs = removed

    def sync_live(self) -> None:
        """Give the convs the live masks of the last attenuation step now: each member conv's
        output channels and each reading conv's input channels follow their group channels.

        ``step()`` does it first, ``finish()``, ``state_dict()`` and :meth:`live_masks` too: no
        user needs to call it. Until then the convs still compute the newly removed channels, which
        gives the same result (up to the rounding of a dense against a compact convolution):
        removed filters are zero (weight, bias, BN gamma and beta: docs/METHOD.md, "The
        invariant"), so their channels are zero either way."""
        self._take_in_status()
        removed, self._removed_for_convs = self._removed_for_convs, None
        if removed is None:
            return
        removed = torch.cat([removed, removed.new_zeros(1)])  # the slot of channels outside any group
        for i, entry in enumerate(self.layout.convs):
            dead_out = None if entry.out_channels is None else removed[entry.out_channels]
            dead_in = None if entry.in_channels is None else removed[entry.in_channels]
            counts = tuple(0 if dead is None else int(dead.sum()) for dead in (dead_out, dead_in))
            if self._live_set_for[i] == counts:
                continue
            entry.conv.set_live(~dead_out if counts[0] else None, ~dead_in if counts[1] else None)
            self._live_set_for[i] = counts

    def _register_hooks(self) -> list:
        """The gradient masks (``mask_gradients``) and, with attenuate="output", the output masks."""
        hooks = self._register_gradient_masks() if self.config.mask_gradients else []
        if self.config.attenuate == "output":
            hooks += self._register_output_masks()
        return hooks

    def _register_gradient_masks(self):
        handles = []
        offsets = self.layout.filter_offsets
        for i, layer in enumerate(self.layers):
            start, end = offsets[i], offsets[i + 1]
            for tensor in (layer.conv.weight, layer.conv.bias,
                           *((layer.bn.weight, layer.bn.bias) if layer.bn is not None else ())):
                if tensor is not None and tensor.requires_grad:
                    handles.append(tensor.register_hook(self._gradient_mask(start, end)))
        return handles

    def _gradient_mask(self, start: int, end: int):
        def mask(grad: Tensor) -> Tensor:
            if not self._removals_possible:
                return grad
            keep = (self._filter_status[start:end] != ops.REMOVED).to(grad.dtype)
            return grad * keep.view(-1, *([1] * (grad.dim() - 1)))
        return mask

    def _register_output_masks(self):
        """attenuate="output": each member's channels leave its BN (its conv where none follows)
        times their multiplier, straight through in the backward pass."""
        handles = []
        offsets = self.layout.filter_offsets
        for i, layer in enumerate(self.layers):
            module = layer.bn if layer.bn is not None else layer.conv
            handles.append(module.register_forward_hook(self._output_mask(offsets[i], offsets[i + 1])))
        return handles

    def _output_mask(self, start: int, end: int):
        def mask(module: nn.Module, inputs, output: Tensor) -> Tensor:
            m = self._filter_multiplier[start:end].to(output.dtype).view(1, -1, *[1] * (output.dim() - 2))
            return output + (output * m - output).detach()  # forward: m * output; backward: identity
        return mask

    def remove_hooks(self) -> None:
        """Detach the gradient masks and the output masks (e.g. before physical removal replaces
        the model: the output masks are then all 1 or 0, the removed filters zero)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ compaction
    def compact(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                round_to: int = 1) -> nn.Module:
        """Cut the removed channels out of ``model`` (the model this pruner prunes, as the last
        ``compact`` returned it) and return the smaller model to train on: the copy of
        :func:`attenuation.surgery.remove_filters` with every conv an AttenuatedConv2d again,
        ``optimizer``'s parameters and per-element state (momentum) switched to it. ``model``
        keeps its tensors; the pruner works on the returned model from now on, and its results
        stay in the original numbering (docs/ARCHITECTURE.md, "Compaction"). Returns ``model``
        itself when nothing is to be cut.

        Removed filters are zero and never return, so the smaller model computes what ``model``
        computes and the rule goes on as it would have: training is the same up to rounding.
        ``round_to``: that of the final ``remove_filters``; the removed channels it may keep back
        stay in (masked), so that the final network is the same as without compaction.
        It reads the status on the host (a synchronisation on CUDA) and changes the shapes of the
        parameters: call it between optimizer steps, and not under CUDA graphs or ``torch.compile``."""
        held = {id(module) for module in model.modules()}
        if not all(id(layer.conv) in held for layer in self.layers):
            raise ValueError("compact() takes the model this pruner prunes (after a compaction, the "
                             "model that compact() returned)")
        self.sync_live()  # the last attenuation step's status taken in
        removed, keep = self._compaction_keep(round_to)
        if bool(keep.all()):
            return model
        masks = list(keep[self.layout.filter_channel_host].split(self.layout.filter_counts))
        self.remove_hooks()  # first: the copy would take the modules' forward hooks (output masks) along
        try:
            with _known_unprunable():
                smaller = convert_model(remove_filters(model, masks, optimizer, ignored=self.ignored_layers),
                                        self.backend)
                groups = find_groups(smaller, self.ignored_layers)
        except Exception:
            self._hooks = self._register_hooks()  # model stays the one pruned
            raise
        self._renumber(groups, keep, removed[keep])
        self._hooks = self._register_hooks()
        return smaller

    def cut_fraction(self, round_to: int = 1) -> float:
        """The share of the model's group channels that :meth:`compact` would cut out now (the
        removed ones but those ``round_to`` keeps back). Reads the status on the host."""
        _, keep = self._compaction_keep(round_to)
        return 1.0 - float(keep.float().mean()) if keep.numel() else 0.0

    def _compaction_keep(self, round_to: int) -> tuple[Tensor, Tensor]:
        """(removed, keep) on the host, per group channel of the working layout: what compaction
        keeps are the live channels and the removed ones that ``round_to`` keeps back."""
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to must be an int >= 1, got {round_to!r}")
        removed = (self.status == ops.REMOVED).cpu()
        return removed, ~removed | kept_back(removed, self.layout.counts, round_to)

    def _renumber(self, groups: ModelGroups, keep: Tensor, removed: Tensor) -> None:
        """Work on the compacted model's ``groups``, keeping the state of the ``keep`` channels
        (host bool over the channels before); ``removed``: those of them removed (kept back)."""
        before, names = self.layout, [layer.name for layer in self.layers]
        self._attach(groups)
        # the compacted model's channels are the kept ones in their order (surgery cuts each group
        # channel out of every member, find_groups numbers channels by first appearance)
        rank = keep.long().cumsum(0) - 1
        expected = rank[before.filter_channel_host[keep[before.filter_channel_host]]]
        if [layer.name for layer in self.layers] != names or not torch.equal(self.layout.filter_channel_host,
                                                                               expected):
            raise RuntimeError("compaction changed the channel groups beyond the channels it cut: "
                               "the pruner's state cannot follow them")
        self.original.cut(keep.to(self.status.device), {key: getattr(self, key) for key in FATES})
        index = keep.nonzero().flatten().to(self.status.device)
        for key in ("status", "multiplier", "steps_left_out", *FATES):
            setattr(self, key, getattr(self, key)[index])
        self._filter_status = self.layout.expand(self.status)
        self._filter_multiplier = self.layout.expand(self.multiplier)
        self._n_removed = int(removed.sum())
        self._removals_possible = self._n_removed > 0
        self._removed_for_convs = removed
        self.sync_live()  # the kept-back removed channels' masks

    # ------------------------------------------------------------------ results
    def keep_masks(self) -> list[Tensor]:
        """Per member conv of the model the pruner was built on (``find_groups(model).members``,
        module order), True for the filters not removed: the input to
        :func:`attenuation.surgery.remove_filters` for that model. After :meth:`compact` the model
        trained is smaller: :meth:`model_keep_masks` are its masks."""
        removed = self.original.to_original(self.status == ops.REMOVED, True)
        return list((~removed[self.original.filter_channel]).split(self.original.filter_counts))

    def model_keep_masks(self) -> list[Tensor]:
        """:meth:`keep_masks` for the model as it is now, compacted or not (per member of ``layers``)."""
        return list((self._filter_status != ops.REMOVED).split(self.layout.filter_counts))

    @property
    def n_removed(self) -> int:
        """The number of removed group channels, as of the last attenuation step (waits for its
        status copy; the convs' masks are left to the next step, so reading never changes training)."""
        self._take_in_status()
        return self._n_removed + self.original.n_cut

    def live_fraction(self) -> float:
        """Live group channels over all group channels, as of the last attenuation step."""
        return 1.0 - self.n_removed / self.original.n_channels

    def live_masks(self) -> list[tuple[Tensor, Optional[Tensor]]]:
        """Per member conv, its (live_out, live_in) masks (live_in None: every input channel),
        after giving the convs the masks of the last attenuation step."""
        self.sync_live()
        return [(layer.conv.live_out, layer.conv.live_in) for layer in self.layers]

    def total_returns(self) -> int:
        return int(self._original_fates()["returns"].sum())

    def group_names(self) -> list[str]:
        """Per group, its name: its first member's."""
        return [self.layers[group.members[0]].name for group in self.groups.groups]

    def fates(self) -> list[dict]:
        """Per group: each channel's steps weak, returns and the step it was removed at (-1: kept)."""
        fates = self._original_fates()
        out = []
        for i, name in enumerate(self.group_names()):
            s = slice(self.offsets[i], self.offsets[i + 1])
            out.append({"name": name, **{key: values[s].tolist() for key, values in fates.items()}})
        return out

    def _original_fates(self) -> dict[str, Tensor]:
        return self.original.fates({key: getattr(self, key) for key in FATES})

    def status_history(self) -> dict[str, Tensor]:
        """Per group name, a (steps, channels) uint8 matrix of statuses after each attenuation step."""
        if not self.history:
            return {name: torch.zeros(0, n, dtype=torch.uint8) for name, n in zip(self.group_names(), self.counts)}
        stacked = torch.stack(self.history).cpu()
        return {name: stacked[:, self.offsets[i]:self.offsets[i + 1]] for i, name in enumerate(self.group_names())}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The pruner's state; gives the convs any pending live masks first, so that a run resumed
        from it and the uninterrupted run give the convs the same masks."""
        self.sync_live()
        return {
            "config": dataclasses.asdict(self.config),
            "layer_names": [layer.name for layer in self.layers],
            "counts": list(self.layout.counts),
            "filter_channels": self.layout.filter_channel_host.clone(),
            "original": self.original.state_dict() if self.original.n_cut else None,
            "status": self.status.clone(), "multiplier": self.multiplier.clone(),
            "steps_weak": self.steps_weak.clone(), "returns": self.returns.clone(),
            "removed_at": self.removed_at.clone(), "steps_left_out": self.steps_left_out.clone(),
            "generator": self.generator.get_state(),
            "steps_done": self.steps_done, "total_steps": self.total_steps,
            "interval": self.interval, "phase": self.phase,
            "history": torch.stack(self.history) if self.history else None,
            "history_steps": list(self.history_steps),
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_layout(state)
        saved_config = upgrade_config(state.get("config"))
        if saved_config != dataclasses.asdict(self.config):
            raise ValueError(f"pruner state is from another configuration: {saved_config} "
                             f"!= {dataclasses.asdict(self.config)}")
        device = self.status.device
        original = state.get("original")  # None: never compacted (or saved before compaction existed)
        self.original = (OriginalNumbering.of(self.layout, device) if original is None
                         else OriginalNumbering.from_state(original, self.layout, device))
        for key in ("status", "multiplier", "steps_weak", "returns", "removed_at"):
            getattr(self, key).copy_(state[key].to(device))
        self._filter_status.copy_(self.layout.expand(self.status))
        self._filter_multiplier.copy_(self.layout.expand(self.multiplier))
        self.steps_left_out.zero_()  # absent from a state saved before hysteresis existed
        if "steps_left_out" in state:
            self.steps_left_out.copy_(state["steps_left_out"].to(device))
        self.generator.set_state(state["generator"])
        self.steps_done, self.total_steps = state["steps_done"], state["total_steps"]
        self.interval, self.phase = state["interval"], state["phase"]
        history = state["history"]
        if history is not None and history.shape[1] != self.original.n_channels:
            raise ValueError(f"pruner state's status history has {history.shape[1]} channels, its model "
                             f"{self.original.n_channels}")
        self.history = [] if history is None else [row.to(device) for row in history]
        self.history_steps = list(state["history_steps"])
        self._live_set_for = [None] * len(self.layout.convs)  # a loaded status may differ in any way
        self._pending_status = HostCopy(self.status)  # replaces any pending copy
        self.sync_live()

    def _check_layout(self, state: dict) -> None:
        """The state's member convs, group sizes and filter-to-channel map must be this model's. A
        state saved before channel groups has no map: it was one group per conv, each filter its
        own channel, and fits only a model whose groups are that."""
        names, counts = [layer.name for layer in self.layers], self.layout.counts
        if state.get("layer_names") != names or state.get("counts") != counts:
            raise ValueError("pruner state is from another model (or the model compacted otherwise): "
                             f"its layers {state.get('layer_names')} / {state.get('counts')} do not "
                             f"match {names} / {counts}")
        saved = state.get("filter_channels")
        mine = self.layout.filter_channel_host
        if saved is None and not (counts == self.layout.filter_counts
                                  and torch.equal(mine, torch.arange(mine.numel()))):
            raise ValueError("pruner state is from before channel groups (one group per conv), but "
                             "this model's convs share channels: it cannot be read")
        if saved is not None and not torch.equal(saved.cpu(), mine):
            raise ValueError("pruner state is from another model: its convs' filters map to other "
                             "group channels")

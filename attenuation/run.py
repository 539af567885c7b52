"""The CIFAR-10 prune, recover, remove loop: phases, checkpoints and resume, reports."""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import plots, report
from .channels_last import as_channels_last
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PHASES, RunConfig, baseline_key, complete_config
from .data import CIFAR10, DeviceLoader, find_cifar10, hold_out, load_cifar10, subset
from .devices import check_backend, describe_device, resolve_device, resolve_precision
from .fates import fate_statistics
from .files import atomic_write_text, remove_stale_temporaries
from .models import build_model, create_model, model_title
from .profiling import count_macs, count_parameters, measure_latency, time_in_turns
from .pruner import Pruner
from .surgery import build_pruned, pruned_architecture, remove_filters, save_pruned
from .train import evaluate, train_epoch

# Options that change where a run writes, not what it computes.
_NOT_COMPARED_ON_RESUME = ("out",)
# Every file a run writes in its folder.
OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint.pt", "baseline.pt", "model.pt", "fates.json",
           "report.md", "summary.json", "curves.png", "filter_fates.png")
# The share of the training network's channels that an attenuation step must have removed for the
# network to be compacted at once rather than at the epoch's end (bench/overhead.py times a compaction).
COMPACT_FROM = 0.02
# The checkpoint of the run as its baseline phase ended: other runs can start from it (--baseline).
BASELINE_FILE = "baseline.pt"


class TrainingDiverged(ValueError):
    """The training loss or the weights became non-finite: the run stops, its last good checkpoint
    kept."""


def default_out(config: RunConfig) -> Path:
    return Path("runs") / f"{config.preset}-{config.method}-{config.criterion}-r{config.ratio:g}-s{config.seed}"


class Run:
    """One run of the loop. ``Run(config).execute()`` returns the summary dict.

    ``resume``: continue from the run folder's checkpoint. ``baseline``: start the attenuation
    phase from another run's finished baseline (a ``baseline.pt`` or a run folder holding one)
    instead of training one; it must come from the same :func:`attenuation.config.baseline_key`.
    ``on_epoch``: called with each epoch's metrics row (the sweep reports them to Ray)."""

    def __init__(self, config: RunConfig, *, resume: bool = False, progress: bool = True,
                 download: bool = False, baseline: Optional[str | Path] = None,
                 on_epoch: Optional[Callable[[dict], None]] = None):
        created = time.perf_counter()
        self.config = config.validate()
        if resume and baseline is not None:
            raise ValueError("--resume continues a run from its own checkpoint, --baseline starts a new "
                             "one from another's baseline: pass one of them")
        self.on_epoch = on_epoch
        self.out = Path(config.out) if config.out else default_out(config)
        self.device = resolve_device(config.device)
        self.backend = check_backend(config.backend, self.device)
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        if not resume and (self.out / "checkpoint.pt").exists():
            raise FileExistsError(f"{self.out} already holds a run: pass --resume to continue it "
                                  "or choose another --out")
        self.progress = progress
        self.channels_last = True  # faster for these convs on CPU (oneDNN) and GPU (tensor cores)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal BN statistics of dead channels slow CPUs 2x
        torch.manual_seed(config.seed)
        data = self._load_data(download)
        self.data_source = data.source
        self.train_loader = DeviceLoader(data.x_train, data.y_train, config.batch_size, self.device,
                                         train=True, seed=config.seed, channels_last=self.channels_last)
        self.test_loader = DeviceLoader(data.x_test, data.y_test, 500, self.device, train=False,
                                        channels_last=self.channels_last)
        self.val_loader = None if data.x_val is None else DeviceLoader(
            data.x_val, data.y_val, 500, self.device, train=False, channels_last=self.channels_last)
        self.model: nn.Module = self._to_device(create_model(config.model_name, config.width))
        self.pruner: Optional[Pruner] = self._make_pruner()
        self.optimizer = self._make_optimizer()
        self.state = {"phase_index": 0, "epoch_in_phase": 0, "global_epoch": 0, "wall_seconds": 0.0,
                      "metrics": [], "phases": [], "record": None}
        remove_stale_temporaries(self.out, OUTPUTS)  # of a killed earlier session of this run
        if resume:
            self._resume()
        else:
            atomic_write_text(self.out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
            atomic_write_text(self.out / "metrics.jsonl", "")
            if baseline is not None:
                self._start_from_baseline(Path(baseline))
        self.state["wall_seconds"] += time.perf_counter() - created  # data loading and setup

    # ------------------------------------------------------------------ setup
    def _load_data(self, download: bool) -> CIFAR10:
        """CIFAR-10 (found, else downloaded), cut to the configured subsets, the validation split
        held out; refused when the training set cannot fill one batch (the loader drops partial
        batches: no step would run)."""
        c = self.config
        data = load_cifar10(find_cifar10(c.data, download=download))
        n_train = min(c.train_subset or len(data.y_train), len(data.y_train))
        n_test = min(c.test_subset or len(data.y_test), len(data.y_test))
        if (n_train, n_test) != (len(data.y_train), len(data.y_test)):
            data = subset(data, n_train, n_test)
        if c.val_split >= n_train:
            raise ValueError(f"val_split {c.val_split} must be smaller than the {n_train} training "
                             "images: some must remain to train on")
        if c.val_split:
            data = hold_out(data, c.val_split, c.seed)
        if c.batch_size > len(data.y_train):
            left = f" left after holding {c.val_split} out for validation" if c.val_split else ""
            raise ValueError(f"batch_size {c.batch_size} is larger than the {len(data.y_train)} training "
                             f"images{left}: every epoch would drop its only, partial batch and train "
                             "nothing")
        return data

    def _to_device(self, model: nn.Module) -> nn.Module:
        """``model`` on the run's device, channels-last with the BatchNorm and max pool that are
        fast there for any channel count (as_channels_last: the pruned counts)."""
        model = model.to(self.device)
        return as_channels_last(model) if self.channels_last else model

    def _make_pruner(self) -> Pruner:
        c = self.config
        return Pruner(self.model, c.pruning_config(), backend=c.backend, seed=c.seed)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=True,
                               weight_decay=c.weight_decay)

    def _checkpoint(self, name: str = "checkpoint.pt") -> None:
        # the architecture of a removed or compacted model (any other is rebuilt from the config)
        cut = self.pruner is None or self.pruner.original.n_cut > 0
        save_checkpoint({
            "config": self.config.to_dict(), "state": self.state,
            "removed": self.pruner is None, "model_spec": pruned_architecture(self.model) if cut else None,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "loader": self.train_loader.state_dict(), "torch_rng": torch.get_rng_state(),
        }, self.out / name)

    def _resume(self) -> None:
        saved = load_checkpoint(self.out / "checkpoint.pt", map_location=self.device)
        # a field added since the checkpoint was written takes the value that reproduces the run
        mine, theirs = self.config.to_dict(), complete_config(saved["config"])
        differ = [k for k in mine if k not in _NOT_COMPARED_ON_RESUME and mine[k] != theirs.get(k)]
        if differ:
            raise ValueError("the checkpoint is from another configuration: "
                             + ", ".join(f"{k}={theirs.get(k)!r} (now {mine[k]!r})" for k in differ))
        self._load_training_state(saved)
        rows = "".join(json.dumps(row) + "\n" for row in self.state["metrics"])
        atomic_write_text(self.out / "metrics.jsonl", rows)  # drops the rows written after the checkpoint

    def _start_from_baseline(self, path: Path) -> None:
        """Load another run's finished baseline: weights, optimizer, loader and RNG states, and its
        baseline metrics; the pruner starts fresh with this run's configuration."""
        path = path / BASELINE_FILE if path.is_dir() else path
        saved = load_checkpoint(path, map_location=self.device)
        state = saved["state"]
        if saved["removed"] or (state["phase_index"], state["epoch_in_phase"]) != (1, 0):
            raise ValueError(f"{path} is not a finished baseline (it is at phase {state['phase_index']}, "
                             f"epoch {state['epoch_in_phase']}): use the {BASELINE_FILE} of a run folder")
        mine, theirs = baseline_key(self.config), baseline_key(saved["config"])
        differ = [k for k in mine if mine[k] != theirs.get(k)]
        if differ:
            raise ValueError(f"the baseline {path} was trained with another model or training "
                             "configuration: " + ", ".join(f"{k}={theirs.get(k)!r} (here {mine[k]!r})"
                                                            for k in differ))
        saved["pruner"] = None  # this run's own pruning configuration starts from scratch
        self._load_training_state(saved)
        rows = "".join(json.dumps(row) + "\n" for row in self.state["metrics"])
        atomic_write_text(self.out / "metrics.jsonl", rows)

    def _load_training_state(self, saved: dict) -> None:
        """Model, pruner (when saved), optimizer, loader, RNG and loop state from a checkpoint."""
        spec = saved["model_spec"]  # a VGG's own spec in checkpoints older than pruned_architecture
        if spec is not None:  # the model was removed, or compacted
            self.pruner.remove_hooks()
            self.model = self._to_device(build_model(spec) if "arch" in spec else build_pruned(spec))
            self.pruner = None if saved["removed"] else self._make_pruner()
            self.optimizer = self._make_optimizer()
        self.model.load_state_dict(saved["model"])
        if self.pruner is not None and saved["pruner"] is not None:
            self.pruner.load_state_dict(saved["pruner"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.train_loader.load_state_dict(saved["loader"])
        torch.set_rng_state(saved["torch_rng"].cpu())
        self.state = saved["state"]

    # ------------------------------------------------------------------ the loop
    def execute(self, stop_after_epochs: Optional[int] = None,
                until_phase: Optional[str] = None) -> Optional[dict]:
        """Run (or continue) every phase; returns the summary, or None when stopped early:
        after ``stop_after_epochs`` epochs (used to test resuming) or at the end of the phase
        ``until_phase`` (a sweep trains its shared baselines with ``until_phase="baseline"``)."""
        if until_phase is not None and until_phase not in PHASES:
            raise ValueError(f"unknown phase {until_phase!r}: expected one of {', '.join(PHASES)}")
        epochs_this_session = 0
        while self.state["phase_index"] < len(PHASES):
            phase = PHASES[self.state["phase_index"]]
            n_epochs = self.config.epochs[phase]
            started = time.perf_counter()
            if phase == "attenuation" and self.state["epoch_in_phase"] == 0 and self.pruner.phase == "idle":
                self.pruner.start(max(n_epochs, 1) * len(self.train_loader), len(self.train_loader))
            if self.state["epoch_in_phase"] < n_epochs:
                self._train_one_epoch(phase, n_epochs)
                epochs_this_session += 1
            if self.state["epoch_in_phase"] >= n_epochs:
                self._end_phase(phase)
            self.state["wall_seconds"] += time.perf_counter() - started
            self._checkpoint()
            if phase == "baseline" and self.state["phase_index"] == 1:
                self._checkpoint(BASELINE_FILE)
            if until_phase is not None and self.state["phase_index"] > PHASES.index(until_phase):
                return None
            if stop_after_epochs is not None and epochs_this_session >= stop_after_epochs \
                    and self.state["phase_index"] < len(PHASES):
                return None
        return self._write_outputs()

    def _train_one_epoch(self, phase: str, n_epochs: int) -> None:
        steps = len(self.train_loader)
        total = n_epochs * steps
        epoch = self.state["epoch_in_phase"]
        pruner, schedule = self.pruner, self.config.lr_schedule()
        result = train_epoch(
            self.model, self.train_loader, self.optimizer,
            lr=lambda step: schedule.at(phase, step, total), first_step=epoch * steps,
            label_smoothing=self.config.label_smoothing,
            after_step=self._after_step if pruner is not None else None,
            progress=f"{phase} {epoch + 1}/{n_epochs}" if self.progress else None,
            live_fraction=self._live_fraction, autocast_dtype=self.autocast_dtype)
        self._check_finite(result.loss, f"the {phase} phase, epoch {epoch + 1}/{n_epochs}")
        if pruner is not None:
            pruner.live_masks()  # the convs' masks of the epoch's last attenuation step, for the MAC count below
            self._compact()
        # with a validation split every epoch is measured on it, and the test set only at phase ends
        held_out = "test" if self.val_loader is None else "val"
        held_out_loss, held_out_acc = evaluate(self.model, self.test_loader if self.val_loader is None
                                               else self.val_loader, self.autocast_dtype)
        self.state["epoch_in_phase"] += 1
        self.state["global_epoch"] += 1
        row = {"phase": phase, "epoch": self.state["global_epoch"], "phase_epoch": epoch + 1,
               "train_loss": result.loss, "train_acc": result.accuracy, f"{held_out}_loss": held_out_loss,
               f"{held_out}_acc": held_out_acc, "live_fraction": self._live_fraction(),
               "lr": schedule.at(phase, (epoch + 1) * steps - 1, total),
               "seconds": result.seconds, "images_per_second": result.images / result.seconds,
               "pruning_seconds": result.pruning_seconds, "macs": self._network_cost()[1]}
        self.state["metrics"].append(row)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.on_epoch is not None:
            self.on_epoch(row)
        if self.progress:
            print(f"[{phase} {epoch + 1}/{n_epochs}] loss {result.loss:.3f} train {result.accuracy:.1f}% "
                  f"{held_out} {held_out_acc:.2f}% live {row['live_fraction']:.2f} ({result.seconds:.0f}s)",
                  flush=True)

    def _check_finite(self, loss: float, where: str) -> None:
        """Stop before a diverged epoch is checkpointed: the checkpoint on disk stays the last good one."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        if math.isfinite(loss) and all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point()):
            return
        checkpoint = self.out / "checkpoint.pt"
        kept = (f"{checkpoint} holds the last good state" if checkpoint.exists()
                else "no checkpoint was written (it diverged in the first epoch)")
        raise TrainingDiverged(
            f"training diverged in {where}: the training loss is {loss:g} or the weights are no longer "
            f"finite; {kept}. Try a lower --lr (now {self.config.lr:g}) in a new run.")

    def _live_fraction(self) -> float:
        """Live filters over the original model's filters, also after physical removal."""
        if self.pruner is not None:
            return self.pruner.live_fraction()
        record = self.state["record"]
        return 1.0 - record["removed_filters"] / record["filters"]

    def _after_step(self) -> Optional[nn.Module]:
        """The pruner's step after every optimizer step. With ``compact``, an attenuation step
        that removed at least COMPACT_FROM of the network's channels is followed by a
        compaction: the model to train on from the next step is returned."""
        pruner = self.pruner
        pruner.step()
        attenuated = bool(pruner.history_steps) and pruner.history_steps[-1] == pruner.steps_done
        if not (self.config.compact and attenuated
                and pruner.cut_fraction(self.config.round_to) >= COMPACT_FROM):
            return None
        self._compact()
        return self.model

    def _compact(self) -> None:
        """Cut the filters removed since the last compaction out of the training network (the
        ``compact`` option): the same training up to rounding, on a smaller network."""
        if self.config.compact:
            model = self.pruner.compact(self.model, self.optimizer, round_to=self.config.round_to)
            if model is not self.model:
                self.model = self._to_device(model)

    def _network_cost(self) -> tuple[int, int]:
        """Parameters and live MACs of the training network as a run without compaction counts
        them: before removal the masked network of the model built, whose removed filters are
        still parameters and whose classifier still reads every channel (count_macs counts Linear
        layers in full); after removal the removed network."""
        params, macs = count_parameters(self.model), count_macs(self.model, live_only=True)
        if self.pruner is None or not self.pruner.original.n_cut:
            return params, macs
        with torch.device("meta"):
            built = create_model(self.config.model_name, self.config.width)
        now = dict(self.model.named_modules())
        reads_cut = sum((m.in_features - now[name].in_features) * m.out_features
                        for name, m in built.named_modules() if isinstance(m, nn.Linear))
        return count_parameters(built), macs + reads_cut

    def _end_phase(self, phase: str) -> None:
        if phase == "attenuation":
            self.pruner.finish()
            self._compact()
        self._record_phase(phase)
        if phase == "recovery":
            self._remove_filters()
            self._record_phase("removal")
        self.state["phase_index"] += 1
        self.state["epoch_in_phase"] = 0

    def _remove_filters(self) -> None:
        """Physical removal: a dense smaller network; the optimizer's momentum is sliced along."""
        pruner = self.pruner
        self.state["record"] = {
            "fates": pruner.fates(), "history": pruner.status_history(),
            "history_steps": list(pruner.history_steps), "returns": pruner.total_returns(),
            "removed_filters": pruner.n_removed, "filters": sum(pruner.counts)}
        pruner.remove_hooks()
        self.model = self._to_device(remove_filters(self.model, pruner.model_keep_masks(), self.optimizer,
                                                    round_to=self.config.round_to))
        self.pruner = None

    def _record_phase(self, phase: str) -> None:
        with torch.random.fork_rng(devices=[]):  # measurements must not perturb training's RNG
            _, accuracy = evaluate(self.model, self.test_loader, self.autocast_dtype)
            val_accuracy = None if self.val_loader is None else \
                evaluate(self.model, self.val_loader, self.autocast_dtype)[1]
            latency = measure_latency(self.model, batch_size=self.config.latency_batch,
                                      device=self.device, channels_last=self.channels_last,
                                      autocast_dtype=self.autocast_dtype)
        seconds = sum(row["seconds"] for row in self.state["metrics"] if row["phase"] == phase)
        params, macs = self._network_cost()
        self.state["phases"].append({
            "phase": phase, "accuracy": accuracy, "val_accuracy": val_accuracy, "params": params,
            "macs": macs, "latency_ms": latency["median_ms"], "seconds": seconds})

    def _speed_in_turns(self) -> dict:
        """The unpruned and the pruned network's forward pass and training step, timed in turns at
        the batch of the latencies (report.SPEED_KEYS). The unpruned network is built afresh:
        its time does not depend on its weights."""
        with torch.random.fork_rng(devices=[]):  # building it must not perturb training's RNG
            unpruned = self._to_device(create_model(self.config.model_name, self.config.width))
        batch = self.config.latency_batch
        times = time_in_turns({"baseline": unpruned, "pruned": self.model}, batch_size=batch,
                              channels_last=self.channels_last, autocast_dtype=self.autocast_dtype)
        return {"batch_size": batch, **{f"{network}_{kind}": value for network, kinds in times.items()
                                        for kind, value in kinds.items()}}

    # ------------------------------------------------------------------ outputs
    def _write_outputs(self) -> dict:
        c, record = self.config, self.state["record"]
        phases = {row["phase"]: row for row in self.state["phases"]}
        # the record is taken after the phase's end: its history ends with the end-of-phase removal
        fates = fate_statistics(record["history"], ended=True)
        save_pruned(self.model, self.out / "model.pt")
        atomic_write_text(self.out / "fates.json", json.dumps(record["fates"]) + "\n")
        if self.state["metrics"]:
            plots.plot_training_curves(self.state["metrics"], self.out / "curves.png")
        plots.plot_filter_fates(record["history"], record["history_steps"], self.out / "filter_fates.png",
                                statistics=fates)
        summary = report.make_summary(
            method=c.method, criterion=c.criterion, ratio=c.ratio, data_source=self.data_source,
            device=describe_device(self.device, self.autocast_dtype), wall_seconds=self.state["wall_seconds"],
            # .get: phase rows of a checkpoint older than the validation split lack val_accuracy
            baseline={k: phases["baseline"].get(k) for k in report.SECTION_KEYS},
            pruned={k: phases["finetune"].get(k) for k in report.SECTION_KEYS},
            speed=self._speed_in_turns(),
            returns=record["returns"], removed_filters=record["removed_filters"],
            kept_returns=fates.kept_returns, churn=fates.churn,
            removed_during_phase=fates.removed_during_phase,
            mean_steps_weak_before_removal=fates.mean_steps_weak_before_removal)
        report.write_summary(summary, self.out / "summary.json")
        report.write_report(
            self.out / "report.md", title=f"attenuation run: {c.method} / {c.criterion}, ratio {c.ratio:g}, "
            f"{model_title(c.model_name)} x{c.width:g} ({c.preset} preset)", config=c.to_dict(),
            data_source=self.data_source, device=describe_device(self.device, self.autocast_dtype),
            phases=self.state["phases"], latency_batch=c.latency_batch,
            summary=summary, plots=["curves.png", "filter_fates.png"], epochs=self.state["metrics"],
            notes=[f"ops backend: {self.backend}",
                   f"{record['removed_filters']} of {record['filters']} filters removed, "
                   f"{record['returns']} returns; latency is the median forward time at batch "
                   f"{c.latency_batch}; the pruned rows before removal count the masked network's "
                   "parameters and MACs and time the network trained: "
                   + ("compacted after the attenuation steps that removed filters (--compact)." if c.compact
                      else "the masked convolution (--no-compact).")])
        return summary


def run(config: RunConfig, *, resume: bool = False, progress: bool = True, download: bool = False,
        baseline: Optional[str | Path] = None, stop_after_epochs: Optional[int] = None) -> Optional[dict]:
    """Run the loop for ``config``; see :class:`Run`."""
    return Run(config, resume=resume, progress=progress, download=download,
               baseline=baseline).execute(stop_after_epochs)

"""The ``attenuation`` command: ``run`` (the CIFAR-10 prune, recover, remove loop), ``sweep`` (grids
of runs on Ray Tune) and ``compare`` (tables and plots across sweeps and runs)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .config import PHASES, PRESETS, RunConfig, preset_config
from .criteria import available_criteria
from .devices import PRECISIONS
from .layout import GROUP_REDUCTIONS
from .pruning_config import ATTENUATE_TARGETS
from .methods import available_methods
from .models import VGG_CONFIGS, available_models
from .schedule import RAMPS
from .sweep.command import add_arguments as add_sweep_arguments
from .sweep.command import run_command as run_sweep_command
from .sweep.compare import add_arguments as add_compare_arguments
from .sweep.compare import run_command as run_compare_command

_PRUNING = "pruning (unset options take the preset's or the method's value)"
_TRAINING = "model and training"
_SCHEDULE = "learning-rate schedule"
_WHERE = "data, device, output"


def _interval(text: str):
    return text if text == "epoch" else int(text)


def field_options() -> dict[str, tuple[str, dict]]:
    """One option per RunConfig field but ``epochs`` (one per phase instead): its help group and
    argparse keywords. The option is ``--<field>`` (underscores as dashes); unset, it is None and
    the preset's value holds. tests/test_cli.py checks that every field is here."""
    fraction = dict(type=float, metavar="F")
    return {
        "preset": ("", dict(choices=list(PRESETS), default="quick",
                            help="smoke: seconds, for tests; quick (the default): VGG-16 x0.25 on "
                                 "a CPU; paper: full VGG-16 on a GPU")),
        "method": (_PRUNING, dict(choices=available_methods())),
        "criterion": (_PRUNING, dict(choices=available_criteria())),
        "ratio": (_PRUNING, dict(type=float, help="fraction of filters removed, in [0, 1)")),
        "scope": (_PRUNING, dict(choices=["layer", "global"])),
        "ramp": (_PRUNING, dict(choices=sorted(RAMPS))),
        "factor": (_PRUNING, dict(type=float, help="attenuation factor a in [0, 1]")),
        "eps": (_PRUNING, dict(type=float, help="removal threshold on the multiplier a^k")),
        "interval": (_PRUNING, dict(type=_interval,
                                    help="optimizer steps between attenuation steps, or 'epoch'")),
        "reversible": (_PRUNING, dict(action=argparse.BooleanOptionalAction,
                                      help="score weak filters as if unattenuated and restore "
                                           "returning ones")),
        "unattenuated_scores": (_PRUNING, dict(action=argparse.BooleanOptionalAction,
                                               help="score weak filters as if unattenuated (the score "
                                                    "divided by the multiplier; default: as "
                                                    "--reversible)")),
        "return_margin": (_PRUNING, dict(type=float, metavar="F",
                                         help="a weak filter returns only if its score exceeds its "
                                              "layer's weak threshold by this relative margin "
                                              "(default 0)")),
        "return_after": (_PRUNING, dict(type=int, metavar="R",
                                        help="a weak filter returns only after R consecutive "
                                             "attenuation steps left out of the selection (default 1)")),
        "group_reduce": (_PRUNING, dict(choices=list(GROUP_REDUCTIONS),
                                        help="how a group channel (one filter of each conv joined by a "
                                             "residual add, concat or depthwise conv) scores: the sum, "
                                             "mean or max of its filters' scores (default sum)")),
        "attenuate": (_PRUNING, dict(choices=list(ATTENUATE_TARGETS),
                                     help="what an attenuation step scales: the filter (weights, bias, "
                                          "BN; the rule), the BN's gamma (sfp's preset), or the "
                                          "channel's output through a straight-through soft mask")),
        "round_to": (_PRUNING, dict(type=int,
                                    help="round kept channels up to a multiple of this at removal")),
        "compact": (_TRAINING, dict(action=argparse.BooleanOptionalAction,
                                    help="cut removed filters out of the training network as they are removed "
                                         "(default; the same run up to rounding): --no-compact keeps the "
                                         "shapes static")),
        "model": (_TRAINING, dict(choices=available_models(),
                                  help="the network (default: VGG of --depth); b: ResNet shortcut "
                                       "option B (1x1 conv), else option A (zero padding)")),
        "depth": (_TRAINING, dict(type=int, choices=sorted(VGG_CONFIGS),
                                  help="VGG depth, when --model is not given")),
        "width": (_TRAINING, dict(type=float, help="channel width multiplier")),
        "batch_size": (_TRAINING, dict(type=int)),
        "lr": (_TRAINING, dict(type=float, help="peak learning rate")),
        "momentum": (_TRAINING, dict(type=float, help="Nesterov momentum")),
        "weight_decay": (_TRAINING, dict(type=float)),
        "label_smoothing": (_TRAINING, dict(type=float)),
        "seed": (_TRAINING, dict(type=int)),
        "lr_warmup_fraction": (_SCHEDULE, dict(fraction, help="share of the baseline's steps that "
                                                              "warm up")),
        "lr_warmup_start": (_SCHEDULE, dict(fraction, help="the warm-up's first rate, as a fraction "
                                                           "of --lr")),
        "lr_pruning_fraction": (_SCHEDULE, dict(fraction, help="the attenuation phase's rate (recovery "
                                                               "decays from it), as a fraction of --lr")),
        "lr_finetune_fraction": (_SCHEDULE, dict(fraction, help="fine-tuning's first rate, as a fraction "
                                                                "of --lr")),
        "data": (_WHERE, dict(help="cifar10.npz or a cifar-10-batches-py folder (else $ATTENUATION_DATA, "
                                   "then the default places, else a download)")),
        "train_subset": (_WHERE, dict(type=int, metavar="N", help="train on N images (class-balanced)")),
        "test_subset": (_WHERE, dict(type=int, metavar="N", help="test on N images (class-balanced)")),
        "val_split": (_WHERE, dict(type=int, metavar="N",
                                   help="hold N training images out for validation (class-balanced, "
                                        "fixed by the seed): each epoch is measured on them, the test "
                                        "set only at each phase's end (default 0: no split, each "
                                        "epoch on the test set)")),
        "device": (_WHERE, dict(help="auto, cpu, cuda or cuda:N")),
        "precision": (_WHERE, dict(choices=list(PRECISIONS),
                                   help="autocast of training and evaluation: auto (the default) "
                                        "computes in bfloat16 where the device does so natively (CUDA, "
                                        "CPUs with AVX-512 BF16 or AMX), else in float32")),
        "backend": (_WHERE, dict(help="ops backend (default: the fastest for the device)")),
        "latency_batch": (_WHERE, dict(type=int, metavar="N",
                                       help="batch size of the latency measurement")),
        "out": (_WHERE, dict(help="run folder (default: "
                                  "runs/<preset>-<method>-<criterion>-r<ratio>-s<seed>)")),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attenuation", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train, prune, recover, remove and fine-tune a CIFAR-10 model",
                              description="An unset option takes the preset's value.")
    groups = {name: run.add_argument_group(name) for name in (_PRUNING, _TRAINING, _SCHEDULE, _WHERE)}
    for name, (group, keywords) in field_options().items():
        groups.get(group, run).add_argument("--" + name.replace("_", "-"), **keywords)
    for phase in PHASES:
        groups[_TRAINING].add_argument(f"--epochs-{phase}", type=int, metavar="N",
                                       help=f"epochs of the {phase} phase")
    where = groups[_WHERE]
    where.add_argument("--download", action="store_true",
                       help="download CIFAR-10 with torchvision even if it is found (needs network)")
    where.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    where.add_argument("--baseline", metavar="PATH",
                       help="start from the finished baseline of another run (its baseline.pt, or its "
                            "folder) instead of training one; it must have the same model and training "
                            "configuration")
    where.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    sweep = commands.add_parser("sweep", help="a grid of runs (every run option may be a comma-separated "
                                              "list) on Ray Tune, with shared baselines",
                                description="Runs the cross product of the lists; rerun to resume.")
    add_sweep_arguments(sweep, field_options())
    add_compare_arguments(commands.add_parser(
        "compare", help="one table and Pareto plot from sweep and run folders"))
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset with every option the user set on top, field by field."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
                 if f.name not in ("preset", "epochs")}
    epochs = {phase: getattr(args, f"epochs_{phase}") for phase in PHASES}
    overrides["epochs"] = {k: v for k, v in epochs.items() if v is not None} or None
    return preset_config(args.preset, **overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sweep":
        return run_sweep_command(args)
    if args.command == "compare":
        return run_compare_command(args)
    from .run import run

    try:
        summary = run(config_from_args(args), resume=args.resume, progress=not args.no_progress,
                      download=args.download, baseline=args.baseline)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"attenuation: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

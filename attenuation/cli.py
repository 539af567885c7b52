"""``attenuation run``: the CIFAR-10 prune, recover, remove loop from the command line."""
from __future__ import annotations

import argparse
import json
import sys

from .config import PHASES, PRESETS, preset_config
from .criteria import available_criteria
from .methods import available_methods
from .schedule import RAMPS


def _interval(text: str):
    return text if text == "epoch" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attenuation", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train, prune, recover, remove and fine-tune a CIFAR-10 VGG",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--preset", choices=list(PRESETS), default="quick",
                     help="smoke: seconds, for tests; quick: VGG-16 x0.25 on a CPU; paper: full VGG-16 on a GPU")
    method = run.add_argument_group("pruning (unset options take the preset's or the method's value)")
    method.add_argument("--method", choices=available_methods())
    method.add_argument("--criterion", choices=available_criteria())
    method.add_argument("--ratio", type=float, help="fraction of filters removed, in [0, 1)")
    method.add_argument("--scope", choices=["layer", "global"])
    method.add_argument("--ramp", choices=sorted(RAMPS))
    method.add_argument("--factor", type=float, help="attenuation factor a in [0, 1]")
    method.add_argument("--eps", type=float, help="removal threshold on the multiplier a^k")
    method.add_argument("--interval", type=_interval, help="optimizer steps between attenuation steps, or 'epoch'")
    method.add_argument("--reversible", action="store_true", default=None,
                        help="score weak filters as if unattenuated and restore returning ones")
    method.add_argument("--round-to", type=int, help="round kept channels up to a multiple of this at removal")
    model = run.add_argument_group("model and training")
    model.add_argument("--depth", type=int, choices=[11, 13, 16, 19])
    model.add_argument("--width", type=float, help="channel width multiplier")
    for phase in PHASES:
        model.add_argument(f"--epochs-{phase}", type=int, metavar="N", help=f"epochs of the {phase} phase")
    model.add_argument("--batch-size", type=int)
    model.add_argument("--lr", type=float, help="peak learning rate")
    model.add_argument("--seed", type=int)
    where = run.add_argument_group("data, device, output")
    where.add_argument("--data", help="cifar10.npz or a cifar-10-batches-py folder (else $ATTENUATION_DATA, then defaults)")
    where.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision (needs network)")
    where.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    where.add_argument("--backend", help="ops backend (default: the fastest for the device)")
    where.add_argument("--out", help="run folder (default: runs/<preset>-<method>-<criterion>-r<ratio>-s<seed>)")
    where.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    where.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .ops import available_backends
    from .run import run

    if args.backend is not None and args.backend not in available_backends():
        print(f"attenuation: error: backend {args.backend!r} is not available "
              f"(available: {', '.join(available_backends())})", file=sys.stderr)
        return 2
    epochs = {phase: getattr(args, f"epochs_{phase}") for phase in PHASES}
    try:
        config = preset_config(
            args.preset, method=args.method, criterion=args.criterion, ratio=args.ratio,
            scope=args.scope, ramp=args.ramp, factor=args.factor, eps=args.eps,
            interval=args.interval, reversible=args.reversible, round_to=args.round_to, depth=args.depth, width=args.width,
            epochs={k: v for k, v in epochs.items() if v is not None} or None,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, data=args.data,
            device=args.device, backend=args.backend, out=args.out)
        summary = run(config, resume=args.resume, progress=not args.no_progress, download=args.download)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"attenuation: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""rdcd ship: put a trained student or a projection model inside the package, with its calibrated thresholds and model card."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("ship", help="put a trained student or a projection model inside the package "
                                           "(rdcd/weights/: weights, int8 file, calibrated thresholds, model card)",
                              description="Writes rdcd/weights/NAME.* of the installed package (see rdcd.ship). "
                                          "Thresholds and beta are chosen on --valbench only; --devbench is the "
                                          "final report.")
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True)

    s = sub.add_parser("student", help="a training run's student: fp16 weights, int8 file, thresholds, card")
    s.add_argument("--run", required=True, help="training run folder (model.pt, config.json, summary.json)")
    _common(s, "shipped name, rdcd-<backbone>-<dim>")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--int8-calibration", default=None,
                   help="images to calibrate the int8 file on (default: the run's training data)")
    s.add_argument("--int8-calibration-size", type=int, default=128, help="how many of them (spread evenly)")
    s.add_argument("--int8-weight-bits", type=int, choices=(7, 8), default=7,
                   help="int8 weight precision (rdcd export --weight-bits)")
    s.add_argument("--reuse", action="store_true",
                   help="keep the measurements of an existing NAME.json, rewrite the card texts only")
    s.add_argument("--keep-weights", action="store_true",
                   help="keep the shipped NAME.pt as it is and measure everything again (e.g. after a change "
                        "of the default input pipeline)")
    s.add_argument("--head-pcaw", type=int, default=None, metavar="DIM",
                   help="replace the run's head by PCA whitening of its backbone's GeM features to DIM dims "
                        "(fitted on --head-background)")
    s.add_argument("--head-background", default=None,
                   help="images the --head-pcaw whitening is fitted on: the training pool, never a benchmark")
    s.add_argument("--weights", default=None, metavar="FILE.pt",
                   help="ship this student file inside the run folder instead of its model.pt: a snapshot "
                        "stepN.pt, or an average of snapshots (scripts/average_snapshots.py)")
    s.set_defaults(func=run_student)

    j = sub.add_parser("projection", help="BASE[@SIZE]+pcawDIM fitted on the training pool: .npz, thresholds, card")
    j.add_argument("--spec", required=True, help="BASE[@SIZE]+pcawDIM (BASE: sscd, sscd-distilled or a run's model.pt)")
    _common(j, "shipped name")
    j.add_argument("--background", required=True, help="images the projection is fitted on (training pool)")
    j.set_defaults(func=run_projection)


def _common(parser, name_help: str) -> None:
    parser.add_argument("--name", required=True, help=name_help)
    parser.add_argument("--valbench", required=True, help="validation benchmark (held-out images)")
    parser.add_argument("--devbench", default=None, help="final-report benchmark (numbers only)")
    parser.add_argument("--default", action="store_true", help="make this the default model (rdcd-default); "
                                                                "the other cards lose the flag")
    parser.add_argument("--description", default=None)


def run_student(args) -> int:
    import torch

    from ..ship import ship_student, summary_lines

    torch.set_num_threads(args.threads)
    card = ship_student(args.run, args.name, args.valbench, args.devbench, args.default, args.description,
                        args.int8_calibration, args.int8_calibration_size, args.int8_weight_bits, args.reuse,
                        args.keep_weights, args.head_pcaw, args.head_background, args.weights)
    print("\n".join(summary_lines(card)), file=sys.stderr)
    return 0


def run_projection(args) -> int:
    from ..ship import ship_projection, summary_lines

    options = {"spec": args.spec, "name": args.name, "background": args.background, "valbench": args.valbench,
               "devbench": args.devbench}
    command = "rdcd ship projection " + " ".join(f"--{k} {v}" for k, v in options.items() if v is not None) \
        + (" --default" if args.default else "")
    card = ship_projection(args.spec, args.name, args.background, args.valbench, args.devbench, args.default,
                           args.description, command)
    print("\n".join(summary_lines(card)), file=sys.stderr)
    return 0

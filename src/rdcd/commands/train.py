"""rdcd train: distil a teacher into a compact student (RDCD). One call to rdcd.train.train.

The options are a table over TrainConfig's (and its LossConfig's) fields: the parser and
``config_from_args`` are both derived from it, and the types and defaults from the dataclasses.
"""
from __future__ import annotations

import argparse
import typing
from typing import NamedTuple


class Option(NamedTuple):
    field: str | None  # TrainConfig field, "loss.<field>" for LossConfig; None: not part of the config
    flag: str | None = None  # default: --field-name (a bool field: --no-field-name when it is on by default)
    help: str | None = None
    required: bool = False
    choices: typing.Sequence[str] | None = None
    metavar: str | None = None
    nargs: str | None = None
    negatable: bool = False  # bool field with both --flag and --no-flag (otherwise a switch flipping the default)
    exclusive: str | None = None  # options with the same name exclude each other


def options() -> dict[str, list[Option]]:
    """Argument groups of ``rdcd train`` with their options, in the order --help lists them."""
    from ..augment import AUGMENTATIONS
    from ..train.config import AMP_MODES, BN_MODES, HEAD_INITS

    return {
        "data and models": [
            Option("data", help="training images: a folder (recursive) or a file list", required=True),
            Option("output", help="run folder (config.json, log.csv, checkpoint.pt, model.pt)", required=True),
            Option("teacher", help="teacher model name or file (default: %(default)s)"),
            Option("student", help="timm backbone of the student (default: %(default)s)"),
            Option("pretrained", help="start the student from ImageNet weights (default: %(default)s)", negatable=True),
            Option("init", metavar="MODEL",
                   help="start from a trained student (shipped model name or student .pt) instead of ImageNet "
                        "weights; --student and --dim must match it"),
            Option("drop_blocks", nargs="+", metavar="S.I",
                   help="with --init: remove these residual blocks (stage.index of the full "
                        "backbone, e.g. 5.1; a wrong one is answered with the list) for a shallower, faster student"),
            Option("dim", help="descriptor size (default: %(default)s)"),
            Option("size", help="training view size in px (default: %(default)s)"),
            Option("eval_size", help="inference size stored in the model, used for validation (default: %(default)s)"),
            Option("augmentations", choices=list(AUGMENTATIONS)),
        ],
        "budget and optimisation": [
            Option("epochs", help="default: %(default)s", exclusive="budget"),
            Option("steps", help="train for N steps instead of --epochs", exclusive="budget"),
            Option("warmup_epochs", exclusive="warmup",
                   help="linear warm-up (default: %(default)s epochs; with --steps, the same share of it)"),
            Option("warmup_steps", exclusive="warmup"),
            Option("batch_size", help="images per process; global batch = this x processes (default: %(default)s)"),
            Option("lr", help="learning rate per 256 images (default: %(default)s)"),
            Option("momentum"),
            Option("weight_decay"),
            Option("key_momentum", help="EMA of the momentum student"),
            Option("seed"),
            Option("bn", choices=BN_MODES,
                   help="batch norm: batch statistics as the paper, or frozen running statistics "
                        "(default: %(default)s)"),
            Option("head_lr", help="learning-rate multiplier for the layers outside the backbone: fc, projector and "
                                   "GeM p (default: %(default)s)"),
            Option("head_init", choices=HEAD_INITS,
                   help="random (paper); teacher: fit fc to the teacher by ridge regression and set the projector "
                        "to the principal directions; pcaw: fc whitens the student's own features and the "
                        "projector keeps the top --dim components, so step 0 is PCA whitening of the backbone "
                        "(no teacher); fitted on --head-init-images views before step 1 (default: %(default)s)"),
            Option("head_init_images"),
            Option("feature_norm", help="standardise the GeM features before fc (statistics of --head-init-images "
                                        "views, saved in the model), so SGD can train the head at the backbone's "
                                        "learning rate"),
            Option("l2sp", help="L2-SP: add this weight times the squared distance of the backbone's weights from "
                                "their starting values to the loss (0: off; default: %(default)s)"),
            Option("freeze_stages", help="keep the stem and the first N stages of the backbone's blocks at their "
                                         "starting weights: no gradient and no backward pass through them, so a "
                                         "step costs less (0: train everything; default: %(default)s)"),
        ],
        "losses": [
            Option("loss.queue_size", "--queue-size", help="key and teacher queues (default: %(default)s)"),
            *(Option(f"loss.use_{term}", f"--no-{term}", help=f"switch L_{term} off (ablation)")
              for term in ("con", "hn", "rel")),
            *(Option(f"loss.{name}", "--" + name.replace("_", "-"))
              for name in ("lambda_con", "lambda_hn", "lambda_rel", "tau_con", "tau_s", "tau_t")),
            Option("loss.rel_include_batch", "--no-rel-batch",
                   help="leave the current batch's teacher features out of the relational bank"),
            Option("loss.mask_same_image", "--no-mask-same-image",
                   help="count queued keys of the query's own image as negatives of L_con / L_hn (off by default: "
                        "on a small training set the queue holds earlier views of most images)"),
            Option("loss.rel_mask_same_image", "--rel-mask-same-image",
                   help="also leave queued teacher features of the query's own image out of L_rel's bank"),
        ],
        "running": [
            Option(None, "--resume", help="continue the run in --output from its checkpoint"),
            Option("stop_at", help="end this invocation after step N (checkpoint written; schedule unchanged)"),
            Option("max_seconds", help="end this invocation once it has trained this long (checked at each log row; "
                                       "checkpoint written; --resume continues), e.g. to fit a time-boxed machine"),
            Option("workers", help="data loading processes per process"),
            Option("teacher_in_workers", help="run the (CPU) teacher inside the data loading processes"),
            Option("threads", help="compute threads per process"),
            Option("amp", choices=AMP_MODES, help="mixed precision (auto: bf16/fp16 on GPU, off on CPU)"),
            Option("log_every"),
            Option("checkpoint_every"),
            Option("val_benchmark",
                   help="benchmark folder (queries/, references/, ground_truth.csv) for uAP during training"),
            Option("val_every"),
            Option("tensorboard", "--no-tensorboard"),
        ],
    }


def _flag(option: Option) -> str:
    return option.flag or "--" + option.field.split(".")[-1].replace("_", "-")


def _dest(option: Option) -> str:
    return _flag(option)[2:].replace("-", "_")


def _field(option: Option):
    """(dataclass type, field name, default value, value type without None) of the option's config field."""
    from ..losses import LossConfig
    from ..train import TrainConfig

    cls, name = (LossConfig, option.field[5:]) if option.field.startswith("loss.") else (TrainConfig, option.field)
    hint = typing.get_type_hints(cls)[name]
    types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return cls, name, getattr(cls(), name), types[0]


def _add(group, option: Option) -> None:
    kwargs = {k: v for k, v in (("help", option.help), ("choices", option.choices), ("metavar", option.metavar),
                                ("nargs", option.nargs)) if v is not None}
    if option.required:
        kwargs["required"] = True
    if option.field is None:
        group.add_argument(_flag(option), action="store_true", **kwargs)
        return
    _, _, default, kind = _field(option)
    if kind is bool and option.negatable:
        group.add_argument(_flag(option), action=argparse.BooleanOptionalAction, default=default, **kwargs)
    elif kind is bool:  # a switch away from the default
        group.add_argument(_flag(option), action="store_true", **kwargs)
    else:
        if kind in (int, float):
            kwargs["type"] = kind
        group.add_argument(_flag(option), default=None if option.required else default, **kwargs)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an RDCD student from unlabelled images",
        description="Train a small student network with a compact descriptor by relational self-supervised "
                    "distillation from a frozen teacher (RDCD). Defaults are the paper's setting. Multi-process: "
                    "torchrun --nproc_per_node N -m rdcd train ... (DDP; the batch size is per process).")
    for title, group_options in options().items():
        group, exclusive = p.add_argument_group(title), {}
        for option in group_options:
            if option.exclusive and option.exclusive not in exclusive:
                exclusive[option.exclusive] = group.add_mutually_exclusive_group()
            _add(exclusive[option.exclusive] if option.exclusive else group, option)
    p.set_defaults(func=run)


def config_from_args(args):
    from ..losses import LossConfig
    from ..train import TrainConfig

    values: dict[type, dict] = {TrainConfig: {}, LossConfig: {}}
    for option in (o for group in options().values() for o in group if o.field is not None):
        cls, name, default, kind = _field(option)
        value = getattr(args, _dest(option))
        if kind is bool and not option.negatable:  # a switch: given, the setting is the opposite of its default
            value = default != value
        values[cls][name] = list(value) if isinstance(value, (list, tuple)) else value
    return TrainConfig(**values[TrainConfig], loss=LossConfig(**values[LossConfig]))


def run(args) -> int:
    from ..train import train

    train(config_from_args(args), resume=args.resume)
    return 0

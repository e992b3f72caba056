"""rdcd train: distil a teacher into a compact student (RDCD). One call to rdcd.train.train."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..losses import LossConfig
    from ..train import TrainConfig

    d, dl = TrainConfig(), LossConfig()
    p = subparsers.add_parser(
        "train", help="train an RDCD student from unlabelled images",
        description="Train a small student network with a compact descriptor by relational self-supervised "
                    "distillation from a frozen teacher (RDCD). Defaults are the paper's setting. Multi-process: "
                    "torchrun --nproc_per_node N -m rdcd train ... (DDP; the batch size is per process).")
    g = p.add_argument_group("data and models")
    g.add_argument("--data", required=True, help="training images: a folder (recursive) or a file list")
    g.add_argument("--output", required=True, help="run folder (config.json, log.csv, checkpoint.pt, model.pt)")
    g.add_argument("--teacher", default=d.teacher, help="teacher model name or file (default: %(default)s)")
    g.add_argument("--student", default=d.student, help="timm backbone of the student (default: %(default)s)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=d.pretrained,
                   help="start the student from ImageNet weights (default: %(default)s)")
    g.add_argument("--init", default=None, metavar="MODEL",
                   help="start from a trained student (shipped model name or student .pt) instead of ImageNet "
                        "weights; --student and --dim must match it")
    g.add_argument("--drop-blocks", nargs="+", default=[], metavar="S.I",
                   help="with --init: remove these residual blocks (stage.index of the full "
                        "backbone, e.g. 5.1; a wrong one is answered with the list) for a shallower, faster student")
    g.add_argument("--dim", type=int, default=d.dim, help="descriptor size (default: %(default)s)")
    g.add_argument("--size", type=int, default=d.size, help="training view size in px (default: %(default)s)")
    g.add_argument("--eval-size", type=int, default=d.eval_size,
                   help="inference size stored in the model, used for validation (default: %(default)s)")
    g.add_argument("--augmentations", choices=["advanced", "light"], default=d.augmentations)

    g = p.add_argument_group("budget and optimisation")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    budget.add_argument("--steps", type=int, default=None, help="train for N steps instead of --epochs")
    warmup = g.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                        help="linear warm-up (default: %(default)s epochs; with --steps, the same share of it)")
    warmup.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per process; global batch = this x processes (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate per 256 images (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--key-momentum", type=float, default=d.key_momentum, help="EMA of the momentum student")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--bn", choices=["batch", "frozen"], default=d.bn,
                   help="batch norm: batch statistics as the paper, or frozen running statistics (default: %(default)s)")
    g.add_argument("--head-lr", type=float, default=d.head_lr,
                   help="learning-rate multiplier for the layers outside the backbone: fc, projector and GeM p "
                        "(default: %(default)s)")
    g.add_argument("--head-init", choices=["random", "teacher", "pcaw"], default=d.head_init,
                   help="random (paper); teacher: fit fc to the teacher by ridge regression and set the projector "
                        "to the principal directions; pcaw: fc whitens the student's own features and the "
                        "projector keeps the top --dim components, so step 0 is PCA whitening of the backbone "
                        "(no teacher); fitted on --head-init-images views before step 1 (default: %(default)s)")
    g.add_argument("--head-init-images", type=int, default=d.head_init_images)
    g.add_argument("--feature-norm", action="store_true",
                   help="standardise the GeM features before fc (statistics of --head-init-images views, saved "
                        "in the model), so SGD can train the head at the backbone's learning rate")

    g = p.add_argument_group("losses")
    g.add_argument("--queue-size", type=int, default=dl.queue_size, help="key and teacher queues (default: %(default)s)")
    for term in ("con", "hn", "rel"):
        g.add_argument(f"--no-{term}", action="store_true", help=f"switch L_{term} off (ablation)")
    g.add_argument("--lambda-con", type=float, default=dl.lambda_con)
    g.add_argument("--lambda-hn", type=float, default=dl.lambda_hn)
    g.add_argument("--lambda-rel", type=float, default=dl.lambda_rel)
    g.add_argument("--tau-con", type=float, default=dl.tau_con)
    g.add_argument("--tau-s", type=float, default=dl.tau_s)
    g.add_argument("--tau-t", type=float, default=dl.tau_t)
    g.add_argument("--no-rel-batch", action="store_true",
                   help="leave the current batch's teacher features out of the relational bank")
    g.add_argument("--no-mask-same-image", action="store_true",
                   help="count queued keys of the query's own image as negatives of L_con / L_hn (off by default: "
                        "on a small training set the queue holds earlier views of most images)")
    g.add_argument("--rel-mask-same-image", action="store_true",
                   help="also leave queued teacher features of the query's own image out of L_rel's bank")

    g = p.add_argument_group("running")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    g.add_argument("--stop-at", type=int, default=None,
                   help="end this invocation after step N (checkpoint written; schedule unchanged)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="end this invocation once it has trained this long (checked at each log row; checkpoint "
                        "written; --resume continues), e.g. to fit a time-boxed machine")
    g.add_argument("--workers", type=int, default=None, help="data loading processes per process")
    g.add_argument("--teacher-in-workers", action="store_true",
                   help="run the (CPU) teacher inside the data loading processes")
    g.add_argument("--threads", type=int, default=None, help="compute threads per process")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=d.amp,
                   help="mixed precision (auto: bf16/fp16 on GPU, off on CPU)")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--val-benchmark", default=None,
                   help="benchmark folder (queries/, references/, ground_truth.csv) for uAP during training")
    g.add_argument("--val-every", type=int, default=d.val_every)
    g.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=run)


def config_from_args(args):
    from ..losses import LossConfig
    from ..train import TrainConfig

    loss = LossConfig(
        lambda_con=args.lambda_con, lambda_hn=args.lambda_hn, lambda_rel=args.lambda_rel,
        use_con=not args.no_con, use_hn=not args.no_hn, use_rel=not args.no_rel,
        tau_con=args.tau_con, tau_s=args.tau_s, tau_t=args.tau_t, rel_include_batch=not args.no_rel_batch,
        mask_same_image=not args.no_mask_same_image, rel_mask_same_image=args.rel_mask_same_image,
        queue_size=args.queue_size)
    return TrainConfig(
        data=args.data, output=args.output, teacher=args.teacher, student=args.student, pretrained=args.pretrained,
        init=args.init, drop_blocks=list(args.drop_blocks), dim=args.dim, size=args.size, eval_size=args.eval_size,
        augmentations=args.augmentations,
        epochs=args.epochs, steps=args.steps, warmup_epochs=args.warmup_epochs, warmup_steps=args.warmup_steps,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        key_momentum=args.key_momentum, bn=args.bn, head_lr=args.head_lr,
        head_init=args.head_init, head_init_images=args.head_init_images, feature_norm=args.feature_norm, loss=loss, seed=args.seed, workers=args.workers,
        teacher_in_workers=args.teacher_in_workers, threads=args.threads, amp=args.amp, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, val_benchmark=args.val_benchmark, val_every=args.val_every,
        stop_at=args.stop_at, max_seconds=args.max_seconds, tensorboard=not args.no_tensorboard)


def run(args) -> int:
    from ..train import train

    train(config_from_args(args), resume=args.resume)
    return 0

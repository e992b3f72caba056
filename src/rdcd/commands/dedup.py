"""rdcd dedup: groups of copies inside one collection (images, or a reference store) -> CSV (+ HTML)."""
from __future__ import annotations

import sys

from .common import add_embedding_arguments, add_model_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("dedup", help="find groups of copies inside one collection -> groups CSV",
                              description="Self kNN over the collection, pairs at or above the threshold linked, "
                                          "groups = connected components (docs/store.md).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder, file list or image (ids are file stems)")
    source.add_argument("--index", help="a reference store (rdcd index create): group its references")
    add_model_argument(p)
    p.add_argument("--output", required=True, help="CSV: image_id, group, group_size, best_score, path")
    p.add_argument("--threshold", default="auto", metavar="SCORE|auto",
                   help="link score (default auto: the shipped model's calibrated threshold; with --index, the "
                        "store's threshold)")
    p.add_argument("--k", type=int, default=10, help="neighbours searched per image (default: %(default)s)")
    p.add_argument("--html", default=None, help="also write a page of the groups as thumbnails")
    p.add_argument("--batch-size", type=int, default=32)
    add_embedding_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..dedup import dedup_images, dedup_store, write_groups, write_groups_html

    if args.index:
        from ..store import ReferenceStore

        threshold = None if args.threshold == "auto" else float(args.threshold)
        groups = dedup_store(ReferenceStore.open(args.index), threshold, args.k)
    else:
        groups = dedup_images(args.images, args.model, args.threshold, args.k, args.precision,
                              draft=not args.exact_decode, batch_size=args.batch_size)
    write_groups(args.output, groups)
    members = groups.members()
    print(f"rdcd: {len(groups.ids)} images, {len(members)} group(s) of copies holding "
          f"{sum(len(m) for m in members)} images (threshold {groups.threshold:.4f}) -> {args.output}", file=sys.stderr)
    if args.html:
        write_groups_html(args.html, groups)
        print(f"rdcd: thumbnails -> {args.html}", file=sys.stderr)
    return 0

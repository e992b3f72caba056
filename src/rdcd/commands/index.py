"""rdcd index: a persistent reference store (create, add, remove, info, query; rdcd.store.ReferenceStore)."""
from __future__ import annotations

import json
import sys

from .common import add_embedding_arguments, add_model_argument

STORE_HELP = "the store: a folder (SQLite + FAISS), or milvus:URI (a milvus-lite .db file or a Milvus server)"


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="a persistent reference store: create, add, remove, info, query",
                              description="Keep references on disk and check queries against them without "
                                          "re-embedding them (docs/store.md).")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = sub.add_parser("create", help="a new, empty store for one model and match settings")
    c.add_argument("--index", required=True, help=STORE_HELP)
    add_model_argument(c)
    c.add_argument("--faiss-index", default="Flat", help="FAISS factory string (Flat = exact, HNSW32, IVF1024,Flat...)")
    c.add_argument("--k", type=int, default=10, help="references returned per query (default: %(default)s)")
    c.add_argument("--nprobe", type=int, default=None)
    c.add_argument("--ef-search", type=int, default=None)
    c.add_argument("--background", nargs="+", default=None, help="background images or descriptors for "
                                                                 "--score-norm / --whiten (kept in the store)")
    c.add_argument("--score-norm", action="store_true")
    c.add_argument("--beta", type=float, default=None)
    c.add_argument("--ranks", type=int, nargs=2, default=(0, 2), metavar=("I", "J"))
    c.add_argument("--whiten", type=int, default=None, metavar="DIM")
    c.add_argument("--threshold", default=None, metavar="SCORE|auto",
                   help="copy decision threshold (default: auto for shipped models, none for others)")
    add_embedding_arguments(c, " (recorded in the store)")
    c.set_defaults(func=create)

    a = sub.add_parser("add", help="add images (embedded with the store's model) or descriptor files")
    a.add_argument("--index", required=True, help=STORE_HELP)
    source = a.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder, file list or image; ids are file stems")
    source.add_argument("--descriptors", nargs="+", help="descriptor files made with the store's model")
    a.add_argument("--label", default=None, help="a label kept with each added reference")
    a.add_argument("--upsert", action="store_true", help="replace references whose id is already there")
    a.add_argument("--batch-size", type=int, default=32)
    a.set_defaults(func=add)

    r = sub.add_parser("remove", help="remove references by id")
    r.add_argument("--index", required=True, help=STORE_HELP)
    r.add_argument("ids", nargs="+")
    r.set_defaults(func=remove)

    i = sub.add_parser("info", help="print the store's model record, settings and size as JSON")
    i.add_argument("--index", required=True, help=STORE_HELP)
    i.set_defaults(func=info)

    q = sub.add_parser("query", help="queries (images or descriptors) x the store -> predictions CSV")
    q.add_argument("--index", required=True, help=STORE_HELP)
    q.add_argument("--queries", required=True, nargs="+", help="query images or descriptor files")
    q.add_argument("--output", required=True, help="predictions CSV")
    q.add_argument("--k", type=int, default=None, help="references per query (default: the store's)")
    q.add_argument("--threshold", type=float, default=None,
                   help="print the pairs scoring at least this (default: the store's threshold, if any)")
    q.add_argument("--batch-size", type=int, default=32)
    q.set_defaults(func=query)


def _default_threshold(args):
    from ..models.shipped import card_for

    if args.threshold is not None:
        return args.threshold
    return "auto" if card_for(args.model) is not None and not args.whiten else None


def create(args) -> int:
    from ..store import ReferenceStore
    from .match import _one_or_many

    store = ReferenceStore.create(
        args.index, args.model, background=_one_or_many(args.background), k=args.k, index=args.faiss_index,
        score_norm=args.score_norm, whiten_dim=args.whiten, beta=args.beta, ranks=tuple(args.ranks),
        nprobe=args.nprobe, ef_search=args.ef_search, threshold=_default_threshold(args), precision=args.precision,
        draft=not args.exact_decode)
    print(f"rdcd: created {args.index} for {store.record['rdcd.model']} ({store.dim}-d"
          + (f", threshold {store.threshold:.4f}" if store.threshold is not None else "") + ")", file=sys.stderr)
    return 0


def add(args) -> int:
    from ..descriptors import descriptor_info, read_descriptors
    from ..store import ReferenceStore

    store = ReferenceStore.open(args.index)
    if args.images:
        n = store.add_images(args.images, label=args.label, upsert=args.upsert, batch_size=args.batch_size)
    else:
        ids, vectors = read_descriptors(args.descriptors)
        meta = [{"source": str(args.descriptors[0]), **({"label": args.label} if args.label else {})}] * len(ids)
        n = store.add(ids, vectors, meta, upsert=args.upsert, info=descriptor_info(args.descriptors))
    print(f"rdcd: added {n} reference(s); {len(store)} in {args.index}", file=sys.stderr)
    return 0


def remove(args) -> int:
    from ..store import ReferenceStore

    store = ReferenceStore.open(args.index)
    removed = store.remove(args.ids)
    missing = sorted(set(args.ids) - set(removed))
    print(f"rdcd: removed {len(removed)} reference(s); {len(store)} in {args.index}"
          + (f"; not found: {', '.join(missing)}" if missing else ""), file=sys.stderr)
    return 1 if missing else 0


def info(args) -> int:
    from ..store import ReferenceStore

    print(json.dumps(ReferenceStore.open(args.index).info(), indent=2))
    return 0


def query(args) -> int:
    from ..descriptors import descriptor_info
    from ..match import is_image_source, load_set
    from ..metrics import write_predictions
    from ..store import ReferenceStore
    from .match import _one_or_many

    store = ReferenceStore.open(args.index)
    source = _one_or_many(args.queries)
    if is_image_source(source):
        predictions = store.query_images(source, k=args.k, batch_size=args.batch_size)
    else:
        ids, vectors = load_set(source)
        predictions = store.query(ids, vectors, k=args.k, info=descriptor_info(source))
    write_predictions(args.output, predictions)
    print(f"rdcd: {len(predictions)} candidate pairs -> {args.output}", file=sys.stderr)
    threshold = args.threshold if args.threshold is not None else store.threshold
    if threshold is not None:
        found = store.copies(predictions, threshold)
        print(f"rdcd: {len(found)} pair(s) score >= {threshold:.4f} (marked as copies)", file=sys.stderr)
        print("query_id,reference_id,score")
        for q, r, s in found.rows():
            print(f"{q},{r},{s:.4f}")
    return 0

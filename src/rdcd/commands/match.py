"""rdcd match: queries x references -> predictions CSV (candidate copy pairs with scores)."""
from __future__ import annotations

import sys

from .common import add_embedding_arguments, add_model_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("match", help="find candidate copies of queries among references -> predictions CSV",
                              description="Each of --queries, --references, --background is descriptor files "
                                          "(.h5/.hdf5/.npy; several shards are read in order) or images (a folder, "
                                          "a file list or one image), which are embedded with --model.")
    p.add_argument("--queries", required=True, nargs="+", help="query descriptors or images")
    p.add_argument("--references", required=True, nargs="+", help="reference descriptors or images")
    p.add_argument("--background", nargs="+", default=None,
                   help="background set for --score-norm / --whiten (e.g. the DISC2021 training images; "
                        "never the references)")
    add_model_argument(p)
    p.add_argument("--output", required=True, help="predictions CSV to write (settings go to *.config.json beside it)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default: %(default)s)")
    p.add_argument("--global-n", type=int, default=None,
                   help="keep the N best pairs over all queries instead of k per query (DISC2021 descriptor track)")
    p.add_argument("--index", default="Flat",
                   help="FAISS factory string: Flat (exact, default), IVF1024,Flat, IVF4096,PQ32, HNSW32, ...")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search depth")
    p.add_argument("--score-norm", action="store_true",
                   help="subtract beta * mean similarity of each query to its nearest background images")
    p.add_argument("--beta", type=float, default=None,
                   help="score normalisation weight (default: the shipped model's calibrated beta, shown by "
                        "`rdcd models`; 1, as SSCD, for any other model or for descriptor files)")
    p.add_argument("--ranks", type=int, nargs=2, default=(0, 2), metavar=("I", "J"),
                   help="background neighbour ranks averaged by score normalisation (default: 0 2)")
    p.add_argument("--whiten", type=int, default=None, metavar="DIM",
                   help="PCA-whiten to DIM dimensions (fitted on the background set), then L2-normalise")
    p.add_argument("--keep-descriptors", default=None, metavar="DIR",
                   help="save descriptors extracted from images in DIR (queries.h5, references.h5, background.h5)")
    p.add_argument("--threshold", default=None, metavar="SCORE|auto",
                   help="mark pairs scoring at least SCORE as copies: printed and written to OUTPUT.copies.csv; "
                        "auto = the shipped model's calibrated threshold (precision 0.9 on its validation benchmark; "
                        "a starting point, check it on your own data)")
    p.add_argument("--allow-mixed-models", action="store_true",
                   help="match descriptor files that say they were made by different models (an error otherwise: "
                        "their scores are not comparable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: by core count)")
    p.add_argument("--threads", type=int, default=None, help="FAISS search threads (default: all cores)")
    add_embedding_arguments(p, ' of image sets')
    p.set_defaults(func=run)


def _one_or_many(values):
    return values[0] if values and len(values) == 1 else values


def run(args) -> int:
    from ..match import copies, copies_path, match

    predictions = match(
        _one_or_many(args.queries), _one_or_many(args.references), model=args.model,
        background=_one_or_many(args.background), k=args.k, index=args.index, score_norm=args.score_norm,
        whiten_dim=args.whiten, global_n=args.global_n, output=args.output, keep_descriptors_dir=args.keep_descriptors,
        beta=args.beta, ranks=tuple(args.ranks), nprobe=args.nprobe, ef_search=args.ef_search,
        batch_size=args.batch_size, workers=args.workers, threads=args.threads, threshold=args.threshold,
        precision=args.precision, draft=not args.exact_decode, allow_mixed_models=args.allow_mixed_models,
    )
    print(f"rdcd: {len(predictions)} candidate pairs -> {args.output}", file=sys.stderr)
    resolved = predictions.config  # beta and the threshold, given or from the model card, resolved once
    if args.score_norm:
        print(f"rdcd: score normalisation with beta {resolved.beta:g} ({resolved.beta_source})", file=sys.stderr)
    if args.threshold is not None:
        threshold = resolved.threshold
        if resolved.threshold_source != "given":
            print(f"rdcd: threshold {threshold:.4f} from {resolved.threshold_source}", file=sys.stderr)
        found = copies(predictions, threshold)
        print(f"rdcd: {len(found)} pair(s) score >= {threshold:.4f} (marked as copies) -> {copies_path(args.output)}",
              file=sys.stderr)
        print("query_id,reference_id,score")
        for q, r, s in found.rows():
            print(f"{q},{r},{s:.4f}")
    return 0

"""Queries x references -> candidate copy pairs: the API behind ``rdcd match``.

descriptors (files, or extracted from images) -> optional PCA whitening fitted on the background
set -> FAISS index of the references -> per-query kNN or global best-N pairs, with optional
score normalisation against the background set -> predictions CSV.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from rdcd.descriptors import atomic_path, descriptor_dim, descriptor_info, read_descriptors
from rdcd.images import list_images
from rdcd.metrics import Predictions, write_predictions
from rdcd.postprocess import PCAWhitening, ScoreNormalizer
from rdcd.search import Index, as_matrix, best_pairs, knn_pairs, set_threads

log = logging.getLogger(__name__)

DESCRIPTOR_SUFFIXES = (".h5", ".hdf5", ".npy")

#: descriptor file(s), an image folder / image file list / list of image paths, or (ids, vectors) in memory
ImageSet = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], tuple]


@dataclass
class MatchConfig:
    """How candidate pairs are made; defaults follow the SSCD/RDCD protocol (k = 10, exact inner product)."""

    k: int = 10
    index: str = "Flat"
    nprobe: int | None = None
    ef_search: int | None = None
    global_n: int | None = None  # keep the N best pairs over all queries instead of k per query
    score_norm: bool = False
    beta: float = 1.0
    beta_source: str | None = None  # "given", the shipped model's card, or SSCD's default
    ranks: tuple[int, int] = (0, 2)
    whiten_dim: int | None = None
    model: str | None = None
    runtime: str | None = None  # how the model embedded the image sets (rdcd.models.runtime), if it did
    draft: bool | None = None  # JPEG draft decoding of the image sets, if the model embedded any
    threshold: float | None = None  # pairs scoring at least this are marked as copies
    threshold_source: str | None = None  # "given", or the model card it was read from (threshold="auto")


@dataclass
class MatchResult(Predictions):
    """What ``match`` returns: the candidate pairs (a ``Predictions``, usable as one) and the
    settings it resolved (``config``: beta and threshold with where they came from, how the model ran)."""

    config: MatchConfig | None = None


def is_descriptor_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in DESCRIPTOR_SUFFIXES


def load_set(
    source: ImageSet,
    model=None,
    name: str = "images",
    keep_descriptors_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    draft: bool = True,
) -> tuple[list[str], np.ndarray]:
    """(ids, vectors) of one image set: read from descriptor files, or extracted from images with ``model``
    (anything ``rdcd.extract.extract`` takes, a resolved ``ModelRuntime`` included)."""
    if _in_memory(source):
        ids, vectors = source
        return [str(i) for i in ids], np.asarray(vectors, dtype=np.float32)
    if not is_image_source(source):
        return read_descriptors(source)
    if model is None:
        raise _needs_model(name, source)
    from rdcd.extract import extract

    output = Path(keep_descriptors_dir) / f"{name}.h5" if keep_descriptors_dir else None
    result = extract(model, source, output=output, batch_size=batch_size, workers=workers, draft=draft)
    if result.failures:
        log.warning("%s: %d image(s) could not be read and are left out", name, len(result.failures))
    return list(result.ids), result.vectors


def check_sets(sets: dict[str, ImageSet], model=None) -> int:
    """Check, without embedding anything, that every set can be read and that all have one
    dimension (images: the model's); returns it. Raises FileNotFoundError / ValueError naming the set."""
    dims = {}
    for name, source in sets.items():
        if _in_memory(source):
            dims[name] = np.asarray(source[1]).shape[-1]
        elif not is_image_source(source):
            dims[name] = descriptor_dim(source)
        elif model is None:
            raise _needs_model(name, source)
        else:
            try:
                list_images(source)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
            dims[name] = model.dim
    if len(set(dims.values())) > 1:
        raise ValueError("the sets' descriptors differ in dimension (" + ", ".join(f"{n} {d}" for n, d in dims.items())
                         + "); all sets must come from the same model")
    return next(iter(dims.values()))


def _needs_model(name: str, source) -> ValueError:
    return ValueError(
        f"{name}: {_describe(source)} is not a descriptor file ({', '.join(DESCRIPTOR_SUFFIXES)}), so it is read "
        "as images, which needs a model: pass model= (CLI: --model NAME_OR_FILE; `rdcd models` lists names)")


def _in_memory(source) -> bool:
    return isinstance(source, tuple) and len(source) == 2 and not isinstance(source[0], (str, os.PathLike))


def is_image_source(source: ImageSet) -> bool:
    """True unless ``source`` is in-memory (ids, vectors) or descriptor files."""
    if _in_memory(source):
        return False
    files = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    return not (files and all(is_descriptor_file(f) for f in files))


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"a list of {len(source)} paths"


class Matcher:
    """The search half of ``match`` as an estimator: ``fit`` indexes the references once (and fits the PCA
    whitening and/or score normaliser of ``config`` on a background set); ``search`` then answers any
    number of query batches with the same pairs ``match`` would give.

    >>> matcher = Matcher(MatchConfig(k=10, score_norm=True)).fit((reference_ids, references), background)
    >>> predictions = matcher.search(query_ids, queries)
    """

    def __init__(self, config: MatchConfig | None = None):
        self.config = config or MatchConfig()
        self.whitening_: PCAWhitening | None = None
        self.normalizer_: ScoreNormalizer | None = None
        self.index_ = None  # rdcd.search.Index, or anything with its search(vectors, k), dim and len()

    def fit_background(self, background: np.ndarray | None) -> "Matcher":
        """Fit what ``config`` learns from the background set (nothing when it asks for neither)."""
        c = self.config
        if not (c.score_norm or c.whiten_dim):
            return self
        if background is None:
            raise ValueError("score normalisation and whitening need a background set: descriptors of a "
                             "collection unrelated to the references, e.g. the DISC2021 training images")
        background = as_matrix(background, what="background descriptors")
        if c.whiten_dim:
            self.whitening_ = PCAWhitening(c.whiten_dim).fit(background)
            background = self.whitening_.transform(background)
        if c.score_norm:
            self.normalizer_ = ScoreNormalizer(c.beta, c.ranks, c.index, c.nprobe, c.ef_search).fit(background)
        return self

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Descriptors in the space the index searches (whitened when ``config.whiten_dim``)."""
        vectors = as_matrix(vectors)
        return vectors if self.whitening_ is None else self.whitening_.transform(vectors)

    @property
    def dim(self) -> int:
        """The dimension of the descriptors it takes (before any whitening)."""
        if self.whitening_ is not None:
            return self.whitening_.projection_.shape[0]
        if self.index_ is None:
            raise RuntimeError("Matcher is not fitted")
        return self.index_.dim

    def fit(self, references: tuple[Sequence[str], np.ndarray], background: np.ndarray | None = None) -> "Matcher":
        ids, vectors = references
        vectors = as_matrix(vectors, what="reference descriptors")
        if background is not None and np.shape(background)[-1] != vectors.shape[1]:
            raise ValueError(f"background descriptors have dimension {np.shape(background)[-1]} but references "
                             f"{vectors.shape[1]}; all sets must come from the same model")
        self.fit_background(background)
        c = self.config
        self.index_ = Index.build(ids, self.transform(vectors), c.index, nprobe=c.nprobe, ef_search=c.ef_search)
        return self

    def search(self, query_ids: Sequence[str], query_vectors: np.ndarray) -> Predictions:
        """Candidate pairs of these queries: k per query, or the ``global_n`` best over them."""
        if self.index_ is None:
            raise RuntimeError("Matcher is not fitted; call fit(references, background) first")
        if np.shape(query_vectors)[-1] != self.dim:
            raise ValueError(f"query descriptors have dimension {np.shape(query_vectors)[-1]} but references "
                             f"{self.dim}; both sets must come from the same model")
        queries = self.transform(query_vectors)
        offsets = None if self.normalizer_ is None else self.normalizer_.bias(queries)
        c = self.config
        if c.global_n:
            return best_pairs(query_ids, queries, self.index_, n=c.global_n, k=c.k, offsets=offsets)
        return knn_pairs(query_ids, queries, self.index_, k=c.k, offsets=offsets)


def match(
    queries: ImageSet,
    references: ImageSet,
    model=None,
    background: ImageSet | None = None,
    k: int = 10,
    index: str = "Flat",
    score_norm: bool = False,
    whiten_dim: int | None = None,
    global_n: int | None = None,
    output: str | os.PathLike | None = None,
    keep_descriptors_dir: str | os.PathLike | None = None,
    beta: float | None = None,
    ranks: tuple[int, int] = (0, 2),
    nprobe: int | None = None,
    ef_search: int | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    threads: int | None = None,
    threshold: float | str | None = None,
    precision: str = "auto",
    draft: bool = True,
    allow_mixed_models: bool = False,
) -> MatchResult:
    """Candidate copy pairs between ``queries`` and ``references``, best first within each query (kNN mode)
    or over all queries (``global_n``).

    Each image set is descriptor files (``.h5``/``.hdf5``/``.npy``, shards in order), an image folder
    or file list (embedded with ``model``, a DescriptorModel, registry name or model file), or an
    ``(ids, vectors)`` pair. ``background`` (training-set images, never the references) is needed for
    ``score_norm`` (subtract beta * mean similarity to the background at ``ranks``; ``beta=None``: the
    shipped model's calibrated beta, SSCD's 1 for any other model, ``resolve_beta``) and ``whiten_dim``
    (PCA whitening fitted on it). With ``output`` the predictions CSV is written there and the
    resolved settings beside it (``*.config.json``); ``keep_descriptors_dir`` keeps descriptors
    extracted from images as ``queries.h5``, ``references.h5``, ``background.h5``.

    ``threshold``: a score, or ``"auto"`` for the threshold calibrated for the model (its card's
    precision-0.9 threshold, with or without score normalisation; shipped models only). The pairs
    scoring at least the threshold are the copies (``copies(predictions, config)``); with ``output``
    they are also written to ``*.copies.csv``. All candidate pairs stay in the predictions.
    ``precision``: how a model embeds image sets, as ``rdcd.models.runtime.resolve_runtime`` (``auto``: a
    shipped model's int8 file on a CPU); ``draft``: JPEG draft decoding (as ``rdcd.extract.extract``).

    Everything checkable is checked before any image is embedded: every set exists and holds
    images or readable descriptor files, the model loads, the dimensions agree, and descriptor files
    made by different models raise unless ``allow_mixed_models`` (``check_same_origin``).
    """
    if (score_norm or whiten_dim) and background is None:
        raise ValueError(
            "score normalisation and whitening need a background set (CLI: --background): descriptors or images "
            "of a collection unrelated to the references, e.g. the DISC2021 training images"
        )
    sets = [queries, references] + ([background] if score_norm or whiten_dim else [])
    embeds = model is not None and any(is_image_source(s) for s in sets)
    if threshold is not None:
        check_auto_inputs(threshold, queries, references)
    # the model's one runtime decision (card, precision, runtime), when the model makes the descriptors
    # here: the card's beta and thresholds apply only then (descriptor files carry no model)
    resolved = _resolve_for_match(model, background, precision, draft, threshold) if embeds else None
    card = resolved.card if resolved is not None else None
    beta, beta_source = resolve_beta(beta, card)
    config = MatchConfig(
        k=k, index=index, nprobe=nprobe, ef_search=ef_search, global_n=global_n, score_norm=score_norm,
        beta=beta, beta_source=beta_source, ranks=tuple(ranks), whiten_dim=whiten_dim,
    )
    if threshold is not None:
        # auto: the int8 file's own thresholds where that file embeds the sets
        config.threshold, config.threshold_source = resolve_threshold(
            threshold, card, score_norm, whiten_dim, beta, tuple(ranks), resolved is not None and resolved.int8,
            model_name=getattr(model, "name", model))
    set_threads(threads)
    if score_norm:
        log.info("score normalisation: beta %g, ranks %d..%d", beta, *ranks)
    if resolved is not None:
        config.model = getattr(model, "name", str(model))
        model = resolved.model  # loaded once: every image set must be embedded by the same weights
        config.runtime, config.draft = resolved.how, draft
        log.info("%s", resolved.how)
    named = {"queries": queries, "references": references}
    if background is not None and (score_norm or whiten_dim):
        named["background"] = background
    check_sets(named, model)
    check_same_origin({name: _set_info(source, model, draft) for name, source in named.items()}, allow_mixed_models)
    load = dict(model=resolved or model, keep_descriptors_dir=keep_descriptors_dir, batch_size=batch_size, workers=workers,
                draft=draft)
    query_ids, query_vectors = load_set(queries, name="queries", **load)
    reference_ids, reference_vectors = load_set(references, name="references", **load)
    if query_vectors.shape[1] != reference_vectors.shape[1]:
        raise ValueError(
            f"query descriptors have dimension {query_vectors.shape[1]} but references {reference_vectors.shape[1]}; "
            "both sets must come from the same model"
        )
    if background is not None and not (score_norm or whiten_dim):
        log.warning("a background set was given but neither score normalisation nor whitening is on; ignoring it")
    background_vectors = None
    if background is not None and (score_norm or whiten_dim):
        _, background_vectors = load_set(background, name="background", **load)
    log.info("indexing %d references (%s)", len(reference_ids), index)
    predictions = Matcher(config).fit((reference_ids, reference_vectors), background_vectors).search(
        query_ids, query_vectors)

    if output is not None:
        output = write_predictions(output, predictions)
        if config.threshold is not None:
            write_predictions(copies_path(output), copies(predictions, config.threshold))
        with atomic_path(config_path(output)) as tmp:
            tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
        log.info("wrote %d predictions to %s", len(predictions), output)
    return MatchResult(predictions.query_ids, predictions.reference_ids, predictions.scores, config=config)


def _resolve_for_match(model, background, precision: str, draft: bool, threshold):
    """The runtime of the model that embeds the image sets; ``BASE+pcawDIM``: its projection fitted on
    the background images (cached) first, after the checks that need no fitting."""
    from rdcd.models.projected import parse_projection, resolve_projection
    from rdcd.models.runtime import resolve_runtime

    if not hasattr(model, "embed") and parse_projection(str(model)) is not None:
        if _is_auto(threshold):  # a projection fitted here has no card: fail before fitting it
            resolve_threshold(threshold, None, False, None, model_name=model)
        model = resolve_projection(model, background if background is not None and is_image_source(background)
                                   else None, precision=precision, draft=draft)
    return resolve_runtime(model, precision)


def resolve_beta(beta: float | None, card=None) -> tuple[float, str]:
    """(score-normalisation weight, where it came from): ``beta`` as given; ``None``: the beta in the
    shipped model's card (``rdcd.models.shipped.ModelCard``, chosen on its validation benchmark, the
    one its ``auto`` threshold was calibrated with), or SSCD's 1 for every other model (``card`` None,
    and for descriptor files, which carry no model)."""
    if beta is not None:
        return float(beta), "given"
    if card is not None and card.beta is not None:
        return card.beta, str(card.card_path)
    return 1.0, "SSCD's default"


def _is_auto(threshold) -> bool:
    return isinstance(threshold, str) and threshold.strip().lower() == "auto"


def _set_info(source, model, draft: bool) -> dict[str, str]:
    """How an image set's descriptors are made here, or were made (a descriptor file's attributes)."""
    if _in_memory(source):
        return {}
    if is_image_source(source):
        from rdcd.extract import descriptor_info_of

        return descriptor_info_of(model, model.input_size, draft) if hasattr(model, "embed") else {}
    return descriptor_info(source)


ORIGIN_KEYS = ("rdcd.model", "rdcd.input_size", "rdcd.decode")


def check_same_origin(infos: dict[str, dict[str, str]], allow_mixed_models: bool = False) -> list[str]:
    """Compare how the sets' descriptors were made. Different models (not just the int8 and fp32
    files of one model) raise ValueError unless ``allow_mixed_models``: their scores mean nothing.
    Another precision (``-int8`` names), input size or JPEG decoding, or mixed models allowed, are
    warned about (and the messages returned). Sets that say nothing (``.npy``, other tools, in
    memory) are not checked."""
    problems = []
    for key in ORIGIN_KEYS:
        seen = {name: info[key] for name, info in infos.items() if key in info}
        if len(set(seen.values())) > 1:
            message = (f"the sets' descriptors differ in {key}: " + ", ".join(f"{n} {v}" for n, v in seen.items())
                       + "; scores between them are not comparable: make them all with one model and settings")
            models = {v.removesuffix("-int8") for v in seen.values()}
            if key == "rdcd.model" and len(models) > 1 and not allow_mixed_models:
                raise ValueError(message + " (or allow it: allow_mixed_models=True, CLI --allow-mixed-models)")
            problems.append(message)
    for message in problems:
        log.warning("%s", message)
    return problems


def check_auto_inputs(threshold, queries: ImageSet, references: ImageSet) -> None:
    """``auto`` needs both sets embedded here, from images, by the shipped model: descriptors read
    from files may come from any model (of the same dimension), whose scores the card says nothing about."""
    if _is_auto(threshold) and not all(is_image_source(s) for s in (queries, references)):
        raise ValueError("threshold 'auto' is calibrated for the descriptors a shipped model makes from images; "
                         "with descriptor files rdcd cannot tell which model made them: give a number instead")


def resolve_threshold(threshold: float | str, card, score_norm: bool, whiten_dim: int | None,
                      beta: float = 1.0, ranks: tuple[int, int] = (0, 2), int8: bool = False,
                      model_name=None) -> tuple[float, str]:
    """(threshold, where it came from) for ``match(threshold=...)``: a number as given, or ``"auto"``:
    the threshold in the shipped model's card (``rdcd.models.shipped.ModelCard``; None: the model,
    ``model_name``, has none) that reached precision 0.9 on its validation benchmark (raw or
    score-normalised scores; the latter only with the card's beta and ranks). ``int8``: the
    descriptors come from the model's shipped int8 file, whose own calibrated thresholds the card
    holds too (cards without them: the fp32 ones)."""
    if not _is_auto(threshold):
        try:
            return float(threshold), "given"
        except (TypeError, ValueError):
            raise ValueError(f"threshold must be a number or 'auto', not {threshold!r}") from None
    if card is None:
        raise ValueError(
            f"--threshold auto needs a shipped model with a calibrated threshold (`rdcd models` marks them); "
            f"model {model_name!r} has none: give a number instead (e.g. `rdcd bench` on your own labelled benchmark "
            "reports threshold_at_p90)")
    if whiten_dim:
        raise ValueError(f"{card.name}: its thresholds were calibrated without whitening; with --whiten give "
                         "a number instead of auto")
    key = "score_norm" if score_norm else "raw"
    entry, of_int8 = card.threshold(key, int8)
    if entry is None or entry.threshold is None:
        raise ValueError(f"{card.card_path}: no calibrated {key} threshold; give a number instead of auto")
    if score_norm:
        if (entry.beta, entry.ranks) != (float(beta), tuple(ranks)):
            raise ValueError(f"{card.card_path}: the score-normalised threshold was calibrated with beta "
                             f"{entry.beta} and ranks {entry.ranks}, not {beta} and {tuple(ranks)}; give a number")
        log.warning("score-normalised scores also depend on the background set; the calibrated threshold assumed "
                    "one like the benchmark's train/ images, so check it on your data")
    which = ", int8 file" if of_int8 else ""
    precision = "?" if entry.precision is None else entry.precision
    return float(entry.threshold), f"{card.card_path} ({key}{which}: precision {precision} on " \
        f"{entry.benchmark or 'its validation benchmark'})"


def copies(predictions: Predictions, threshold: float) -> Predictions:
    """The pairs marked as copies: score >= threshold, best first."""
    keep = np.flatnonzero(predictions.scores >= threshold)
    keep = keep[np.argsort(-predictions.scores[keep], kind="stable")]
    return predictions.subset(keep)


def copies_path(output: str | os.PathLike) -> Path:
    """``matches.csv`` -> ``matches.copies.csv``: the pairs at or above the threshold."""
    output = Path(output)
    return output.with_name(output.stem + ".copies.csv")


def config_path(output: str | os.PathLike) -> Path:
    """Where ``match`` records its settings next to a predictions file: ``matches.csv`` -> ``matches.config.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".config.json")

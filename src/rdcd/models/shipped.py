"""Trained models that ship inside the package (``rdcd/weights/``), each with a model card.

Each shipped model is three files in ``rdcd/weights/``: ``NAME.pt`` (an rdcd student file) or
``NAME.npz`` (a projection fitted on another model's outputs, ``rdcd.models.projected``; its card's
``base`` names the model it runs and ``licence`` that model's terms),
``NAME.json`` (machine-readable card: dimension, input size, calibrated thresholds, whether it is
the default) and ``NAME.md`` (the model card for people: data, command, steps, results); and,
where the card has an ``int8`` entry, ``NAME.int8.onnx``: the same model quantised to int8 for
ONNX Runtime (``rdcd export --precision int8``, calibrated on training images), which ``rdcd
extract`` runs by default on a CPU (``int8_file``). Every
``NAME.json`` found is registered under ``NAME``; the one marked ``"default": true`` is also
registered as ``rdcd-default``, the model ``rdcd extract`` / ``match`` / ``export`` use without
``--model``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_ALIAS = "rdcd-default"
REQUIRED_KEYS = ("name", "file", "dim")


class CardError(ValueError):
    """A shipped model card is unreadable or inconsistent."""


@dataclass(frozen=True)
class CalibratedThreshold:
    """A threshold calibrated on a validation benchmark (``NAME.json`` ``thresholds.raw`` / ``.score_norm``):
    the score at which the model reached ``precision`` there; score-normalised ones with their beta and ranks."""

    threshold: float | None
    precision: float | None = None
    benchmark: str | None = None
    beta: float = 1.0
    ranks: tuple[int, int] = (0, 2)

    @classmethod
    def from_dict(cls, entry) -> "CalibratedThreshold | None":
        if not isinstance(entry, dict):
            return None
        return cls(entry.get("threshold"), entry.get("precision"), entry.get("benchmark"),
                   float(entry.get("beta", 1.0)), tuple(entry.get("ranks", (0, 2))))


def _thresholds(entries) -> dict[str, CalibratedThreshold]:
    parsed = {key: CalibratedThreshold.from_dict(e) for key, e in (entries or {}).items()}
    return {key: t for key, t in parsed.items() if t is not None}


@dataclass(frozen=True)
class Int8Entry:
    """A card's ``int8`` entry: the int8 ONNX file, the sha256 of the weights it was made from, its
    own calibrated thresholds and (in ``data``) its benchmark results."""

    file: str
    weights_sha256: str | None
    thresholds: dict[str, CalibratedThreshold]
    data: dict = field(repr=False)


@dataclass(frozen=True)
class ModelCard:
    """The machine-readable card of a shipped model (``NAME.json``), checked and typed. ``data`` is
    the whole JSON document, for what only the human card and the shipping tools read (training run,
    validation and devbench results)."""

    name: str
    file: str
    dim: int
    path: Path  # the weights file (NAME.pt or NAME.npz)
    card_path: Path
    input_size: int | None = None
    default: bool = False
    description: str | None = None
    base: str | None = None  # projection models: the model they run
    thresholds: dict[str, CalibratedThreshold] = field(default_factory=dict)
    int8: Int8Entry | None = None
    data: dict = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        """``projection`` (an ``.npz`` fitted on another model's outputs) or ``student`` (an rdcd ``.pt``)."""
        return self.data.get("kind") or ("projection" if self.file.endswith(".npz") else "student")

    @property
    def beta(self) -> float | None:
        """The score-normalisation weight calibrated with the card's score-normalised threshold, if any."""
        entry = (self.data.get("thresholds") or {}).get("score_norm") or {}
        return float(entry["beta"]) if "beta" in entry else None

    def threshold(self, key: str, int8: bool = False) -> tuple[CalibratedThreshold | None, bool]:
        """The calibrated ``raw`` or ``score_norm`` threshold; with ``int8`` the int8 file's own where the
        card has one. Returns it and whether it is the int8 file's."""
        if int8 and self.int8 is not None and self.int8.thresholds.get(key):
            return self.int8.thresholds[key], True
        return self.thresholds.get(key), False

    @classmethod
    def from_dict(cls, data: dict, card_path: str | os.PathLike) -> "ModelCard":
        card_path = Path(card_path)
        int8 = data.get("int8")
        return cls(
            name=data["name"], file=data["file"], dim=int(data["dim"]), path=card_path.parent / data["file"],
            card_path=card_path, input_size=data.get("input_size"), default=bool(data.get("default")),
            description=data.get("description"), base=data.get("base"), thresholds=_thresholds(data.get("thresholds")),
            int8=None if int8 is None else Int8Entry(int8["file"], int8.get("weights_sha256"),
                                                     _thresholds(int8.get("thresholds")), int8),
            data=data)


def read_card(path: str | os.PathLike) -> ModelCard:
    """The JSON card of a shipped model, checked: required keys present and the weights file beside it."""
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: cannot read the model card ({e})") from e
    missing = [k for k in REQUIRED_KEYS if k not in card]
    if missing:
        raise CardError(f"{path}: model card lacks {', '.join(missing)}")
    weights = path.parent / card["file"]
    if not weights.is_file():
        raise CardError(f"{path}: weights file {weights} is missing")
    if card.get("int8") is not None and not (isinstance(card["int8"], dict) and card["int8"].get("file")):
        raise CardError(f"{path}: its int8 entry must name a file ({card['int8']!r})")
    return ModelCard.from_dict(card, path)


def shipped_cards(folder: str | os.PathLike = WEIGHTS_DIR, strict: bool = True) -> list[ModelCard]:
    """The checked cards in ``folder``. ``strict=False`` (used at import) warns about a bad card and
    leaves it out, and registers no default when several claim it, so one broken file cannot stop
    every rdcd command (including the ones that would repair it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cards = []
    for path in sorted(folder.glob("*.json")):
        try:
            cards.append(read_card(path))
        except CardError as e:
            if strict:
                raise
            warnings.warn(f"rdcd: skipping a shipped model: {e}", stacklevel=2)
    defaults = [c.name for c in cards if c.default]
    if len(defaults) > 1:
        message = f"{folder}: several model cards claim to be the default: {', '.join(defaults)}"
        if strict:
            raise CardError(message)
        warnings.warn(f"rdcd: {message}; none is registered as {DEFAULT_ALIAS}", stacklevel=2)
        cards = [dataclasses.replace(c, default=False) for c in cards]
    return cards


def card_for(model) -> ModelCard | None:
    """The card of a registry name (``rdcd-default`` included) or a shipped weights path; None otherwise
    (a loaded model included: its card is the one it was resolved with, ``rdcd.models.runtime``)."""
    from . import MODEL_REGISTRY

    if model is None or hasattr(model, "embed"):
        return None
    entry = MODEL_REGISTRY.get(str(model))
    if entry is not None:
        return entry.card
    try:
        resolved = Path(model).resolve()
    except (TypeError, OSError):
        return None
    for entry in MODEL_REGISTRY.values():
        if entry.card is not None and entry.card.path.resolve() == resolved:
            return entry.card
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read once per (path, size, modification time) in this process:
    ``int8_file`` checks the shipped weights every time a command picks a runtime."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def int8_file(card: ModelCard | None) -> tuple[Path | None, str]:
    """The shipped int8 ONNX file of a model card, and why not when there is none: the card names
    no int8 file, the file is missing, or it was made from other weights than the card's ``.pt``
    (its ``weights_sha256`` differs: a re-shipped model whose int8 file was not rebuilt)."""
    if card is None or card.int8 is None:
        return None, "no int8 file ships with this model"
    path = card.path.parent / card.int8.file
    if not path.is_file():
        return None, f"its int8 file {path} is missing"
    if card.int8.weights_sha256 != file_sha256(card.path):
        return None, (f"its int8 file {path} was made from other weights than {card.path} "
                      "(rebuild it with rdcd ship)")
    return path, ""


def register_shipped(folder: str | os.PathLike = WEIGHTS_DIR, strict: bool = False) -> list[str]:
    """Register every shipped model (and the ``rdcd-default`` alias); returns the names. Bad cards
    are skipped with a warning unless ``strict``."""
    from . import load_model_file, register_model

    names = []
    for card in shipped_cards(folder, strict=strict):
        def factory(_path=str(card.path), _name=card.name, _projection=card.kind == "projection", **kwargs):
            if _projection:
                from .projected import load_projected

                return load_projected(_path, name=_name, **kwargs)
            return load_model_file(_path, **kwargs)

        description = card.description or f"shipped RDCD student ({card.dim}-d)"
        register_model(card.name, factory, card.dim, description, card=card)
        names.append(card.name)
        if card.default:
            register_model(DEFAULT_ALIAS, factory, card.dim, f"the default model: {card.name}", card=card)
            names.append(DEFAULT_ALIAS)
    return names

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

import functools
import json
import os
import warnings
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_ALIAS = "rdcd-default"
REQUIRED_KEYS = ("name", "file", "dim")


class CardError(ValueError):
    """A shipped model card is unreadable or inconsistent."""


def read_card(path: str | os.PathLike) -> dict:
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
    card = dict(card)
    card["path"] = str(weights)
    card["card_path"] = str(path)
    return card


def shipped_cards(folder: str | os.PathLike = WEIGHTS_DIR, strict: bool = True) -> list[dict]:
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
    defaults = [c["name"] for c in cards if c.get("default")]
    if len(defaults) > 1:
        message = f"{folder}: several model cards claim to be the default: {', '.join(defaults)}"
        if strict:
            raise CardError(message)
        warnings.warn(f"rdcd: {message}; none is registered as {DEFAULT_ALIAS}", stacklevel=2)
        cards = [dict(c, default=False) for c in cards]
    return cards


def card_for(model) -> dict | None:
    """The card of a registry name (``rdcd-default`` included) or a shipped weights path; None otherwise."""
    from . import MODEL_REGISTRY

    entry = MODEL_REGISTRY.get(str(model))
    if entry is not None:
        return entry.card
    try:
        resolved = Path(model).resolve()
    except (TypeError, OSError):
        return None
    for entry in MODEL_REGISTRY.values():
        if entry.card is not None and Path(entry.card["path"]).resolve() == resolved:
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


def int8_file(card: dict | None) -> tuple[Path | None, str]:
    """The shipped int8 ONNX file of a model card, and why not when there is none: the card names
    no int8 file, the file is missing, or it was made from other weights than the card's ``.pt``
    (its ``weights_sha256`` differs: a re-shipped model whose int8 file was not rebuilt)."""
    if not card or not card.get("int8"):
        return None, "no int8 file ships with this model"
    entry = card["int8"]
    path = Path(card["path"]).parent / entry["file"]
    if not path.is_file():
        return None, f"its int8 file {path} is missing"
    if entry.get("weights_sha256") != file_sha256(card["path"]):
        return None, (f"its int8 file {path} was made from other weights than {card['path']} "
                      "(rebuild it with scripts/ship_model.py)")
    return path, ""


def register_shipped(folder: str | os.PathLike = WEIGHTS_DIR, strict: bool = False) -> list[str]:
    """Register every shipped model (and the ``rdcd-default`` alias); returns the names. Bad cards
    are skipped with a warning unless ``strict``."""
    from . import load_model_file, register_model

    names = []
    for card in shipped_cards(folder, strict=strict):
        def factory(_path=card["path"], _name=card["name"], **kwargs):
            if _path.endswith(".npz"):  # a projection model: the card names it
                from .projected import load_projected

                return load_projected(_path, name=_name, **kwargs)
            return load_model_file(_path, **kwargs)

        description = card.get("description", f"shipped RDCD student ({card['dim']}-d)")
        register_model(card["name"], factory, card["dim"], description, card=card)
        names.append(card["name"])
        if card.get("default"):
            register_model(DEFAULT_ALIAS, factory, card["dim"], f"the default model: {card['name']}", card=card)
            names.append(DEFAULT_ALIAS)
    return names

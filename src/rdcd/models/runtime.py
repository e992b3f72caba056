"""One decision per model: which weights run, at which precision, in which runtime.

``resolve_runtime(spec, precision, runtime)`` looks the model card up once, picks the shipped int8
file or the fp32 weights, loads the model once and returns a ``ModelRuntime`` record; ``rdcd
extract``, ``match``, ``bench``, ``dedup``, the store and ``rdcd models`` read that record instead of
asking again. ``rdcd.export.choose_runtime`` (which imports PyTorch) is only reached for models that
run PyTorch, so the default model on a CPU starts without it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import distributed as du
from .base import DescriptorModel
from .shipped import ModelCard, card_for, int8_file

#: ``--precision`` of extract / match / bench: a shipped student's int8 file or its fp32 weights
PRECISIONS = ("auto", "fp32", "int8")


@dataclass(frozen=True)
class ModelRuntime:
    """How one model makes descriptors in this process."""

    model: DescriptorModel  # loaded, in the runtime it runs with
    card: ModelCard | None  # the shipped model's card, None for any other model
    precision: str  # a shipped student: "int8" (its int8 file) or "fp32" (its weights); any other model "as is"
    how: str  # one line: the model, its runtime and precision
    file: Path | None  # the file whose weights run (shipped int8 file, shipped weights or the model file), if any

    @property
    def int8(self) -> bool:
        return self.precision == "int8"


def shipped_int8(card: ModelCard | None, name, runtime: str = "auto", precision: str = "auto",
                 warn: bool = False) -> Path | None:
    """The shipped int8 file to run for a model with this card and these settings, else None (no
    card, no valid int8 file, ``precision`` fp32, ``runtime`` torch, or a GPU with ``precision``
    auto). Any model without a card runs as it is (with ``warn``, a note says so when ``precision``
    is not auto). Raises for ``precision="int8"`` on a shipped model without a valid int8 file."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if card is None:
        if warn and precision != "auto":
            print(f"rdcd: note: --precision {precision} chooses between a shipped student's fp32 weights and its "
                  f"int8 file; {name} is not one and runs as it is (int8 of another model: rdcd export "
                  "--precision int8, then --model FILE)", file=sys.stderr)
        return None
    if precision == "fp32":
        return None
    path, why_not = int8_file(card)
    if precision == "int8" and path is None:
        raise ValueError(f"{name}: --precision int8, but {why_not}")
    if precision == "int8" and runtime == "torch":
        raise ValueError("precision int8 runs in ONNX Runtime only; drop --runtime torch")
    if path is None:
        if warn and card.int8 is not None:
            print(f"rdcd: warning: {card.name}: {why_not}; using fp32", file=sys.stderr)
        return None
    if runtime == "torch" or (precision == "auto" and du.gpu_available()):
        return None
    return path


def resolve_runtime(spec: str | os.PathLike | DescriptorModel, precision: str = "auto", runtime: str = "auto",
                    device=None) -> ModelRuntime:
    """Resolve a model spec (registry name, file, ``student:``..., or a loaded model) once.

    A shipped model (name or weights path) with an int8 file runs that file in ONNX Runtime when
    ``precision`` is ``auto`` (or ``int8``), ``runtime`` allows ONNX Runtime and no GPU would run
    PyTorch: the fastest path measured on CPU (docs/bench_inference.md), descriptors within cosine
    ~0.99 of fp32 and devbench uAP within a point (model cards). Otherwise
    ``rdcd.export.choose_runtime`` (fp32: ONNX Runtime for PyTorch files on a CPU). ``device``: where
    a PyTorch model runs (default: this rank's GPU, if any). Load once and pass ``.model`` on when
    embedding several sets: an untrained ``student:`` spec gets new random weights at every load."""
    card = card_for(spec)
    name = getattr(spec, "name", spec)
    int8 = shipped_int8(card, name, runtime, precision, warn=True)
    if int8 is not None:
        from .onnx import OnnxModel

        # on the CPU whatever else is installed: an int8 QDQ graph is a CPU format here
        fast = OnnxModel(int8, input_size=card.input_size, threads=du.cpu_threads_per_process(),
                         providers=["CPUExecutionProvider"])
        return ModelRuntime(fast, card, "int8", f"{card.name} runs with ONNX Runtime int8 on the CPU (shipped file "
                            f"{int8.name}; --precision fp32 for the fp32 weights)", int8)
    source = spec
    if card is not None and card.kind != "projection":
        source = card.path  # a shipped student: its file, which may run in ONNX Runtime
    from_file = not isinstance(source, DescriptorModel) and Path(source).is_file()
    loaded = _load(source, device)
    file = card.path if card is not None else Path(source) if from_file else None
    if not loaded.runs_torch and runtime != "onnxruntime":  # ONNX files, hashes, projections of them
        from . import runtime_line

        return ModelRuntime(loaded, card, _precision(card), runtime_line(loaded), file)
    from ..export import choose_runtime  # imports torch, which the models above run without

    model, how = choose_runtime(loaded, runtime, from_file, du.cpu_threads_per_process())
    return ModelRuntime(model, card, _precision(card), how, file)


def _precision(card: ModelCard | None) -> str:
    return "fp32" if card is not None and card.kind != "projection" else "as is"


def _load(model, device=None) -> DescriptorModel:
    if isinstance(model, DescriptorModel):
        return model
    from . import load_model

    s = str(model)
    torch_spec = s.startswith("student:") or s.endswith((".pt", ".pth"))
    return load_model(model, **({"device": device or du.default_device()} if torch_spec else {}))

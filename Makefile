# Two commands for a fresh machine: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/r50.py
WORKDIR ?= workdir/$(basename $(notdir $(CONFIG)))
ARGS ?=
PYTEST_ARGS ?= -n 2 --dist worksteal

.PHONY: setup train test test-fast lint format bench bench-pipeline clean

# The stamp makes setup idempotent: pip runs again only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) -m resnet_jax.train --config $(CONFIG) --workdir $(WORKDIR) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: no subprocess, no training loop (a few minutes on 2 cores).
test-fast: setup
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

bench: setup
	$(PY) -m experiments.benchmark $(ARGS)

# JPEG decode + RandomResizedCrop + flip: grain against torchvision's DataLoader (docs/PERFORMANCE.md).
bench-pipeline: setup
	$(PY) -m experiments.pipeline_benchmark $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

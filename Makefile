# Two commands set up a fresh machine that has only python3 (3.11+) and make:
#   make demo   runs the job on the embedded sandbox API with sample_data/
#   make test   runs lint, type checks and the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m batchjob demo

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) reports .pytest_cache .mypy_cache .ruff_cache

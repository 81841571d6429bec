# Single entry point. `make benchmark` and `make test` both set up the environment first (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup benchmark test lint format clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,fid]"
	touch $(STAMP)

setup: $(STAMP)

benchmark: $(STAMP)
	$(BIN)/dit-optimum benchmark

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks demo
	$(BIN)/ruff format --check src tests scripts benchmarks demo

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts benchmarks demo
	$(BIN)/ruff format src tests scripts benchmarks demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

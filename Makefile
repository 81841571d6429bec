# Single entry point. `make benchmark` and `make test` both set up the environment first (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup benchmark test lint format docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,fid,demo,docs,openvino,onnxruntime]"
	# the tests' local Hub server (olah), in its own environment: its web stack must not move the project's pins
	$(PYTHON) -m venv $(VENV)-olah
	$(VENV)-olah/bin/pip install --quiet olah==0.5.4
	touch $(STAMP)

setup: $(STAMP)

benchmark: $(STAMP)
	$(BIN)/dit-optimum benchmark

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks demo
	$(BIN)/ruff format --check src tests scripts benchmarks demo

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts benchmarks demo
	$(BIN)/ruff format src tests scripts benchmarks demo

clean:
	rm -rf $(VENV) $(VENV)-olah build site src/*.egg-info .pytest_cache

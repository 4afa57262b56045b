# lora-compare: `make demo` runs the demo end to end, `make test` runs the tests.
# Both create .venv in the repo when needed: torch 2.13.0 first (a CPU build on this kind of machine;
# the Docker image installs a CUDA torch instead), then the project with its dev extras.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lora-compare --database-url sqlite:///demo.db demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check contract db producer worker tests examples bench
	$(BIN)/mypy contract db producer
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) demo.db demo.db-wal demo.db-shm .pytest_cache

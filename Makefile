# lora-compare: `make demo` runs the demo end to end, `make test` runs the tests.
# Both create .venv in the repo when needed: the locked versions of every dependency
# (requirements.lock, hashes checked; the Docker image installs the same file), torch 2.13.0 (a CPU
# build on this kind of machine; the image installs the CUDA build of the same version from
# requirements-cuda.lock), then the project itself with its dev extras, then lm-evaluation-harness
# (requirements-harness.lock: only what the `harness` extra adds, the tests' reference for the
# log-likelihood tasks; never in the image), and `pip check`.
# `make lock` regenerates the three lock files with uv; `make compose-test` runs the Docker deployment
# for real (needs a Docker engine; not part of `make test`).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean lock compose-test

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-harness.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-harness.lock
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lora-compare --database-url sqlite:///demo.db demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check contract db producer worker tests examples bench
	$(BIN)/mypy contract db producer
	$(BIN)/lint-imports

# The three lock files from pyproject.toml, keeping current pins (UPGRADE=1: the newest allowed); needs uv.
lock:
	$(PYTHON) .ci/lock.py $(if $(UPGRADE),--upgrade)

# The Docker Compose deployment end to end on a real engine (about 15 min; see docs/deploying.md).
compose-test:
	bash .ci/compose-test

clean:
	rm -rf $(VENV) demo.db demo.db-wal demo.db-shm .pytest_cache

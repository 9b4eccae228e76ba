# Every target runs in ./.venv and installs it first when it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Python 3.10: from pyenv when it has one, else from PATH.
OLDEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) python3.10)
OLDEST := .venv-oldest

# Every Python the package declares (pyproject's classifiers list the same).
MATRIX_PYTHONS ?= 3.10 3.11 3.12 3.13

# The suite's processes (pytest-xdist); PYTEST_WORKERS=0 runs it in this one.
PYTEST_WORKERS ?= 3
export PYTEST_WORKERS

.PHONY: install test test-oldest test-matrix lint format bench demo build clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

# The suite on the oldest Python with every dependency at its lower bound.
test-oldest:
	rm -rf $(OLDEST)
	$(OLDEST_PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet -c constraints-oldest.txt -e '.[dev]'
	$(OLDEST)/bin/python -m pytest -n $(PYTEST_WORKERS)

# The suite on every supported Python with the newest dependencies.
# MATRIX_SKIP: versions already run elsewhere (CI: the one `make test` ran).
test-matrix:
	tools/test_matrix.sh $(filter-out $(MATRIX_SKIP),$(MATRIX_PYTHONS))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict taskiq_fastapi taskiq_fastapi_cli
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The example on Redis; `make demo BROKER=nats` on NATS JetStream instead.
BROKER ?= redis
demo: $(STAMP)
	BROKER=$(BROKER) $(BIN)/python examples/demo.py

build: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) $(OLDEST) $(addprefix .venv-,$(MATRIX_PYTHONS)) dist build .mypy_cache .ruff_cache

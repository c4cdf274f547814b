# kapi: `make demo` and `make test` work on a fresh machine; both install .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test lint typecheck proto proto-check bench bench-repository clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(PY) -m kapi.demo

test: install lint typecheck proto-check
	$(PY) -m pytest -q

lint: install
	$(BIN)/ruff check services tests bench protos
	$(BIN)/ruff format --check services tests bench protos

typecheck: install
	$(BIN)/mypy

proto: install
	$(PY) protos/generate.py

proto-check: install
	$(PY) protos/generate.py --check

bench: install
	$(PY) bench/node.py

bench-repository: install
	$(PY) bench/repository.py

clean:
	rm -rf $(VENV) bench/results .pytest_cache .mypy_cache .ruff_cache

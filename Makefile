# kapi: `make demo` and `make test` work on a fresh machine; both install .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install datasets demo test lint typecheck proto proto-check bench bench-repository bench-trainer bench-optimizer bench-gateway clean

install: $(VENV)/.installed datasets

# Debian's dataset-fashion-mnist, the trainer's full-size dataset: installed when it is
# missing and apt-get runs as root here, else said.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
datasets:
	@test -d $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get -qq update && apt-get -qq install -y dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "warning: $(FASHION_MNIST) is missing: apt-get install dataset-fashion-mnist" >&2; \
	  fi; }

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

bench-trainer: install
	$(PY) bench/trainer.py

bench-optimizer: install
	$(PY) bench/optimizer.py

# nginx (the gateway's peer) is installed from Debian on first use when missing, as root.
bench-gateway: install
	$(PY) bench/gateway.py

clean:
	rm -rf $(VENV) bench/results .pytest_cache .mypy_cache .ruff_cache

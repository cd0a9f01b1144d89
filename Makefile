# Set-up and the two main jobs. Every target creates the environment if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies on the development machines' disk; pinning it avoids a multi-GB CUDA download.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint env gpu-test clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[hf,eval,triton,dev,serve]"
	touch $(STAMP)

# The GPU machines' Triton beside the installed one, for the tests only: tests/ops/test_compile_sm90.py also compiles
# the kernels for sm_90 with it (newer Tritons accept code that it refuses).
GPU_TRITON := $(VENV)/triton-3.6/.installed
$(GPU_TRITON): $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-3.6 triton==3.6.0
	touch $(GPU_TRITON)

demo: $(STAMP)
	$(VENV)/bin/ssmtune demo

test: $(STAMP) $(GPU_TRITON)
	$(PY) -m pytest -q -x -p no:cacheprovider --timeout 900

lint: $(STAMP)
	$(VENV)/bin/ruff check ssmtune tests
	$(VENV)/bin/ruff format --check ssmtune tests

# On the GPU machine (torch and triton come with its image): the full kernel sweeps.
gpu-test:
	$(PYTHON) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) runs

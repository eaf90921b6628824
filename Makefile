# The two commands a newcomer needs:
#   make demo   set up .venv from nothing and run the whole job on the embedded default
#   make test   set up .venv (if needed) and run the test suite
# GPU machines: make setup TORCH=torch   (PyPI's default torch wheel is a CUDA build)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that a CPU machine does not pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m job.run --config configs/demo.yaml

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

clean:
	rm -rf runs

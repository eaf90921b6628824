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

.PHONY: setup system demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Debian packages the tests need, installed once, as root: headless Chromium renders the monitoring report;
# a Java 17 runtime runs the local Spark session that scores a DataFrame through the registered model.
system:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "the tests need chromium: apt-get install -y chromium (as root)"; exit 1; }
	@command -v java >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; } \
	  || { echo "the tests need Java 17: apt-get install -y openjdk-17-jre-headless (as root)"; exit 1; }

demo: setup
	$(PY) -m job.run --config configs/demo.yaml

test: setup system
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf runs

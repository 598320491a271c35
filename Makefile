# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use;
# the demo installs only the core package, the tests add their extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.core-installed
TEST := $(VENV)/.test-installed

.PHONY: demo test env clean

$(CORE): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first, so that the project's loose torch range is already satisfied.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(TEST): $(CORE)
	$(PY) -m pip install -q -e '.[test,forecasting,serve,tune]'
	# fla's pure-torch references (naive.py) are the cross-check for our kernels; --no-deps keeps
	# triton out: we load those files directly and never import the fla package.
	$(PY) -m pip install -q --no-deps fla-core==0.6.0
	touch $@

env: $(TEST)

demo: $(CORE)
	$(VENV)/bin/oryx-ts demo

test: $(TEST)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs

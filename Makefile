# Two commands matter: `make demo` and `make test`. Both create/refresh the environment first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.setup-$(PROFILE)
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-slow clean

setup: $(STAMP)

# Re-runs only when a requirements file or setup.py changed (idempotent, a no-op otherwise).
$(STAMP): requirements/$(PROFILE).txt requirements/$(PROFILE)-overrides.txt setup.py
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@[ -x $(PY) ] || uv venv --python 3.11 $(VENV) || uv venv $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install --override requirements/$(PROFILE)-overrides.txt -r requirements/$(PROFILE).txt
	VIRTUAL_ENV=$(VENV) uv pip install --no-deps -e .
	@rm -f $(VENV)/.setup-*
	@touch $@

demo: setup
	PATH=$(VENV)/bin:$$PATH bash examples/run_demo.sh

# Debian's chromium for the trajectory viewer's browser test (tests/integration/test_viewer_browser.py); needs root
# and apt, else that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }; } || \
	  echo "note: chromium could not be installed (needs root and apt): the viewer's browser test will be skipped"

test: setup browser
	PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup browser
	PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache

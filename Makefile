# Two commands matter: `make demo` and `make test`. Both create/refresh the environment first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.setup-$(PROFILE)
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow clean

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

test: setup
	PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache

# The README's first commands are the contract: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# CPU wheel by default (lies on local disk here). GPU users: see README ("GPU install").
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DEMO_OUT ?= demo_out

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip >/dev/null 2>&1 || true
	$(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -c requirements/constraints.txt -e ".[dev]"
	$(PIP) check
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/agvas demo --out $(DEMO_OUT)

bench: setup
	$(VENV)/bin/agvas bench --config tiny --checkpoint $(DEMO_OUT)/checkpoint --json benchmarks/results/tiny.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

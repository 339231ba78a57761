# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both install exactly the tested dependency set: CPU torch first, then the project with every other
# package pinned by requirements.lock (`make lock` refreshes it; pyproject.toml keeps compatible ranges).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC ?= pip==26.3
# Where the CPU torch wheel lies (pip finds it through its find-links); `make lock` resolves against it.
TORCH_WHEELS ?= /opt/wheels
LOCK ?= requirements.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed

.PHONY: run test test-all test-faults test-tools browser lint lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(PIP_SPEC)"
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	@! $(BIN)/python -m pip list 2>/dev/null | grep -iE '^nvidia-' || (echo "a CUDA package got installed" && false)
	touch $(STAMP)

## The main job: 5 clients x 2 rounds, DP-SGD at epsilon 8, all-mpnet-base-v2 + Rotten Tomatoes.
run: $(STAMP)
	$(BIN)/fedtune-sim $(ARGS)

## nginx (proxy tests, default suite: they fail without it) and prometheus (metrics test, slow: it skips without it).
## Fails, naming what is missing, when a tool asked for cannot be installed (needs root and apt-get).
test-tools:
	@sh deploy/install-test-tools.sh $(TOOLS)

## Debian's chromium for the report's browser test (it skips without it).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the report's browser test will be skipped"

## The test suite (lint + pytest, slow tests excluded): one real simulated federation, one loopback TLS deployment.
test: $(STAMP)
	@sh deploy/install-test-tools.sh nginx
	@$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## Every test, slow ones included (real browser, long federations).
test-all: $(STAMP) test-tools browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

## Fault injection on a loopback TLS deployment (kills, restarts, SIGTERM, torn ledger); ~10 min on 2 cores.
## It needs neither nginx nor prometheus.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m faults tests/test_faults.py

## ruff on the whole repository, mypy on $(MYPY_PACKAGES) (exit non-zero on any finding). mypy checks them under their
## import names (fedtune.common, ...) through a tree of links in $(VENV): the editable install's import hook is
## invisible to mypy, which would otherwise take every `fedtune.*` import as a missing module (Any).
MYPY_PACKAGES ?= common client server
MYPY_TREE := $(VENV)/mypy-path
lint: $(STAMP)
	$(BIN)/ruff check .
	@mkdir -p $(MYPY_TREE)/fedtune
	@for d in common client server audit tools sim; do ln -sfn "$(CURDIR)/$$d" $(MYPY_TREE)/fedtune/$$d; done
	MYPYPATH=$(MYPY_TREE) $(BIN)/mypy $(foreach p,$(MYPY_PACKAGES),-p fedtune.$(p)) > $(VENV)/mypy.out 2>&1; \
		status=$$?; sed 's#^$(MYPY_TREE)/fedtune/##' $(VENV)/mypy.out; exit $$status

## Re-resolve the newest versions allowed by pyproject.toml into requirements.lock (torch stays TORCH_SPEC).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	echo "$(TORCH_SPEC)+cpu" > $(VENV)/torch-constraint.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --find-links $(TORCH_WHEELS) \
		-c $(VENV)/torch-constraint.txt --no-emit-package torch --no-header --quiet -o $(LOCK).new
	@! grep -iE '^(nvidia-|triton)' $(LOCK).new || (echo "the lock would pull CUDA packages" && false)
	(echo "# Pinned dependency set of fedtune (constraints for pip install -c). Refresh: make lock"; \
	 echo "# torch is installed first from TORCH_SPEC (CPU build) and is not listed here."; \
	 cat $(LOCK).new) > $(LOCK) && rm $(LOCK).new

bench: $(STAMP)
	$(BIN)/python -m fedtune.sim.bench $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache

# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## The main job: 5 clients x 3 rounds, DP-SGD at epsilon 8, MiniLM + Rotten Tomatoes.
run: $(STAMP)
	$(BIN)/fedtune-sim $(ARGS)

## The test suite (lint + pytest, slow tests excluded). nginx is for the proxy tests (they skip without it).
test: $(STAMP)
	@command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null) \
		|| echo "nginx not installed: the reverse-proxy tests will be skipped"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m fedtune.sim.bench $(ARGS)

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache

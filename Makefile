# Two set-up commands: `make arena` and `make test`. Each makes .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so the project's torch requirement is already met.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

arena: $(STAMP)
	$(BIN)/effarch arena --suite quick

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -x --timeout=600 tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

.PHONY: venv arena test lint

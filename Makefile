# Every target creates .venv when it is missing; nothing else needs installing by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: run test check bench venv clean services fmt

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q src > /dev/null
	touch $(STAMP)

# Bytecode is written ahead (also under PYTHONDONTWRITEBYTECODE, where every start would
# compile ~1,000 modules again: 4.4 s to healthy instead of 2 s, docs/performance.md).
run: $(STAMP)
	$(BIN)/python -m compileall -q src > /dev/null
	@echo "Starting the platform: orchestrator at http://$(HOST):$(PORT) (Ctrl-C stops it)"
	$(BIN)/prvng platform start --host $(HOST) --port $(PORT)

services:
	bash scripts/ensure-services.sh

test: $(STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff check src tests bench extensions
	$(BIN)/ruff format --check src tests bench extensions
	$(BIN)/mypy src
	for d in extensions/*/*/; do $(BIN)/mypy --strict "$$d" || exit 1; done

fmt: $(STAMP)
	$(BIN)/ruff check --fix src tests bench extensions
	$(BIN)/ruff format src tests bench extensions

bench: $(STAMP)
	$(BIN)/python bench/orchestrator_dag.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

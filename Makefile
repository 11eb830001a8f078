# fhir-gateway: the two commands of the README, and a few more for developers.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
NPM    ?= npm
# The local FHIR server (Medplum under Node) that tests and benchmarks use as an EHR.
FHIR_SERVER = testkit/fhir_server

.PHONY: run test lint bench clean fhir-server chromium

$(BIN)/fhir-gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

# A local .env with a generated Stripe signing secret for development (never a default in code),
# readable by its owner only (umask 077: created 0600).
.env:
	@umask 077 && echo "GATEWAY_STRIPE_WEBHOOK_SECRET=whsec_$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(24))')" > .env
	@echo "wrote .env (mode 0600) with a development Stripe webhook secret"

## run: start the gateway on 127.0.0.1:8000 (SQLite ./gateway.db, bundled profiles, API + worker)
run: $(BIN)/fhir-gateway .env
	$(BIN)/fhir-gateway db upgrade
	$(BIN)/fhir-gateway serve

## fhir-server: install the local FHIR server's npm packages (exact versions, package-lock.json)
fhir-server: $(FHIR_SERVER)/node_modules/.package-lock.json

# Without npm the tests that need the FHIR server skip with the reason, except under CI=true.
$(FHIR_SERVER)/node_modules/.package-lock.json: $(FHIR_SERVER)/package-lock.json
	@if command -v $(NPM) >/dev/null 2>&1; then \
		$(NPM) ci --prefix $(FHIR_SERVER) --ignore-scripts --no-audit --no-fund --loglevel=error; \
	elif case "$$CI" in 1|true|yes) true;; *) false;; esac; then \
		echo "npm not found: CI needs Node.js >= 20.19 for the local FHIR server" >&2; exit 1; \
	else \
		echo "npm not found: tests that need the local FHIR server will skip (install Node.js >= 20.19)"; \
	fi

## chromium: Debian's headless Chromium for the browser tests (tests/console/), installed
## with apt when missing (as root); without it the browser tests skip, except under CI=true
chromium:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/lib/chromium/chromium ]; then \
		true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	elif case "$$CI" in 1|true|yes) true;; *) false;; esac; then \
		echo "chromium not found: CI needs Debian's chromium package for the browser tests" >&2; exit 1; \
	else \
		echo "chromium not found: the browser tests will skip (apt-get install chromium)"; \
	fi

## test: run the test suite (SQLite, PostgreSQL, the local FHIR server), one pytest-xdist
## worker per CPU (TEST_WORKERS=0 runs it in one process; PYTEST_ARGS adds pytest options)
TEST_WORKERS ?= auto
test: $(BIN)/fhir-gateway fhir-server chromium
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

## lint: ruff and mypy --strict
lint: $(BIN)/fhir-gateway
	$(BIN)/ruff check gateway mappers tests bench testkit
	$(BIN)/mypy gateway mappers testkit

## bench: the benchmarks (see docs/PERFORMANCE.md)
bench: $(BIN)/fhir-gateway fhir-server
	$(BIN)/python -m bench.mapping
	$(BIN)/python -m bench.events

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache $(FHIR_SERVER)/node_modules

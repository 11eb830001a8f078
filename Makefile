# fhir-gateway: the two commands of the README, and a few more for developers.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/fhir-gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

# A local .env with a generated Stripe signing secret for development (never a default in code).
.env:
	@echo "GATEWAY_STRIPE_WEBHOOK_SECRET=whsec_$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(24))')" > .env
	@echo "wrote .env with a development Stripe webhook secret"

## run: start the gateway on 127.0.0.1:8000 (SQLite ./gateway.db, bundled profiles, API + worker)
run: $(BIN)/fhir-gateway .env
	$(BIN)/fhir-gateway db upgrade
	$(BIN)/fhir-gateway serve

## test: run the test suite (SQLite and PostgreSQL), one pytest-xdist worker per CPU
## (TEST_WORKERS=0 runs it in one process; PYTEST_ARGS adds pytest options)
TEST_WORKERS ?= auto
test: $(BIN)/fhir-gateway
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

## lint: ruff and mypy --strict
lint: $(BIN)/fhir-gateway
	$(BIN)/ruff check gateway mappers tests bench
	$(BIN)/mypy gateway mappers

## bench: the benchmarks (see docs/PERFORMANCE.md)
bench: $(BIN)/fhir-gateway
	$(BIN)/python -m bench.mapping
	$(BIN)/python -m bench.events

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache

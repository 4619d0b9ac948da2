# The README's commands. `make demo` then `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(EXTRAS)

.PHONY: demo test bench soak load lint typecheck check worker flower dist clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/pipeline demo $(if $(FLOWER),--flower)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench

soak: $(VENV)/.installed-bench
	$(BIN)/python -m bench.soak $(if $(RUNS),--runs $(RUNS))

load: $(VENV)/.installed-bench
	$(BIN)/python -m bench.load $(if $(RUNS),--runs $(RUNS))

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check pipeline tasks config tests bench

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

check: lint typecheck test

worker: $(VENV)/.installed-embedded
	$(BIN)/celery -A config worker --loglevel=INFO

flower: $(VENV)/.installed-embedded
	$(BIN)/celery -A config flower

dist: $(VENV)/bin/python
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

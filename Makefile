# Two commands do everything, each setting itself up on a fresh machine:
#   make demo   the tiny embedded-default pipeline (jobs/tiny.yaml) on a local Ray, no GPU
#   make test   lint, format check and the whole test suite (unit + integration), all on CPU
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test lint bench clean

# torch is pinned in pyproject.toml, so it resolves in this same pip call to the CPU wheel on disk.
# Let pip byte-compile at install (no --no-compile): where PYTHONDONTWRITEBYTECODE is set, as on CI,
# nothing is cached later, and every Ray worker would recompile torch and transformers on import.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/chuxin-ray demo-data demo
	$(BIN)/chuxin-ray pipeline jobs/tiny.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest --durations=30

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf demo runs .pytest_cache

# Two commands do everything, each setting itself up on a fresh machine:
#   make demo   the tiny embedded-default pipeline (jobs/tiny.yaml) on a local Ray, no GPU
#   make test   lint, format check and the whole test suite (unit + integration), all on CPU
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test lint bench clean

# torch is pinned in pyproject.toml, so it resolves in this same pip call to the CPU wheel on disk.
# Byte-code: pip compiles file by file on one core; compileall -j 0 does the same on every core. It is
# needed: where PYTHONDONTWRITEBYTECODE is set, as on CI, nothing is cached later, and every Ray worker
# would compile torch and transformers again on import. Files that do not compile (Python 2 test data
# in some packages) are skipped, as pip skips them.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[test]'
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
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
